"""Start-up recovery: what a crash or power cut left behind is made whole and reported.

A recording interrupted mid-call is a ``<call_id>.opus.part`` whose last page may be cut
off. It is cut back to its last whole page, that page is marked as the end of the stream,
and it gets its final name; its receipt says ``interrupted``; a ``recording_recovered``
event goes out. A receipt still ``open`` without a recording (the crash came before or
during the disclosure) is closed as ``interrupted`` too. Every receipt closed here is sealed
into the receipt chain; so is a final receipt that a failed seal left outside it. A seal that
a crash cut off between the receipt and the audit log is completed, once.
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
from linerec.daemon.events import EventBus, EventKind, iso_ms, journal_fields, make_event
from linerec.daemon.ledger import Ledger, LedgerState
from linerec.daemon.paths import CALL_ID_PATTERN, RECEIPT_SUFFIX, RECORDING_SUFFIX, check_call_id
from linerec.daemon.receipt import SEALED_STATES, file_sha256, seal_receipt, write_receipt

logger = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"


def recover_interrupted(storage: Path, events: EventBus, now: datetime | None = None) -> int:
    """Recover every interrupted call under ``storage``; returns how many."""
    now = now or datetime.now(UTC)
    receipts = {path: _load(path) for path in sorted(storage.glob(f"*/*/*/*{RECEIPT_SUFFIX}"))}
    # Before anything else is sealed: a seal cut off by the crash is one past the head.
    _complete_cut_off_seal(storage, receipts)
    recovered = 0
    for part in sorted(storage.glob(f"*/*/*/*{RECORDING_SUFFIX}{PART_SUFFIX}")):
        if _recover_recording(storage, part, events, now):
            recovered += 1
            receipt_file = part.with_name(
                part.name[: -len(RECORDING_SUFFIX + PART_SUFFIX)] + RECEIPT_SUFFIX)
            receipts.pop(receipt_file, None)
    for receipt_file, receipt in receipts.items():
        if receipt.get("state") == "open":
            _close_receipt(storage, receipt_file, receipt, events, now)
            recovered += 1
        elif (receipt.get("state") in SEALED_STATES and "chain" not in receipt
              and CALL_ID_PATTERN.fullmatch(receipt_file.name.removesuffix(RECEIPT_SUFFIX))):
            # Final, but its seal failed (or it predates the chain): it joins the chain now.
            logger.warning("receipt %s was never sealed; sealing it", receipt_file)
            _seal(storage, receipt_file, receipt, events, now)
    return recovered


def _recover_recording(storage: Path, part: Path, events: EventBus, now: datetime) -> bool:
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
        recording.update(status="unrecoverable", file=kept.name, error=str(exc),
                         sha256=file_sha256(kept))
        line = receipt.get("line")
        events.emit(make_event(EventKind.ERROR, line=line, call_id=call_id, ts=now,
                               message=f"the interrupted recording {part} could not be "
                               f"recovered ({exc}); its bytes are kept in {kept}"))
    else:
        line = receipt.get("line") or stream.tags.get("LINE")
        if stream.empty:
            # Only the headers had been written: there is no audio to keep.
            part.unlink()
            recording.update(status="interrupted", file=None, duration_s=0.0, bytes=0,
                             sha256=None)
        else:
            os.replace(part, final)
            fsync_dir(final.parent)
            recording.update(status="interrupted", file=final.name,
                             duration_s=round(stream.duration_s, 3), bytes=stream.bytes,
                             codec="opus", sample_rate=stream.input_rate,
                             sha256=file_sha256(final))
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
        # Sealed when the call ended: this seals the amended receipt as a new link that
        # supersedes that one.
        _seal(storage, receipt_file, receipt, events, now)
    else:
        _close_receipt(storage, receipt_file, receipt, events, now)
    return True


def _close_receipt(storage: Path, path: Path, receipt: dict[str, Any], events: EventBus,
                   now: datetime) -> None:
    receipt.update(state="interrupted", end_reason="interrupted", recovered_at=iso_ms(now))
    recording = receipt.get("recording")
    if isinstance(recording, dict) and recording.get("status") == "recording":
        # The receipt was written when recording began, and the file is gone since.
        recording["status"] = "missing"
    _seal(storage, path, receipt, events, now)
    logger.warning("call %s was interrupted; its receipt %s says so",
                   receipt.get("call_id"), path,
                   extra=journal_fields(line=receipt.get("line"), call_id=receipt.get("call_id")))


def _seal(storage: Path, path: Path, receipt: dict[str, Any], events: EventBus,
          now: datetime) -> None:
    """Seal into the chain; when the audit log cannot be written, the receipt is still
    written (unsealed, so the next start tries again) and the office is told."""
    name = path.name.removesuffix(RECEIPT_SUFFIX)
    if CALL_ID_PATTERN.fullmatch(name):
        receipt.setdefault("call_id", name)
    try:
        seal_receipt(storage, path, receipt)
    except (OSError, ValueError) as exc:
        receipt.pop("chain", None)
        write_receipt(path, receipt)
        events.emit(make_event(EventKind.ERROR, line=receipt.get("line"),
                               call_id=receipt.get("call_id"), ts=now,
                               message=f"the receipt {path} could not be sealed into the "
                               f"audit log {Ledger(storage).path} ({exc}); the next start "
                               "tries again"))


def _complete_cut_off_seal(storage: Path, receipts: dict[Path, dict[str, Any]]) -> None:
    """A crash between writing a sealed receipt and its audit log line leaves a receipt that
    claims the place right after the log's head. Its line is added, and only for that one
    receipt: any other sealed receipt missing from the log is for `linerec verify` to
    report, never for the daemon to launder into the chain."""
    state = LedgerState.load(Ledger(storage))
    for path, receipt in receipts.items():
        chain = receipt.get("chain")
        call_id = receipt.get("call_id")
        if (receipt.get("state") not in SEALED_STATES or not isinstance(chain, dict)
                or not isinstance(call_id, str) or call_id in state.deleted):
            continue
        sealed = state.receipts.get(call_id)
        if sealed is not None and sealed.get("seq") == chain.get("seq"):
            continue
        if chain.get("seq") != state.head.seq + 1 or \
                chain.get("previous_sha256") != state.head.sha256:
            logger.warning("receipt %s is sealed (seq %s) but not in the audit log; "
                           "`linerec verify` reports it", path, chain.get("seq"))
            continue
        with Ledger(storage).locked() as ledger:
            if ledger.head != state.head:
                return  # someone else appended meanwhile; the next start looks again
            ledger.append_receipt(
                call_id=call_id, path=path.relative_to(storage).as_posix(),
                sha256=file_sha256(path),
                supersedes=sealed.get("sha256") if sealed else None)
        logger.warning("the seal of receipt %s was cut off by a crash; completed", path)
        return


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("receipt %s is unreadable (%s); writing a new one", path, exc)
        return {}
    return data if isinstance(data, dict) else {}
