"""Receipt chain, audit log, verify, retention, legal holds, find, export and delete."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import zipfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from linerec.audio.recording import RecordingFile
from linerec.daemon import archive
from linerec.daemon.events import EventBus, iso_ms
from linerec.daemon.ledger import LEDGER_NAME, Ledger, LedgerState
from linerec.daemon.paths import call_folder, new_call_id
from linerec.daemon.receipt import file_sha256, seal_receipt, write_receipt
from linerec.daemon.recovery import recover_interrupted
from linerec.daemon.simulate import demo_scenario, run_simulation, simulated_config
from linerec.hw.scenario import load_scenario
from linerec.hw.sim import SimulatedHat

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "receipt.schema.json").read_text())
LINEREC = Path(sys.executable).with_name("linerec")
DAY = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
SHA_A = "a" * 64


class Collect:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def run_linerec(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, as the office manager runs it."""
    return subprocess.run([str(LINEREC), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def receipt_for(call_id: str, started: datetime, *, line: str = "line1",
                number: str | None = "+31 20 123 4567", retention_days: int = 30,
                recording: dict[str, Any] | None = None, state: str = "closed"
                ) -> dict[str, Any]:
    """A receipt as line.py writes it."""
    offhook = 4000
    return {
        "schema": "linerec-receipt/1",
        "call_id": call_id,
        "state": state,
        "line": line,
        "device_id": "office",
        "direction": "inbound",
        "number": {"value": number, "source": "clip_fsk" if number else None, "name": None,
                   "unknown_reason": None if number else "withheld"},
        "rule": None,
        "started_at": iso_ms(started),
        "ended_at": iso_ms(started + timedelta(seconds=20)) if state != "open" else None,
        "end_reason": "onhook" if state != "open" else None,
        "clock_synchronised": True,
        "sample_rate": 8000,
        "offhook_sample": offhook,
        "purpose": {"name": "orders", "text": "to settle disputes about orders",
                    "lawful_basis": "contract", "retention_days": retention_days},
        "retention_until": (started + timedelta(days=retention_days)).date().isoformat(),
        "disclosure": {
            "id": "orders", "languages": ["nl", "en"],
            "parts": [{"language": "nl", "file": "/etc/linerec/nl.wav", "sha256": SHA_A},
                      {"language": "en", "file": "/etc/linerec/en.wav", "sha256": SHA_A}],
            "sha256": SHA_A, "first_sample": offhook + 160, "line_end_sample": offhook + 60000,
            "started_at": iso_ms(started), "completed_at": iso_ms(started + timedelta(seconds=7)),
            "status": "completed", "failure": None,
            "verification": {"score": 0.93, "threshold": 0.6, "lag_samples": 412},
        },
        "recording": recording,
        "linerec_version": "0.1.0",
    }


def record(path: Path, call_id: str, seconds: float) -> RecordingFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    recording = RecordingFile(path, rate=8000, bitrate=12000, complexity=5,
                              page_interval_s=0.4, fsync_interval_s=0.4,
                              vendor="linerec test", tags={"CALL_ID": call_id})
    t = np.arange(round(seconds * 8000)) / 8000
    recording.write((5000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16))
    return recording


def store_call(storage: Path, started: datetime = DAY, *, seconds: float = 0.5,
               **fields: Any) -> Path:
    """A finished, recorded call, sealed as the daemon seals it; returns its receipt."""
    call_id = new_call_id(fields.get("line", "line1"), started)
    folder = call_folder(storage, started)
    recording = record(folder / f"{call_id}.opus", call_id, seconds)
    size = recording.close()
    summary = {"file": f"{call_id}.opus", "status": "complete",
               "sha256": file_sha256(recording.path), "first_sample": 64000,
               "end_sample": 64000 + recording.samples, "duration_s": seconds, "bytes": size,
               "codec": "opus", "sample_rate": 8000, "bitrate": 12000, "lost_samples": 0,
               "capture_gaps": []}
    path = folder / f"{call_id}.json"
    seal_receipt(storage, path, receipt_for(call_id, started, recording=summary, **fields))
    return path


def audit_lines(storage: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (storage / LEDGER_NAME).read_text().splitlines()]


def breaks(storage: Path) -> list[str]:
    return [str(b) for b in archive.verify(storage).breaks]


# ---------------------------------------------------------------------------------------
# The chain and verify


def test_a_sealed_chain_verifies_clean(tmp_path: Path) -> None:
    paths = [store_call(tmp_path, DAY + timedelta(minutes=i)) for i in range(3)]
    receipts = [json.loads(p.read_text()) for p in paths]
    assert [r["chain"]["seq"] for r in receipts] == [1, 2, 3]
    assert receipts[0]["chain"]["previous_sha256"] is None
    assert receipts[1]["chain"]["previous_sha256"] == file_sha256(paths[0])
    assert receipts[2]["chain"]["previous_sha256"] == file_sha256(paths[1])
    entries = audit_lines(tmp_path)
    assert [e["kind"] for e in entries] == ["receipt"] * 3
    assert entries[-1]["head"] == {"seq": 3, "sha256": file_sha256(paths[2])}
    result = run_linerec("verify", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no breaks" in result.stdout


def test_one_edited_byte_in_a_receipt_is_found(tmp_path: Path) -> None:
    paths = [store_call(tmp_path, DAY + timedelta(minutes=i)) for i in range(3)]
    data = bytearray(paths[1].read_bytes())
    at = data.index(b'"lawful_basis": "contract"') + len('"lawful_basis": "c')
    data[at] = ord("k")  # one byte: "kontract"
    paths[1].write_bytes(bytes(data))
    result = run_linerec("verify", str(tmp_path))
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"{paths[1]}: changed since it was sealed as seq 2")


def test_an_edited_recording_and_an_edited_audit_line_are_found(tmp_path: Path) -> None:
    paths = [store_call(tmp_path, DAY + timedelta(minutes=i)) for i in range(3)]
    opus = paths[0].with_suffix(".opus")
    data = bytearray(opus.read_bytes())
    data[-20] ^= 1
    opus.write_bytes(bytes(data))
    ledger = tmp_path / LEDGER_NAME
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text(lines[0] + lines[2])  # the second line removed
    found = breaks(tmp_path)
    assert f"{opus}: the recording differs from the sha256 in its receipt" in found
    assert any(b.startswith(f"{ledger}: line 2: its prev does not match") for b in found)
    assert any(b.startswith(f"{ledger}: line 2: receipt seq 3 follows seq 1") for b in found)
    # The receipt whose line was removed is no longer accounted for.
    assert any(b.startswith(f"{paths[1]}: a closed receipt that is not in the audit log")
               for b in found)


def test_a_receipt_removed_behind_the_audit_log_is_a_break(tmp_path: Path) -> None:
    paths = [store_call(tmp_path, DAY + timedelta(minutes=i)) for i in range(3)]
    paths[1].unlink()
    result = run_linerec("verify", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{paths[1]}: receipt seq 2 is missing, and the audit log records no deletion: "
        "removed or moved by hand"]


def test_a_recording_beside_a_receipt_that_names_none_is_a_break(tmp_path: Path) -> None:
    recorded = store_call(tmp_path, DAY)
    started = DAY + timedelta(minutes=5)
    call_id = new_call_id("line1", started)
    unrecorded = call_folder(tmp_path, started) / f"{call_id}.json"
    seal_receipt(tmp_path, unrecorded, receipt_for(call_id, started, recording=None,
                                                   number=None))
    assert breaks(tmp_path) == []
    smuggled = unrecorded.with_suffix(".opus")
    smuggled.write_bytes(recorded.with_suffix(".opus").read_bytes())
    assert breaks(tmp_path) == [f"{smuggled}: a recording its receipt does not name: the "
                                "receipt says this call was not recorded, or recorded to "
                                "another file"]


def test_verify_usage_errors(tmp_path: Path) -> None:
    result = run_linerec("verify", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"linerec: DIR: {tmp_path / 'nowhere'} is not a folder; "
                                     "pass the recordings folder")
    result = run_linerec("verify", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "missing.toml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_write_cut_off_by_a_crash_is_dropped_and_recorded(tmp_path: Path) -> None:
    store_call(tmp_path)
    ledger = tmp_path / LEDGER_NAME
    with ledger.open("ab") as log:
        log.write(b'{"kind":"receipt","at":"2026-')  # power cut mid-line
    assert any("the last line is cut off" in b for b in breaks(tmp_path))
    store_call(tmp_path, DAY + timedelta(minutes=1))
    kinds = [e["kind"] for e in audit_lines(tmp_path)]
    assert kinds == ["receipt", "torn_tail", "receipt"]
    assert breaks(tmp_path) == []


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    script = f"""
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_archive import receipt_for
from linerec.daemon.paths import call_folder, new_call_id
from linerec.daemon.receipt import seal_receipt
storage = Path(sys.argv[1])
start = datetime(2026, 11, 2, tzinfo=UTC)
for i in range(40):
    started = start + timedelta(minutes=i)
    call_id = new_call_id(sys.argv[2], started)
    path = call_folder(storage, started) / (call_id + ".json")
    seal_receipt(storage, path, receipt_for(call_id, started, line=sys.argv[2]))
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), line])
             for line in ("line1", "line2")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    entries = audit_lines(tmp_path)
    assert [e["seq"] for e in entries] == list(range(1, 81))
    assert {e["call_id"].split("-")[1] for e in entries} == {"line1", "line2"}
    result = archive.verify(tmp_path)
    assert result.breaks == [] and result.sealed == 80


# ---------------------------------------------------------------------------------------
# Delete, hold, retention


def test_delete_is_audited_without_numbers_and_the_chain_survives(tmp_path: Path) -> None:
    paths = [store_call(tmp_path, DAY + timedelta(minutes=i)) for i in range(3)]
    victim = paths[1].name.removesuffix(".json")
    sha = file_sha256(paths[1])
    result = run_linerec("recordings", "delete", victim, "--reason", "request DSR-2026-17",
                         "--storage", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"deleted {victim}: {victim}.opus, {victim}.json"
    assert not paths[1].exists() and not paths[1].with_suffix(".opus").exists()
    entry = audit_lines(tmp_path)[-1]
    assert entry["kind"] == "deleted" and entry["call_id"] == victim
    assert entry["files"] == [f"{victim}.opus", f"{victim}.json"]
    assert entry["who"] == "operator" and entry["reason"] == "request DSR-2026-17"
    assert entry["seq"] == 2 and entry["sha256"] == sha
    audit = (tmp_path / LEDGER_NAME).read_text()
    assert "1234567" not in audit and "+31" not in audit
    assert breaks(tmp_path) == []
    result = run_linerec("recordings", "delete", victim, "--reason", "request DSR-2026-17",
                         "--storage", str(tmp_path))
    assert result.returncode == 2
    assert f"call {victim} was deleted on {entry['at']} (operator: request DSR-2026-17)" \
        in result.stderr
    # The chain goes on past the deleted receipt, and still verifies.
    later = store_call(tmp_path, DAY + timedelta(minutes=9))
    assert json.loads(later.read_text())["chain"]["seq"] == 4
    assert run_linerec("verify", str(tmp_path)).returncode == 0


def test_delete_checks_every_call_before_deleting_any(tmp_path: Path) -> None:
    first, second = (store_call(tmp_path, DAY + timedelta(minutes=i)) for i in range(2))
    ids = [p.name.removesuffix(".json") for p in (first, second)]
    before = (tmp_path / LEDGER_NAME).read_bytes()
    unknown = new_call_id("line1", DAY)
    result = run_linerec("recordings", "delete", ids[0], unknown, "--reason", "DSR-1",
                         "--storage", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"linerec: call {unknown}: no receipt under {tmp_path}; "
                                     "check the id with `linerec recordings find`")
    result = run_linerec("recordings", "delete", ids[0], "not-a-call", "--reason", "DSR-1",
                         "--storage", str(tmp_path))
    assert result.returncode == 2 and "'not-a-call' is not a linerec call id" in result.stderr
    result = run_linerec("recordings", "delete", *ids, "--storage", str(tmp_path))
    assert result.returncode == 2 and "--reason is required" in result.stderr
    result = run_linerec("recordings", "delete", *ids, "--reason", "caller +31 20 1234567",
                         "--storage", str(tmp_path))
    assert result.returncode == 2 and "must not contain the caller's phone number" in result.stderr
    assert run_linerec("recordings", "hold", ids[1], "--reason", "dispute 88",
                       "--storage", str(tmp_path)).returncode == 0
    result = run_linerec("recordings", "delete", *ids, "--reason", "DSR-1",
                         "--storage", str(tmp_path))
    assert result.returncode == 2 and f"call {ids[1]} is under legal hold" in result.stderr
    assert first.exists() and second.exists()
    assert [e["kind"] for e in audit_lines(tmp_path)][len(before.splitlines()):] == ["hold"]


def test_retention_deletes_expired_calls_but_not_held_ones(tmp_path: Path) -> None:
    old = [store_call(tmp_path, DAY + timedelta(hours=i), retention_days=10) for i in range(3)]
    young = store_call(tmp_path, DAY + timedelta(days=5), retention_days=30)
    held = old[2].name.removesuffix(".json")
    assert archive.hold_calls(tmp_path, [held], "dispute 88") == [held]
    assert archive.hold_calls(tmp_path, [held], "dispute 88") == []  # already
    collect = Collect()
    expiry = DAY.date() + timedelta(days=10)
    assert archive.sweep_retention(tmp_path, today=expiry, events=EventBus([collect])) == []
    deleted = archive.sweep_retention(tmp_path, today=expiry + timedelta(days=1),
                                      events=EventBus([collect]))
    assert deleted == [p.name.removesuffix(".json") for p in old[:2]]
    assert [e["event"] for e in collect.events] == ["recording_deleted"] * 2
    assert collect.events[0]["who"] == "retention"
    assert not old[0].exists() and old[2].exists() and young.exists()
    entries = [e for e in audit_lines(tmp_path) if e["kind"] == "deleted"]
    assert [e["reason"] for e in entries] == [f"retention period ended {expiry}"] * 2
    assert breaks(tmp_path) == []
    assert archive.release_calls(tmp_path, [held]) == [held]
    with pytest.raises(archive.ArchiveError, match="is not on hold"):
        archive.release_calls(tmp_path, [held])
    assert archive.sweep_retention(tmp_path, today=expiry + timedelta(days=1)) == [held]
    # The emptied day folder goes; the month keeps the young call's day.
    assert not old[0].parent.exists() and young.parent.is_dir()
    assert archive.sweep_retention(tmp_path, today=date(2027, 3, 1)) == [
        young.name.removesuffix(".json")]
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_NAME]
    assert breaks(tmp_path) == []


def test_retention_finishes_a_deletion_a_crash_interrupted(tmp_path: Path) -> None:
    path = store_call(tmp_path, retention_days=1)
    call_id = path.name.removesuffix(".json")
    archive.delete_calls(tmp_path, [call_id], "DSR-5")
    # As if the crash came after the log line, before the files went: put them back.
    write_receipt(path, {"call_id": call_id, "state": "closed"})
    assert breaks(tmp_path) == [f"{path}: deleted on {audit_lines(tmp_path)[-1]['at']} "
                                "(audit log) but still on disk; the daemon's next retention "
                                "sweep removes it"]
    assert archive.sweep_retention(tmp_path) == []
    assert not path.exists() and breaks(tmp_path) == []
    assert not path.parent.exists()  # the emptied day folder went too
    # A recording left behind without its receipt is found too.
    path.parent.mkdir(parents=True)
    path.with_suffix(".opus").write_bytes(b"OggS")
    assert breaks(tmp_path) != []
    assert archive.sweep_retention(tmp_path) == []
    assert not path.with_suffix(".opus").exists() and breaks(tmp_path) == []


def test_the_daemon_sweeper_sweeps_at_start_and_reports_failures(tmp_path: Path) -> None:
    store_call(tmp_path, DAY, retention_days=1)
    collect = Collect()
    sweeper = archive.RetentionSweeper(tmp_path, EventBus([collect]), interval_s=0.05)
    sweeper.start()
    try:
        deadline = threading.Event()
        for _ in range(100):
            if collect.events:
                break
            deadline.wait(0.05)
    finally:
        sweeper.stop()
        sweeper.join(timeout=3)
    assert not sweeper.is_alive()
    assert [e["event"] for e in collect.events] == ["recording_deleted"]
    # An audit log that cannot be opened: the sweep fails, says so, and the thread lives on.
    broken = tmp_path / "broken"
    store_call(broken, DAY, retention_days=1)
    (broken / LEDGER_NAME).unlink()
    (broken / LEDGER_NAME).mkdir()
    collect = Collect()
    sweeper = archive.RetentionSweeper(broken, EventBus([collect]), interval_s=60)
    assert sweeper.sweep_once() == []
    (event,) = collect.events
    assert event["event"] == "error" and "retention sweep" in event["message"]


# ---------------------------------------------------------------------------------------
# Find and export


@pytest.fixture
def office(tmp_path: Path) -> dict[str, str]:
    """Four calls: two numbers, a withheld one, two lines, three days."""
    calls = {
        "amsterdam": store_call(tmp_path, DAY, number="+31 20 123 4567"),
        "mobile": store_call(tmp_path, DAY + timedelta(days=1), number="+31 6-5555-1234",
                             line="line2"),
        "local": store_call(tmp_path, DAY + timedelta(days=1, hours=2), number="020 7654321"),
        "withheld": store_call(tmp_path, DAY + timedelta(days=3), number=None),
    }
    return {name: path.name.removesuffix(".json") for name, path in calls.items()}


def find(storage: Path, **filters: Any) -> list[str]:
    return [c.call_id for c in archive.find_calls(storage, archive.CallFilter(**filters))]


def test_find_filters_by_number_date_and_line(tmp_path: Path, office: dict[str, str]) -> None:
    assert find(tmp_path) == list(office.values())
    # +31 20 ... and 020 ... are one number, as in the number rules.
    assert find(tmp_path, number="+3120*") == [office["amsterdam"], office["local"]]
    assert find(tmp_path, number="0201234567") == [office["amsterdam"]]
    assert find(tmp_path, number="+31207654321") == [office["local"]]
    assert find(tmp_path, number="+31 20 123 45??") == [office["amsterdam"]]
    assert find(tmp_path, number="06*") == [office["mobile"]]
    assert find(tmp_path, number="*1234") == [office["mobile"]]
    assert find(tmp_path, number="020-765*") == [office["local"]]
    assert find(tmp_path, number="20*") == []  # the national form starts with 0
    assert find(tmp_path, date_from=date(2026, 11, 3), date_to=date(2026, 11, 3)) == [
        office["mobile"], office["local"]]
    assert find(tmp_path, date_from=date(2026, 11, 4)) == [office["withheld"]]
    assert find(tmp_path, line="line2") == [office["mobile"]]
    assert find(tmp_path, line="line1", date_to=date(2026, 11, 3)) == [
        office["amsterdam"], office["local"]]
    result = run_linerec("recordings", "find", "--number", "*1234*", "--json",
                         "--storage", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["call_id"] for r in rows] == [office["amsterdam"], office["mobile"]]
    assert rows[1]["number"] == "+31 6-5555-1234" and rows[1]["line"] == "line2"
    assert rows[0]["held"] is False and rows[0]["recording"].endswith(".opus")
    table = run_linerec("recordings", "find", "--storage", str(tmp_path)).stdout.splitlines()
    assert len(table) == 4 and "(withheld)" in table[3]


def test_find_rejects_bad_filters_in_one_line(tmp_path: Path) -> None:
    for args, expected in (
        (["--from", "2026-13-01"], "linerec: --from: '2026-13-01' is not a date; write it as "
                                   "YYYY-MM-DD, like 2026-11-29"),
        (["--to", "29/11/2026"], "linerec: --to: '29/11/2026' is not a date"),
        (["--number", "anna"], "linerec: --number: 'anna' is not a phone number pattern"),
        (["--from", "2026-11-05", "--to", "2026-11-01"], "linerec: --from/--to: the period "),
    ):
        result = run_linerec("recordings", "find", *args, "--storage", str(tmp_path))
        assert result.returncode == 2, args
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, args
    result = run_linerec("recordings", "find", "--storage", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "--storage: " in result.stderr


def test_export_to_a_folder_and_a_zip(tmp_path: Path, office: dict[str, str]) -> None:
    storage = tmp_path
    out = tmp_path / "out"
    out.mkdir()
    folder = out / "request-17"
    result = run_linerec("recordings", "export", "--number", "*1234*", "--output", str(folder),
                         "--reason", "DSR-17", "--storage", str(storage))
    assert result.returncode == 0, result.stderr
    wanted = [office["amsterdam"], office["mobile"]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["index.csv", *(f"{c}.json" for c in wanted), *(f"{c}.opus" for c in wanted)])
    index = (folder / "index.csv").read_text().splitlines()
    assert index[0].startswith("call_id,started_at,ended_at,line,direction,number")
    assert [row.split(",")[0] for row in index[1:]] == wanted
    for call_id in wanted:
        exported = json.loads((folder / f"{call_id}.json").read_text())
        assert file_sha256(folder / f"{call_id}.opus") == exported["recording"]["sha256"]
    entry = audit_lines(storage)[-1]
    assert entry["kind"] == "export" and entry["call_ids"] == wanted
    assert entry["destination"] == "folder" and entry["reason"] == "DSR-17"
    assert "out" not in json.dumps(entry) and "+31" not in json.dumps(entry)

    bundle = out / "call.zip"
    result = run_linerec("recordings", "export", office["withheld"], "-o", str(bundle),
                         "--storage", str(storage))
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(bundle) as archive_file:
        assert archive_file.testzip() is None
        names = sorted(archive_file.namelist())
        assert names == sorted([f"{office['withheld']}.json", f"{office['withheld']}.opus",
                                "index.csv"])
    assert audit_lines(storage)[-1]["destination"] == "zip"

    result = run_linerec("recordings", "export", "--from", "2026-11-01", "--to", "x.zip",
                         "--storage", str(storage))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("an export's destination is -o/--output PATH")
    for target in (folder, bundle):
        result = run_linerec("recordings", "export", office["local"], "-o", str(target),
                             "--storage", str(storage))
        assert result.returncode == 2 and "exists already" in result.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial leftovers
    assert breaks(storage) == []


# ---------------------------------------------------------------------------------------
# Schema and recovery


def test_every_receipt_meets_the_schema(tmp_path: Path, office: dict[str, str]) -> None:
    validator = jsonschema.Draft202012Validator(
        SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    # An open receipt, and one that recovery closed as interrupted, meet it too.
    started = DAY + timedelta(days=4)
    call_id = new_call_id("line1", started)
    folder = call_folder(tmp_path, started)
    part = record(folder / f"{call_id}.opus", call_id, 1.0)
    opened = receipt_for(call_id, started, state="open",
                         recording={"file": f"{call_id}.opus", "status": "recording",
                                    "first_sample": 64000})
    validator.validate(opened)
    write_receipt(folder / f"{call_id}.json", opened)
    part.abandon()
    assert recover_interrupted(tmp_path, EventBus()) == 1
    paths = sorted(tmp_path.glob("*/*/*/*.json"))
    assert len(paths) == 5
    for path in paths:
        receipt = json.loads(path.read_text())
        errors = [e.message for e in validator.iter_errors(receipt)]
        assert errors == [], path
    bad = json.loads(paths[0].read_text())
    del bad["chain"]
    assert list(validator.iter_errors(bad))  # a closed receipt without its place: invalid


def test_the_daemon_seals_what_it_records(tmp_path: Path) -> None:
    """End to end: calls on the simulated HAT, sealed by the daemon's lines; the retention
    sweeper ran beside them and stopped with the recorder."""
    storage = tmp_path / "recordings"
    config = simulated_config(storage)
    scenario = load_scenario(demo_scenario(), [line.name for line in config.line])
    collect = Collect()
    run_simulation(SimulatedHat(config, scenario), [collect])
    assert "retention" not in [thread.name for thread in threading.enumerate()]
    assert "error" not in [event["event"] for event in collect.events]
    receipts = sorted(storage.glob("*/*/*/*.json"))
    assert receipts
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for path in receipts:
        receipt = json.loads(path.read_text())
        assert [e.message for e in validator.iter_errors(receipt)] == [], path
        assert receipt["chain"]["seq"] >= 1
    result = run_linerec("verify", str(storage))
    assert result.returncode == 0, result.stdout
    assert f"{len(receipts)} sealed receipt(s)" in result.stdout


def test_recovery_seals_interrupted_receipts_exactly_once(tmp_path: Path) -> None:
    store_call(tmp_path, DAY - timedelta(hours=1))
    started = DAY
    call_id = new_call_id("line1", started)
    folder = call_folder(tmp_path, started)
    part = record(folder / f"{call_id}.opus", call_id, 1.5)
    write_receipt(folder / f"{call_id}.json", receipt_for(
        call_id, started, state="open",
        recording={"file": f"{call_id}.opus", "status": "recording", "first_sample": 64000}))
    part.abandon()
    unrecorded = new_call_id("line2", started)
    write_receipt(folder / f"{unrecorded}.json",
                  receipt_for(unrecorded, started, line="line2", state="open"))
    assert recover_interrupted(tmp_path, EventBus()) == 2
    receipt = json.loads((folder / f"{call_id}.json").read_text())
    assert receipt["state"] == "interrupted" and receipt["chain"]["seq"] in (2, 3)
    assert receipt["recording"]["sha256"] == file_sha256(folder / f"{call_id}.opus")
    assert [e["seq"] for e in audit_lines(tmp_path)] == [1, 2, 3]
    assert recover_interrupted(tmp_path, EventBus()) == 0
    assert len(audit_lines(tmp_path)) == 3
    assert breaks(tmp_path) == []


def test_recovery_completes_a_seal_cut_off_by_a_crash_once(tmp_path: Path) -> None:
    store_call(tmp_path, DAY - timedelta(hours=1))
    # The crash came after the sealed receipt was written, before its audit log line.
    head = LedgerState.load(Ledger(tmp_path)).head
    call_id = new_call_id("line1", DAY)
    path = call_folder(tmp_path, DAY) / f"{call_id}.json"
    receipt = receipt_for(call_id, DAY)
    receipt["chain"] = {"seq": head.seq + 1, "previous_sha256": head.sha256}
    write_receipt(path, receipt)
    assert any("not in the audit log" in b for b in breaks(tmp_path))
    recover_interrupted(tmp_path, EventBus())
    recover_interrupted(tmp_path, EventBus())
    assert [(e["call_id"], e["seq"]) for e in audit_lines(tmp_path)][1:] == [(call_id, 2)]
    assert json.loads(path.read_text())["chain"]["seq"] == 2  # the receipt was not rewritten
    assert breaks(tmp_path) == []
    # Two receipts past the head are no crash: the daemon leaves them for verify to report.
    for minute in (1, 2):
        extra_id = new_call_id("line1", DAY + timedelta(minutes=minute))
        extra = receipt_for(extra_id, DAY + timedelta(minutes=minute))
        extra["chain"] = {"seq": 9, "previous_sha256": SHA_A}
        write_receipt(call_folder(tmp_path, DAY) / f"{extra_id}.json", extra)
    recover_interrupted(tmp_path, EventBus())
    assert len(audit_lines(tmp_path)) == 2
    assert len(breaks(tmp_path)) == 2


def test_a_recovered_recording_supersedes_its_sealed_receipt(tmp_path: Path) -> None:
    # The call ended, but closing its recording failed: the receipt was sealed naming the
    # .part; the next start makes the .part playable and seals the amended receipt.
    call_id = new_call_id("line1", DAY)
    folder = call_folder(tmp_path, DAY)
    part = record(folder / f"{call_id}.opus", call_id, 1.5)
    part.abandon()
    path = folder / f"{call_id}.json"
    first_sha = seal_receipt(tmp_path, path, receipt_for(call_id, DAY, recording={
        "file": f"{call_id}.opus.part", "status": "incomplete", "first_sample": 64000,
        "error": "No space left on device"}))
    assert breaks(tmp_path) == []
    assert recover_interrupted(tmp_path, EventBus()) == 1
    receipt = json.loads(path.read_text())
    assert receipt["state"] == "closed" and receipt["recording"]["status"] == "recovered"
    entries = audit_lines(tmp_path)
    assert [e["seq"] for e in entries] == [1, 2] and entries[1]["supersedes"] == first_sha
    assert breaks(tmp_path) == []


def test_a_failed_seal_leaves_the_final_receipt_for_the_next_start(tmp_path: Path) -> None:
    store_call(tmp_path, DAY - timedelta(hours=1))
    ledger = tmp_path / LEDGER_NAME
    saved = ledger.read_bytes()
    ledger.unlink()
    ledger.mkdir()  # the audit log cannot be opened for writing
    call_id = new_call_id("line1", DAY)
    path = call_folder(tmp_path, DAY) / f"{call_id}.json"
    with pytest.raises(OSError):
        seal_receipt(tmp_path, path, receipt_for(call_id, DAY))
    receipt = json.loads(path.read_text())
    assert receipt["state"] == "closed" and "chain" not in receipt
    ledger.rmdir()
    ledger.write_bytes(saved)
    assert recover_interrupted(tmp_path, EventBus()) == 0
    assert json.loads(path.read_text())["chain"]["seq"] == 2
    assert breaks(tmp_path) == []
