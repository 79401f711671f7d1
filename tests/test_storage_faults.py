"""Storage faults while the daemon runs: the disk filling up for real (ENOSPC), the storage
turning read-only, unmounted or removed; and coming back.

The real daemon on the simulated HAT, real libopus, real file systems: a size-limited tmpfs
and bind mounts, in a mount namespace of the test's own (``unshare --mount``, as root), so
nothing outside the test sees a mount. This file is also the program that runs inside the
namespace (``python test_storage_faults.py PLAN``): it plays a scenario through
``run_simulation`` and acts on the storage when given events go out (frees space, remounts,
unmounts), then copies the storage out where the test can read it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from simhelpers import RATE, receipts, sim_config, step, write_scenario

from linerec.daemon.config import StorageGuardConfig, load_config
from linerec.daemon.events import EventBus
from linerec.daemon.ledger import Ledger, LedgerState
from linerec.daemon.paths import RESERVE_NAME
from linerec.daemon.simulate import run_simulation
from linerec.daemon.storage_guard import (
    RESERVE_BYTES,
    RESUME_BYTES,
    SpaceLevel,
    StorageGuard,
)
from linerec.hw.scenario import load_scenario
from linerec.hw.sim import SimulatedHat

GUARD = "[storage_guard]\nlow_mb = 0\nfloor_mb = 0\ncheck_interval_s = 1.0\n"
"""No floor (the guard's forecast would turn calls away long before the disk is full), and
the shortest interval, so that a stall of the scenario lets the guard look."""
NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root for a private mount namespace")


# ---- inside the namespace ---------------------------------------------------------------

class Sink:
    """Every event with the monotonic time it went out; runs the plan's actions on the
    events they wait for (on the engine thread, which waits meanwhile)."""

    def __init__(self, actions: list[dict[str, Any]]) -> None:
        self.events: list[dict[str, Any]] = []
        self.actions = actions
        self.seen: dict[tuple[str, str | None], int] = {}

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append({**event, "wall": time.monotonic()})
        key = (event["event"], event["line"])
        self.seen[key] = self.seen.get(key, 0) + 1
        for action in self.actions:
            if (action["event"], action.get("line")) == key \
                    and action.get("nth", 1) == self.seen[key]:
                free = _free(action.get("measure"))
                for argv in action["run"]:
                    subprocess.run(argv, check=True)
                self.events.append({"event": "test_action", "line": None, "free_before": free,
                                    "did": action["run"], "wall": time.monotonic()})


def _free(path: str | None) -> int | None:
    if path is None:
        return None
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def play(plan: dict[str, Any]) -> None:
    """Run the plan's simulation; write its events (and copy its storage) out."""
    config = load_config(Path(plan["config"]))
    filler = plan.get("filler")
    if filler:
        # Leave ``leave_bytes`` free after the daemon has set its reserve aside.
        stats = os.statvfs(config.storage)
        size = stats.f_bavail * stats.f_frsize - RESERVE_BYTES - filler["leave_bytes"]
        fd = os.open(filler["path"], os.O_WRONLY | os.O_CREAT, 0o600)
        os.posix_fallocate(fd, 0, size)
        os.close(fd)
    scenario = load_scenario(Path(plan["scenario"]), [line.name for line in config.line])
    sink = Sink(plan.get("actions", []))
    run_simulation(SimulatedHat(config, scenario, workdir=Path(plan["workdir"])), [sink])
    Path(plan["events_out"]).write_text(json.dumps(sink.events))
    if plan.get("copy_to"):
        shutil.copytree(config.storage, plan["copy_to"])


# ---- the tests' side --------------------------------------------------------------------

def in_namespace(tmp_path: Path, mounts: str, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``play(plan)`` in a mount namespace of its own, after the shell ``mounts``."""
    plan = {"workdir": str(tmp_path / "work"), "events_out": str(tmp_path / "events.json"),
            **plan}
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
         f'{mounts}\nexec "$@"', "sh", sys.executable, __file__, str(plan_path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "events.json").read_text())


def of(events: list[dict[str, Any]], kind: str, line: str | None = "line1"
       ) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind and e["line"] == line]


def call_events(events: list[dict[str, Any]], call_id: str) -> list[str]:
    return [e["event"] for e in events if e.get("call_id") == call_id]


def opusinfo_clean(path: Path) -> float:
    """opusinfo reads it without a warning; returns its playback length (seconds)."""
    info = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True, check=False)
    assert info.returncode == 0 and "WARNING" not in info.stdout, info.stdout
    length = next(line for line in info.stdout.splitlines() if "Playback length" in line)
    minutes, seconds = length.split(":", 1)[1].strip().split("m:")
    return int(minutes) * 60 + float(seconds.removesuffix("s"))


def chain_whole(storage: Path) -> LedgerState:
    state = LedgerState.load(Ledger(storage))
    assert state.problems == []
    return state


def call(line: str, ring: float, offhook: float, onhook: float, speech: Path | None = None,
         speak_at: float | None = None) -> str:
    body = step(ring, "ring", line) + step(offhook, "offhook", line)
    if speech is not None:
        body += step(speak_at if speak_at is not None else offhook + 8.5, "audio", line,
                     file=str(speech))
    return body + step(onhook, "onhook", line)


LEAVE = 40 * 1024
"""Room left past the reserve, before the first call: two open receipts, then about 10 s
of two lines' audio at 12 kbit/s."""


@NEEDS_ROOT
def test_disk_full_closes_recordings_with_what_they_had_and_recording_resumes(
        tmp_path: Path, caller_speech: Path) -> None:
    """A 1 MB tmpfs as the storage, filled up to 40 kB past the reserve, the guard's floor
    at 0: two lines record at once until a write fails with ENOSPC. Both recordings are
    closed there with all they had (playable, no .part), their receipts sealed with
    stop_reason storage_full; storage_full and error go out; the calls go on unrecorded; a
    call in the full storage is turned away at its start (rule storage_full). Space is
    freed: the guard makes the reserve again and the next call is recorded."""
    storage = tmp_path / "recordings"
    storage.mkdir()
    copy = tmp_path / "copy"
    filler = storage / "filler"
    config = sim_config(tmp_path, extra=GUARD)
    scenario = write_scenario(tmp_path, (
        call("line1", 0.5, 1.0, 34.0, caller_speech)
        + call("line2", 0.7, 1.5, 35.0, caller_speech)
        + call("line1", 36.0, 36.5, 40.0)              # storage full: turned away
        + step(41.0, "stall", "line1", seconds=1.6)    # (space freed at its end) the guard looks
        + call("line1", 42.0, 42.5, 58.0, caller_speech)), duration=60.0)
    events = in_namespace(tmp_path, f'mount -t tmpfs -o size=1m,mode=0700 tmpfs "{storage}"', {
        "config": str(config), "scenario": str(scenario), "copy_to": str(copy / "recordings"),
        "filler": {"path": str(filler), "leave_bytes": LEAVE},
        "actions": [{"event": "call_ended", "line": "line1", "nth": 2, "measure": str(storage),
                     "run": [["rm", str(filler)]]}]})

    # Both recordings ended at the ENOSPC, each closed with everything it had been handed.
    first, second = of(events, "recording_stopped"), of(events, "recording_stopped", "line2")
    assert [e["reason"] for e in first + second] == ["storage_full", "call_ended",
                                                     "storage_full"]
    full = [e for e in events if e["event"] == "storage_full"]
    assert len(full) == 1 and f"{storage} is full" in full[0]["message"]
    assert "No space left on device" in full[0]["message"]
    errors = [e for e in events if e["event"] == "error"]
    assert {e["line"] for e in errors} == {"line1", "line2"}
    assert all(f"{storage} is full" in e["message"] and "goes on unrecorded" in e["message"]
               for e in errors), errors
    assert not any("cannot write the receipt" in e["message"] for e in errors)

    stored = {r["call_id"]: r for r in receipts(copy)}
    assert not list(copy.rglob("*.part")) and not list(copy.rglob("*.tmp"))
    kept_s = []
    for stopped in (first[0], second[0]):
        receipt = stored[stopped["call_id"]]
        recording = receipt["recording"]
        assert receipt["state"] == "closed" and receipt["end_reason"] == "onhook"
        assert recording["status"] == "complete" and recording["stop_reason"] == "storage_full"
        path = copy.joinpath("recordings", *Path(stopped["file"]).relative_to(storage).parts)
        assert abs(opusinfo_clean(path) - recording["duration_s"]) < 0.01
        assert abs(recording["end_sample"] - recording["first_sample"]
                   - recording["duration_s"] * RATE) < RATE / 1000
        # Up to the sample where the write failed: the samples the error names.
        failed_at = next(e for e in errors if e["call_id"] == stopped["call_id"])["sample"]
        assert recording["end_sample"] == failed_at == stopped["sample"]
        kept_s.append(recording["duration_s"])
        (ended,) = [e for e in events if e["event"] == "call_ended"
                    and e["call_id"] == stopped["call_id"]]
        assert ended["recorded"] is True
    # 40 kB of room for two lines at 12 kbit/s: some seconds each, not the call.
    assert all(10.0 < kept < 25.0 for kept in kept_s), kept_s

    # Turned away while full; recorded again once space came back.
    turned_away, resumed = of(events, "call_ended")[1:]
    assert turned_away["rule"] == "storage_full" and turned_away["recorded"] is False
    assert call_events(events, turned_away["call_id"]) == ["call_started", "call_ended"]
    assert stored[turned_away["call_id"]]["rule"] == "storage_full"
    assert resumed["recorded"] is True and resumed["rule"] is None
    assert stored[resumed["call_id"]]["recording"]["stop_reason"] == "call_ended"
    # The guard leaves FULL once the reserve is made again; on this 1 MB disk that is LOW
    # (the levels' 20 MB margin above low_mb = 0): an alarm, but recording.
    levels = [e for e in events if e["event"].startswith("storage_")]
    assert [e["event"] for e in levels] == ["storage_full", "storage_low"]
    freed = next(e for e in events if e["event"] == "test_action")
    resumed_after_s = levels[1]["wall"] - freed["wall"]
    assert 0 < resumed_after_s < 1.6  # the guard's next look (check_interval_s = 1)
    assert (copy / "recordings" / RESERVE_NAME).stat().st_size == RESERVE_BYTES  # made again
    # What closing two recordings, sealing their receipts and a turned-away call's took
    # of the reserve (tmpfs counts whole 4 KiB pages).
    used = RESERVE_BYTES - freed["free_before"]
    assert 0 < used <= RESERVE_BYTES // 4, used
    assert chain_whole(copy / "recordings").head.seq == 4
    print(f"\nENOSPC at {first[0]['sample'] / RATE:.2f} s: kept {kept_s} s (all audio up to "
          f"it); reserve used {used} of {RESERVE_BYTES} bytes; recording again "
          f"{resumed_after_s:.2f} s after the space was freed")


def test_reserve_covers_closing_and_sealing_with_room_to_spare(tmp_path: Path) -> None:
    """What one line's closing takes from the reserve: measured on a tmpfs (4 KiB pages), in
    the previous test's run. Here: the reserve's own accounting, on this disk."""
    from linerec.daemon.storage_guard import StorageState

    state = StorageState(tmp_path)
    assert state.ensure_reserve(free=0)
    reserve = tmp_path / RESERVE_NAME
    assert reserve.stat().st_size == RESERVE_BYTES
    assert reserve.stat().st_blocks * 512 >= RESERVE_BYTES  # really allocated, not sparse
    assert reserve.stat().st_mode & 0o777 == 0o600
    assert state.write_failed(OSError(28, "No space left on device"))
    assert not reserve.exists() and state.refusing
    # Made again only once there is room to record as well.
    assert not state.ensure_reserve(free=RESUME_BYTES - 1) and not reserve.exists()
    assert state.ensure_reserve(free=RESUME_BYTES) and reserve.exists()
    assert not state.released
    assert not state.write_failed(OSError(30, "Read-only file system"))
    assert state.refusing and reserve.exists()  # not full: nothing to give up


    class Line:
        recording = True

        def recording_open(self) -> bool:
            return self.recording

    # A recording open when the storage filled up must close in the reserve's room before
    # the guard takes that room back; inodes run out while bytes look free.
    line = Line()
    state.watch(line.recording_open)
    state.failure = None
    assert state.write_failed(OSError(28, "No space left on device"))
    assert not state.ensure_reserve(free=10 * RESUME_BYTES) and state.held()
    line.recording = False
    assert not state.ensure_reserve(free=10 * RESUME_BYTES, inodes=0)
    assert state.ensure_reserve(free=10 * RESUME_BYTES, inodes=1000) and not state.held()


def around_faults(*faults: float) -> str:
    """A recorded call, then for each time in ``faults``: a call rings there (the test acts
    on the storage as its ringing goes out), the line stalls 1.3 s of wall time (so that the
    guard, looking every second, sees what was done) and the call is answered; after the
    last, a call recorded."""
    body = call("line1", 0.5, 1.0, 12.0)
    for at in faults:
        body += step(at, "ring", "line1") + step(at + 0.3, "stall", "line1", seconds=1.3)
        body += step(at + 1.0, "offhook", "line1") + step(at + 4.0, "onhook", "line1")
    return body


@NEEDS_ROOT
def test_read_only_and_unmounted_storage_fail_closed_and_recover(tmp_path: Path) -> None:
    """The storage is its own file system (a tmpfs, bind-mounted). Between calls it is
    remounted read-only (as ext4 does after disk errors), then made writable, then unmounted
    (its empty mount point left), then mounted again. Each fault: a storage_full event
    naming the folder and what to do, the call turned away at its start, no crash; each
    return: storage_ok and the next call recorded."""
    card, storage = tmp_path / "card", tmp_path / "recordings"
    card.mkdir()
    storage.mkdir()
    copy = tmp_path / "copy"
    config = sim_config(tmp_path, extra=GUARD)
    scenario = write_scenario(tmp_path, around_faults(14.0, 20.0, 26.0, 32.0)
                              + step(38.0, "ring", "line1") + step(38.5, "offhook", "line1")
                              + step(48.0, "onhook", "line1"), duration=49.0)
    remount = ["mount", "-o", "remount,bind,{}", str(storage)]
    events = in_namespace(tmp_path, f'mount -t tmpfs -o size=64m,mode=0700 tmpfs "{card}"\n'
                          f'mount --bind "{card}" "{storage}"', {
        "config": str(config), "scenario": str(scenario), "copy_to": str(copy / "recordings"),
        "actions": [
            {"event": "ringing", "line": "line1", "nth": 2,
             "run": [[a.format("ro") for a in remount]]},
            {"event": "ringing", "line": "line1", "nth": 3,
             "run": [[a.format("rw") for a in remount]]},
            {"event": "ringing", "line": "line1", "nth": 4, "run": [["umount", str(storage)]]},
            {"event": "ringing", "line": "line1", "nth": 5,
             "run": [["mount", "--bind", str(card), str(storage)]]}]})
    # The calls after a return were not turned away: their disclosure played (they hung up
    # before it ended, as the short calls of around_faults do).
    ended = of(events, "call_ended")
    assert [(e["recorded"], e["rule"]) for e in ended] == [
        (True, None), (False, "storage_full"), (False, None), (False, "storage_full"),
        (False, None), (True, None)], ended
    for back in (ended[2], ended[4]):
        assert "disclosure_started" in call_events(events, back["call_id"])
    storage_events = [e for e in events if e["event"].startswith("storage_")]
    assert [e["event"] for e in storage_events] == ["storage_full", "storage_ok"] * 2
    read_only, unmounted = storage_events[0]["message"], storage_events[2]["message"]
    assert f"{storage} is read-only" in read_only and "fsck" in read_only
    assert f"{storage} is no longer mounted" in unmounted and "mount it again" in unmounted
    # The turned-away calls' receipts are not written where they cannot be, or should not
    # be (an empty mount point): one error each says so; call_ended keeps the record.
    errors = [e for e in events if e["event"] == "error"]
    assert [e["call_id"] for e in errors] == [ended[1]["call_id"], ended[3]["call_id"]]
    assert all("cannot write the receipt" in e["message"] for e in errors)
    assert "read-only" in errors[0]["message"] and "no longer mounted" in errors[1]["message"]
    # Nothing went to the bare mount point meanwhile; the card holds every call.
    assert not any(storage.iterdir())
    stored = receipts(copy)
    assert {r["call_id"] for r in stored} == {e["call_id"] for e in ended} - {
        ended[1]["call_id"], ended[3]["call_id"]}
    for recorded in (e for e in ended if e["recorded"]):
        opusinfo_clean(next(copy.rglob(f"{recorded['call_id']}.opus")))
    assert chain_whole(copy / "recordings").head.seq == 4


def test_removed_storage_folder_fails_closed_and_recovers(tmp_path: Path) -> None:
    """The storage folder goes away between calls (moved aside: to the daemon, removed) and
    comes back: the guard names the folder and what to do, the call meanwhile is turned
    away, no folder is made in its place, and recording resumes."""
    storage = tmp_path / "recordings"
    aside = tmp_path / "aside"
    storage.mkdir()
    config = sim_config(tmp_path, extra=GUARD)
    scenario = write_scenario(tmp_path, around_faults(14.0, 20.0)
                              + step(26.0, "ring", "line1") + step(26.5, "offhook", "line1")
                              + step(36.0, "onhook", "line1"), duration=37.0)
    sink = Sink([
        {"event": "ringing", "line": "line1", "nth": 2,
         "run": [["mv", str(storage), str(aside)]]},
        {"event": "ringing", "line": "line1", "nth": 3,
         "run": [["mv", str(aside), str(storage)]]}])
    run_simulation(SimulatedHat(load_config(config), load_scenario(scenario, ["line1", "line2"]),
                                workdir=tmp_path / "work"), [sink])
    events = sink.events
    ended = of(events, "call_ended")
    assert [(e["recorded"], e["rule"]) for e in ended] == [
        (True, None), (False, "storage_full"), (False, None), (True, None)], ended
    storage_events = [e for e in events if e["event"].startswith("storage_")]
    assert [e["event"] for e in storage_events] == ["storage_full", "storage_ok"]
    gone = storage_events[0]["message"]
    assert f"{storage} cannot be measured" in gone and "mount it again or create" in gone
    (error,) = [e for e in events if e["event"] == "error"]
    assert error["call_id"] == ended[1]["call_id"] and "cannot write the receipt" in \
        error["message"] and "cannot be measured" in error["message"]
    stored = receipts(tmp_path)
    assert {r["call_id"] for r in stored} == {e["call_id"] for e in ended} - {
        ended[1]["call_id"]}
    assert "disclosure_started" in call_events(events, ended[2]["call_id"])
    for recorded in (ended[0], ended[3]):
        opusinfo_clean(next(storage.rglob(f"{recorded['call_id']}.opus")))
    assert chain_whole(storage).head.seq == 3



def test_storage_folder_removed_as_a_call_rings_is_not_made_again(tmp_path: Path) -> None:
    """The folder goes away as a call rings, before the guard's next look: the call's writes
    do not make the storage again (a new audit log there would fork the receipt chain, and
    its recording would be where nobody looks); the call is not recorded, and the guard,
    woken by the failed write, says why."""
    storage = tmp_path / "recordings"
    aside = tmp_path / "aside"
    storage.mkdir()
    config = sim_config(tmp_path, extra=GUARD)
    scenario = write_scenario(tmp_path, call("line1", 0.5, 1.0, 12.0)
                              + call("line1", 14.0, 14.3, 30.0), duration=31.0)
    sink = Sink([{"event": "ringing", "line": "line1", "nth": 2,
                  "run": [["mv", str(storage), str(aside)]]}])
    run_simulation(SimulatedHat(load_config(config), load_scenario(scenario, ["line1", "line2"]),
                                workdir=tmp_path / "work"), [sink])
    events = sink.events
    assert not storage.exists()  # nothing made it again
    ended = of(events, "call_ended")
    assert [(e["recorded"], e["rule"]) for e in ended] == [(True, None), (False, "storage_full")]
    assert "recording_started" not in call_events(events, ended[1]["call_id"])
    full = [e for e in events if e["event"] == "storage_full"]
    assert len(full) == 1 and f"{storage} cannot be measured" in full[0]["message"]
    assert [p.stem for p in aside.glob("*/*/*/*.json")] == [ended[0]["call_id"]]
    assert chain_whole(aside).head.seq == 1



def test_a_second_cause_of_full_storage_is_told_with_its_own_fix(tmp_path: Path) -> None:
    """Under the floor, then gone: each cause needs its own fix, so each is a storage_full
    of its own; the same cause is told once."""
    storage = tmp_path / "recordings"
    storage.mkdir()
    told: list[dict[str, Any]] = []

    class Sink:
        def publish(self, event: dict[str, Any]) -> None:
            told.append(event)

    huge = 10**9  # MB: any disk is under this floor
    guard = StorageGuard(storage, StorageGuardConfig(low_mb=huge, floor_mb=huge),
                         EventBus([Sink()]))
    assert guard.check() is SpaceLevel.FULL
    storage.rename(tmp_path / "aside")
    assert guard.check() is SpaceLevel.FULL
    assert guard.check() is SpaceLevel.FULL
    assert [e["event"] for e in told] == ["storage_full", "storage_full"]
    assert "under the floor" in told[0]["message"]
    assert "cannot be measured" in told[1]["message"]


if __name__ == "__main__":
    play(json.loads(Path(sys.argv[1]).read_text()))
