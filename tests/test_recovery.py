"""Start-up recovery of what a crash left: cut-off recordings, open receipts, junk."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from linerec.audio.recording import RecordingFile
from linerec.daemon.events import EventBus
from linerec.daemon.paths import call_folder, new_call_id
from linerec.daemon.receipt import write_receipt
from linerec.daemon.recovery import recover_interrupted

STARTED = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class Collect:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def interrupted_recording(storage: Path, seconds: float, cut: int = 0) -> Path:
    """A recording as a SIGKILL leaves it: a .part, its last bytes possibly cut off."""
    call_id = new_call_id("line1", STARTED)
    folder = call_folder(storage, STARTED)
    folder.mkdir(parents=True, exist_ok=True)
    recording = RecordingFile(folder / f"{call_id}.opus", rate=8000, bitrate=12000,
                              complexity=9, page_interval_s=1.0, fsync_interval_s=1.0,
                              vendor="linerec test", tags={"line": "line1", "call_id": call_id})
    t = np.arange(round(seconds * 8000)) / 8000
    recording.write((6000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16))
    write_receipt(folder / f"{call_id}.json", {
        "call_id": call_id, "state": "open", "line": "line1",
        "recording": {"file": f"{call_id}.opus", "status": "recording", "first_sample": 0}})
    part = recording.part_path
    if cut:
        part.write_bytes(part.read_bytes()[:-cut])
    return part


def test_a_cut_off_recording_is_made_playable(tmp_path: Path) -> None:
    part = interrupted_recording(tmp_path, 5.5, cut=10)
    collect = Collect()
    assert recover_interrupted(tmp_path, EventBus([collect])) == 1
    final = part.with_name(part.name.removesuffix(".part"))
    assert final.is_file() and not part.exists()
    assert subprocess.run(["opusinfo", str(final)], capture_output=True,
                          check=False).returncode == 0
    (event,) = collect.events
    assert event["event"] == "recording_recovered" and event["line"] == "line1"
    # Pages go out every second; the fifth was cut: four whole seconds, less the pre-skip.
    assert event["duration_s"] == round((4 * 48000 - 312) / 48000, 3)
    receipt = json.loads(final.with_suffix(".json").read_text())
    assert receipt["state"] == "interrupted" and receipt["recording"]["status"] == "interrupted"
    assert receipt["recording"]["first_sample"] == 0  # what the open receipt knew is kept
    assert recover_interrupted(tmp_path, EventBus()) == 0


def test_headers_only_and_unreadable_parts(tmp_path: Path) -> None:
    empty = interrupted_recording(tmp_path, 0.5)  # no page of audio yet
    junk = interrupted_recording(tmp_path, 3.0)
    junk.write_bytes(b"not an ogg stream at all")
    collect = Collect()
    assert recover_interrupted(tmp_path, EventBus([collect])) == 2
    assert not empty.exists() and not empty.with_name(empty.name.removesuffix(".part")).exists()
    kept = junk.with_name(junk.name + ".unreadable")
    assert kept.read_bytes() == b"not an ogg stream at all"
    kinds = sorted(e["event"] for e in collect.events)
    assert kinds == ["error", "recording_recovered"]
    receipts = {p.name: json.loads(p.read_text()) for p in tmp_path.rglob("*.json")}
    statuses = sorted(r["recording"]["status"] for r in receipts.values())
    assert statuses == ["interrupted", "unrecoverable"]
    assert all(r["state"] == "interrupted" for r in receipts.values())


def test_open_receipts_without_a_recording_are_closed(tmp_path: Path) -> None:
    call_id = new_call_id("line2", STARTED)
    path = call_folder(tmp_path, STARTED) / f"{call_id}.json"
    write_receipt(path, {"call_id": call_id, "state": "open", "recording": None,
                         "disclosure": {"status": "playing"}})
    broken = call_folder(tmp_path, STARTED) / f"{new_call_id('line2', STARTED)}.json"
    broken.write_text("{ cut off")
    assert recover_interrupted(tmp_path, EventBus()) == 1
    receipt = json.loads(path.read_text())
    assert receipt["state"] == "interrupted" and receipt["end_reason"] == "interrupted"
    # Its bytes are moved aside for a person (never guessed at); the call still has a
    # receipt, closed as interrupted, so that the next start finds nothing to trip over.
    assert broken.with_name(broken.name + ".corrupt").read_text() == "{ cut off"
    assert json.loads(broken.read_text())["state"] == "interrupted"


def test_a_part_with_nothing_whole_on_disk_is_empty_not_unreadable(tmp_path: Path) -> None:
    part = interrupted_recording(tmp_path, 0.5)
    part.write_bytes(b"Og")  # a power cut right after the file was made
    collect = Collect()
    assert recover_interrupted(tmp_path, EventBus([collect])) == 1
    assert not part.exists() and not list(tmp_path.rglob("*.unreadable"))
    (event,) = collect.events
    assert event["event"] == "recording_recovered" and event["file"] is None
