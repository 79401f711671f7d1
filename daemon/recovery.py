"""Start-up recovery: what a crash or power cut left behind is made whole and reported.

A recording interrupted mid-call is a ``<call_id>.opus.part`` whose last page may be cut
off. It is cut back to its last whole page, that page is marked as the end of the stream,
and it gets its final name; its receipt says ``interrupted``; a ``recording_recovered``
event goes out. A receipt still ``open`` without a recording (the crash came before or
during the disclosure) is closed as ``interrupted`` too.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from linerec.audio.ogg import RepairError, repair_stream
from linerec.audio.recording import PART_SUFFIX, fsync_dir
from linerec.daemon.events import EventBus, EventKind, iso_ms, make_event
from linerec.daemon.paths import RECEIPT_SUFFIX, RECORDING_SUFFIX, check_call_id
from linerec.daemon.receipt import write_receipt

logger = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"


def recover_interrupted(storage: Path, events: EventBus, now: datetime | None = None) -> int:
    """Recover every interrupted call under ``storage``; returns how many."""
    now = now or datetime.now(UTC)
    recovered = 0
    for part in sorted(storage.glob(f"*/*/*/*{RECORDING_SUFFIX}{PART_SUFFIX}")):
        if _recover_recording(part, events, now):
            recovered += 1
    for receipt_file in sorted(storage.glob(f"*/*/*/*{RECEIPT_SUFFIX}")):
        receipt = _load(receipt_file)
        if receipt.get("state") == "open":
            _close_receipt(receipt_file, receipt, now)
            recovered += 1
    return recovered


def _recover_recording(part: Path, events: EventBus, now: datetime) -> bool:
    name = part.name[: -len(RECORDING_SUFFIX + PART_SUFFIX)]
    try:
        call_id = check_call_id(name)
    except ValueError:
        logger.warning("%s is not named like a linerec recording; left alone", part)
        return False
    final = part.with_name(call_id + RECORDING_SUFFIX)
    receipt_file = part.with_name(call_id + RECEIPT_SUFFIX)
    receipt = _load(receipt_file)
    recording: dict[str, Any] = dict(receipt.get("recording") or {})
    try:
        stream = repair_stream(part)
    except (RepairError, OSError, ValueError) as exc:
        # Keep the bytes for a person to look at; never loop on them at every start.
        kept = part.with_name(part.name + UNREADABLE_SUFFIX)
        os.replace(part, kept)
        recording.update(status="unrecoverable", file=kept.name, error=str(exc))
        line = receipt.get("line")
        events.emit(make_event(EventKind.ERROR, line=line, call_id=call_id, ts=now,
                               message=f"the interrupted recording {part} could not be "
                               f"recovered ({exc}); its bytes are kept in {kept}"))
    else:
        line = receipt.get("line") or stream.tags.get("LINE")
        if stream.empty:
            # Only the headers had been written: there is no audio to keep.
            part.unlink()
            recording.update(status="interrupted", file=None, duration_s=0.0, bytes=0)
        else:
            os.replace(part, final)
            fsync_dir(final.parent)
            recording.update(status="interrupted", file=final.name,
                             duration_s=round(stream.duration_s, 3), bytes=stream.bytes,
                             codec="opus", sample_rate=stream.input_rate)
        receipt.setdefault("started_at", stream.tags.get("START_TIME"))
        receipt.setdefault("direction", stream.tags.get("DIRECTION"))
        events.emit(make_event(EventKind.RECORDING_RECOVERED, line=line, call_id=call_id,
                               ts=now, file=str(final) if recording["file"] else None,
                               duration_s=recording["duration_s"], bytes=recording["bytes"]))
    receipt.update(call_id=call_id, line=line, recording=recording)
    if receipt.get("state") == "closed":
        # The call ended normally but its recording could not be written or closed: the
        # .part is made playable; the call's own ending stands.
        if recording.get("status") == "interrupted":
            recording["status"] = "recovered"
        receipt["recovered_at"] = iso_ms(now)
        write_receipt(receipt_file, receipt)
    else:
        _close_receipt(receipt_file, receipt, now)
    return True


def _close_receipt(path: Path, receipt: dict[str, Any], now: datetime) -> None:
    receipt.update(state="interrupted", end_reason="interrupted", recovered_at=iso_ms(now))
    recording = receipt.get("recording")
    if isinstance(recording, dict) and recording.get("status") == "recording":
        # The receipt was written when recording began, and the file is gone since.
        recording["status"] = "missing"
    write_receipt(path, receipt)
    logger.warning("call %s was interrupted; its receipt %s says so",
                   receipt.get("call_id"), path)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("receipt %s is unreadable (%s); writing a new one", path, exc)
        return {}
    return data if isinstance(data, dict) else {}
