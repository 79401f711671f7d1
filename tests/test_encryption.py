"""Encryption at rest: each recording sealed to the installer's age public key when it is
closed, opened off the appliance with the private key, and everything that reads
recordings (verify, export, delete, retention, find, the start-up recovery) at home with
the sealed file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from pyrage import x25519
from simhelpers import (
    RATE,
    RECORDED_CALL,
    decode,
    linerec,
    receipts,
    run_sim,
    sim_config,
    start_again,
    step,
    write_scenario,
)

from linerec.audio.recording import RecordingFile
from linerec.daemon import archive
from linerec.daemon.config import ConfigError, load_config
from linerec.daemon.events import EventBus
from linerec.daemon.ledger import Ledger, LedgerState
from linerec.daemon.paths import call_folder, new_call_id
from linerec.daemon.receipt import file_sha256, write_receipt
from linerec.daemon.recovery import recover_interrupted

SPEECH_AT, ONHOOK_AT = 13.5, 22.0
STARTED = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def make_key(folder: Path) -> tuple[Path, str]:
    """A key pair made by Debian's age-keygen, as an installer makes it on their own machine:
    the key file and its public key."""
    key = folder / "installer-key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True,
                            text=True).stdout.strip()
    return key, public


def encryption_table(*recipients: str) -> str:
    return "\n[encryption]\nrecipients = [" + ", ".join(f'"{r}"' for r in recipients) + "]\n"


def opus_ok(path: Path) -> None:
    info = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True, check=False)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "WARNING" not in info.stdout and "ERROR" not in info.stdout, info.stdout


class SealedCall(NamedTuple):
    folder: Path
    """Holds the storage (``recordings``) and the key file."""
    key: Path
    public: str
    events: list[dict[str, Any]]

    @property
    def sealed(self) -> Path:
        """The sealed recording, as ``recording_stopped`` named it."""
        return Path(self.events[4]["file"])


@pytest.fixture(scope="module")
def sealed_call(tmp_path_factory: pytest.TempPathFactory, caller_speech: Path) -> SealedCall:
    """One simulated inbound call on an appliance with [encryption]. Tests that change the
    storage work on a copy of it."""
    folder = tmp_path_factory.mktemp("sealed")
    key, public = make_key(folder)
    config = sim_config(folder, extra=encryption_table(public))
    scenario = write_scenario(folder, step(0.5, "ring") + step(5.5, "offhook")
                              + step(SPEECH_AT, "audio", file=str(caller_speech))
                              + step(ONHOOK_AT, "onhook"))
    return SealedCall(folder, key, public, run_sim(folder, scenario, config))


def storage_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "recordings"
    shutil.copytree(folder / "recordings", copy)
    return copy


def test_a_recording_is_sealed_and_opens_off_the_appliance(
        sealed_call: SealedCall, tmp_path: Path) -> None:
    folder, key, public, events = sealed_call
    assert [e["event"] for e in events] == RECORDED_CALL
    sealed = sealed_call.sealed
    assert sealed.name.endswith(".opus.age") and sealed.is_file()
    assert Path(events[3]["file"]) == sealed  # announced by its final name

    # Nothing plain is left on the card: no .opus, no .part, no temporary file.
    storage = folder / "recordings"
    assert sorted(p.name.split(".", 1)[1] for p in storage.rglob("*-line*.*")) == [
        "json", "opus.age"]
    data = sealed.read_bytes()
    assert data.startswith(b"age-encryption.org/v1\n")
    assert b"OpusHead" not in data and b"OggS" not in data

    # The receipt (checked against the documented schema) keeps the sealed file's hash.
    (receipt,) = receipts(folder)
    recording = receipt["recording"]
    assert receipt["state"] == "closed"
    assert recording["file"] == sealed.name and recording["status"] == "complete"
    assert recording["sha256"] == file_sha256(sealed)
    assert recording["bytes"] == sealed.stat().st_size
    assert recording["encrypted"] == {"format": "age", "recipients": [public]}
    assert linerec("verify", str(storage)).returncode == 0

    # Debian's age opens it with the private key, and so does `linerec decrypt`: the same
    # Ogg Opus file, which opusinfo accepts and which holds the call.
    by_age = tmp_path / "by-age.opus"
    subprocess.run(["age", "-d", "-i", str(key), "-o", str(by_age), str(sealed)], check=True)
    by_linerec = tmp_path / "by-linerec.opus"
    result = linerec("decrypt", "--identity", str(key), str(sealed), "-o", str(by_linerec))
    assert result.returncode == 0, result.stderr
    assert "sha256 as in its receipt" in result.stdout
    assert by_linerec.read_bytes() == by_age.read_bytes()
    opus_ok(by_linerec)
    decoded = decode(by_linerec, tmp_path)
    assert abs(len(decoded) / RATE - recording["duration_s"]) < 0.001
    speech_from = round(SPEECH_AT * RATE) - recording["first_sample"]
    assert np.sqrt(np.mean(decoded[: speech_from - 80] ** 2)) < 30
    assert np.sqrt(np.mean(decoded[speech_from:] ** 2)) > 300


def test_decrypt_refuses_a_wrong_key_a_changed_file_and_an_existing_output(
        sealed_call: SealedCall, tmp_path: Path) -> None:
    key, sealed = sealed_call.key, sealed_call.sealed
    other, _ = make_key(tmp_path)
    result = linerec("decrypt", "-i", str(other), str(sealed), "-o", str(tmp_path / "x.opus"))
    assert result.returncode == 1 and "cannot be decrypted with this key" in result.stderr
    assert not list(tmp_path.glob("*x.opus*"))

    # A sealed file swapped since its receipt was sealed is not opened at all.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(sealed, copy)
    shutil.copy(sealed.with_name(sealed.name.split(".")[0] + ".json"), copy)
    changed = copy / sealed.name
    changed.write_bytes(changed.read_bytes()[:-1] + b"\0")
    result = linerec("decrypt", "-i", str(key), str(copy))
    assert result.returncode == 1 and "differs from the sha256 in its receipt" in result.stderr
    assert not list(copy.glob("*.opus"))

    # A file in the way is never overwritten; a key file that is not one is a usage error.
    (copy / sealed.name).write_bytes(sealed.read_bytes())
    (copy / sealed.name.removesuffix(".age")).write_bytes(b"mine")
    result = linerec("decrypt", "-i", str(key), str(copy / sealed.name))
    assert result.returncode == 1 and "exists already" in result.stderr
    assert (copy / sealed.name.removesuffix(".age")).read_bytes() == b"mine"
    result = linerec("decrypt", "-i", str(sealed), str(copy))
    assert result.returncode == 2 and "--identity" in result.stderr


def test_export_find_delete_and_retention_handle_sealed_recordings(
        sealed_call: SealedCall, tmp_path: Path) -> None:
    folder, key, _, events = sealed_call
    storage = storage_copy(folder, tmp_path)
    call_id = events[0]["call_id"]
    sealed_name = f"{call_id}.opus.age"

    # find: the duration comes from the receipt (the file cannot be read on the box).
    found = linerec("recordings", "find", "--storage", str(storage), "--json")
    (row,) = json.loads(found.stdout)
    assert row["recording"].endswith(sealed_name) and row["duration_s"] > 8

    # export copies the sealed file as it is; the export decrypts off the box, checked
    # against the receipt that travels with it.
    out = tmp_path / "request-1.zip"
    result = linerec("recordings", "export", call_id, "--storage", str(storage), "-o", str(out),
                     "--reason", "request R-1")
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(out) as zipped:
        assert sorted(zipped.namelist()) == sorted([sealed_name, f"{call_id}.json",
                                                    "index.csv"])
        assert zipped.getinfo(sealed_name).compress_type == zipfile.ZIP_STORED
        index = zipped.read("index.csv").decode()
        zipped.extractall(tmp_path / "unzipped")
    (sealed,) = storage.rglob(sealed_name)
    assert f"{sealed_name},{file_sha256(sealed)}" in index
    result = linerec("decrypt", "-i", str(key), str(tmp_path / "unzipped"))
    assert result.returncode == 0 and "sha256 as in its receipt" in result.stdout
    opus_ok(tmp_path / "unzipped" / f"{call_id}.opus")

    # delete removes the sealed file and the receipt; the chain stays whole.
    deleted = linerec("recordings", "delete", call_id, "--storage", str(storage),
                      "--reason", "erasure R-2")
    assert deleted.returncode == 0, deleted.stderr
    assert not list(storage.rglob(f"{call_id}*"))
    entry = LedgerState.load(Ledger(storage)).deleted[call_id]
    assert sorted(entry["files"]) == sorted([sealed_name, f"{call_id}.json"])
    assert linerec("verify", str(storage)).returncode == 0

    # Retention deletes a sealed call like any other.
    storage = storage_copy(folder, tmp_path / "again")
    assert archive.sweep_retention(storage, today=date(2099, 1, 1)) == [call_id]
    assert not list(storage.rglob(f"{call_id}*"))
    assert linerec("verify", str(storage)).returncode == 0


def test_verify_finds_a_changed_sealed_file_and_a_plaintext_left_beside_it(
        sealed_call: SealedCall, tmp_path: Path) -> None:
    folder, key = sealed_call.folder, sealed_call.key
    storage = storage_copy(folder, tmp_path)
    (sealed,) = storage.rglob("*.opus.age")
    plain = sealed.with_name(sealed.name.removesuffix(".age"))
    subprocess.run(["age", "-d", "-i", str(key), "-o", str(plain), str(sealed)], check=True)
    sealed.write_bytes(sealed.read_bytes() + b"\0")
    result = linerec("verify", str(storage))
    assert result.returncode == 1
    assert f"{sealed}: the recording differs from the sha256 in its receipt" in result.stdout
    assert f"{plain}: a recording its receipt does not name" in result.stdout


def test_sigkill_mid_recording_is_sealed_at_the_next_start(tmp_path: Path,
                                                           caller_speech: Path) -> None:
    key, public = make_key(tmp_path)
    config = sim_config(tmp_path, extra=encryption_table(public))
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(9.0, "audio", file=str(caller_speech)), duration=60.0)
    daemon = [sys.executable, "-m", "linerec.daemon.cli", "simulate", "--realtime",
              "--config", str(config), "--scenario", str(scenario)]
    with subprocess.Popen(daemon, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        # Killed (as a power cut would stop it) three seconds into the recording.
        assert any('"recording_started"' in line for line in proc.stdout)
        time.sleep(3.0)
        proc.kill()
    storage = tmp_path / "recordings"
    (part,) = storage.rglob("*.opus.part")  # the plaintext, while the call records

    (recovered,) = start_again(tmp_path, config)
    assert recovered["event"] == "recording_recovered"
    sealed = Path(recovered["file"])
    assert sealed == part.with_name(part.name.removesuffix(".part") + ".age")
    assert [p.name for p in sealed.parent.iterdir() if ".opus" in p.name] == [sealed.name]

    (receipt,) = receipts(tmp_path)
    assert receipt["state"] == "interrupted"
    recording = receipt["recording"]
    assert recording["status"] == "interrupted" and recording["file"] == sealed.name
    assert recording["sha256"] == file_sha256(sealed)
    assert recording["encrypted"] == {"format": "age", "recipients": [public]}
    opened = tmp_path / "opened.opus"
    assert linerec("decrypt", "-i", str(key), str(sealed), "-o", str(opened)).returncode == 0
    opus_ok(opened)
    assert abs(len(decode(opened, tmp_path)) / RATE - recording["duration_s"]) < 0.001
    assert linerec("verify", str(storage)).returncode == 0


def closed_plaintext(storage: Path, public: str) -> tuple[Path, Path]:
    """A recording closed whole, with the receipt written when it began (``open``, naming
    the sealed file to come): what a crash between the close and the call's end leaves."""
    call_id = new_call_id("line1", STARTED)
    folder = call_folder(storage, STARTED)
    folder.mkdir(parents=True, exist_ok=True)
    recording = RecordingFile(folder / f"{call_id}.opus", rate=8000, bitrate=12000,
                              complexity=9, page_interval_s=0.8, fsync_interval_s=0.8,
                              vendor="linerec test", tags={"call_id": call_id})
    t = np.arange(3 * 8000) / 8000
    recording.write((6000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16))
    recording.close()
    receipt = folder / f"{call_id}.json"
    write_receipt(receipt, {
        "call_id": call_id, "state": "open", "line": "line1",
        "recording": {"file": f"{call_id}.opus.age", "status": "recording", "first_sample": 0,
                      "encrypted": {"format": "age", "recipients": [public]}}})
    return recording.path, receipt


def test_a_crash_during_sealing_is_finished_at_the_next_start(tmp_path: Path) -> None:
    identity = x25519.Identity.generate()
    public = str(identity.to_public())
    # Cut off while the sealed file was being written: the plaintext is still whole.
    plain, receipt_file = closed_plaintext(tmp_path, public)
    cut_off = plain.with_name(plain.name + ".age.tmp")
    cut_off.write_bytes(b"age-encryption.org/v1\n-> X25519 cut off")
    # Cut off after the sealed file was renamed and the plaintext removed.
    other_plain, other_receipt = closed_plaintext(tmp_path, public)
    subprocess.run(["age", "-r", public, "-o", str(other_plain) + ".age", str(other_plain)],
                   check=True)
    other_plain.unlink()

    assert recover_interrupted(tmp_path, EventBus(), recipients=[public]) == 2
    assert sorted(p.name for p in plain.parent.iterdir()) == sorted([
        plain.name + ".age", receipt_file.name, other_plain.name + ".age", other_receipt.name])
    for path in (receipt_file, other_receipt):
        receipt = json.loads(path.read_text())
        recording = receipt["recording"]
        sealed = path.with_name(recording["file"])
        assert receipt["state"] == "interrupted" and recording["status"] == "complete"
        assert sealed.name.endswith(".opus.age")
        assert recording["sha256"] == file_sha256(sealed)
    # The plaintext the crash left is sealed, and its length is known from before.
    recording = json.loads(receipt_file.read_text())["recording"]
    assert recording["duration_s"] == 3.0
    assert recording["encrypted"] == {"format": "age", "recipients": [public]}
    key = tmp_path / "key.txt"
    key.write_text(f"{identity}\n")
    opened = tmp_path / "opened.opus"
    subprocess.run(["age", "-d", "-i", str(key), "-o", str(opened), str(plain) + ".age"],
                   check=True)
    opus_ok(opened)
    assert recover_interrupted(tmp_path, EventBus(), recipients=[public]) == 0


@pytest.mark.parametrize(("recipients", "key", "message"), [
    (["age1notakey"], "encryption.recipients[0]", "not a valid age public key"),
    ([None, "AGE-SECRET-KEY-1QQQ"], "encryption.recipients[1]", "this is a private key"),
    ([None, "ssh-ed25519 AAAAC3Nza"], "encryption.recipients[1]", "not an age public key"),
    ([], "encryption.recipients", "at least one"),
])
def test_a_bad_recipient_is_a_config_error_naming_the_key(
        tmp_path: Path, recipients: list[str | None], key: str, message: str) -> None:
    good = str(x25519.Identity.generate().to_public())
    config = sim_config(tmp_path, extra=encryption_table(*(r or good for r in recipients)))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.key == key and message in caught.value.problem
    result = linerec("check-config", str(config))
    assert result.returncode == 2 and f": {key}: " in result.stderr


def test_a_recording_that_cannot_be_sealed_stays_plain_and_named(tmp_path: Path) -> None:
    plain, receipt_file = closed_plaintext(tmp_path, "age1...")
    errors: list[dict[str, Any]] = []
    events = EventBus([type("Sink", (), {"publish": staticmethod(errors.append)})()])
    # A recipient that is no key (the config loader refuses one; here it stands for any
    # failure of the sealing, a full disk say): the audio is kept, unencrypted, and named.
    assert recover_interrupted(tmp_path, events, recipients=["age1notakey"]) == 1
    (error,) = errors
    assert error["event"] == "error" and "stays unencrypted" in error["message"]
    recording = json.loads(receipt_file.read_text())["recording"]
    assert recording["file"] == plain.name and "encrypted" not in recording
    assert recording["sha256"] == file_sha256(plain)
    assert not list(tmp_path.rglob("*.age*"))
