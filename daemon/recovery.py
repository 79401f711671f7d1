"""Start-up recovery: what a crash or power cut left behind is made whole and reported.

A recording interrupted mid-call is a ``<call_id>.opus.part`` whose last page may be cut
off. It is cut back to its last whole page, that page is marked as the end of the stream,
and it gets its final name; its receipt says ``interrupted``; a ``recording_recovered``
event goes out. A receipt still ``open`` without a recording (the crash came before or
during the disclosure) is closed as ``interrupted`` too. Every receipt closed here is sealed
into the receipt chain; so is a final receipt that a failed seal left outside it. A seal that
a crash cut off between the receipt and the audit log is completed, once.

With encryption (``recipients``) every recording made whole here is sealed too
(``<call_id>.opus.age``), and so is a closed ``.opus`` whose call's end the crash kept from
being written (its sealing had not begun or was cut off; a cut-off ``.opus.age.tmp`` goes).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from linerec.audio.ogg import RepairError, repair_stream
from linerec.audio.recording import PART_SUFFIX, fsync_dir
from linerec.daemon.encryption import TMP_SUFFIX, describe, seal_recording, sealed_path
from linerec.daemon.events import EventBus, EventKind, iso_ms, journal_fields, make_event
from linerec.daemon.ledger import Ledger, LedgerState
from linerec.daemon.paths import (
    CALL_ID_PATTERN,
    RECEIPT_SUFFIX,
    RECORDING_SUFFIX,
    SEALED_SUFFIX,
    check_call_id,
)
from linerec.daemon.receipt import SEALED_STATES, file_sha256, seal_receipt, write_receipt

logger = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"


def recover_interrupted(storage: Path, events: EventBus, now: datetime | None = None, *,
                        recipients: Sequence[str] = ()) -> int:
    """Recover every interrupted call under ``storage``, sealing its recording to
    ``recipients`` when given; returns how many."""
    now = now or datetime.now(UTC)
    receipts = {path: _load(path) for path in sorted(storage.glob(f"*/*/*/*{RECEIPT_SUFFIX}"))}
    # Before anything else is sealed: a seal cut off by the crash is one past the head.
    _complete_cut_off_seal(storage, receipts)
    for cut_off in sorted(storage.glob(f"*/*/*/*{SEALED_SUFFIX}{TMP_SUFFIX}")):
        # Sealing was cut off before the rename: the plaintext is still there.
        cut_off.unlink()
    recovered = 0
    for part in sorted(storage.glob(f"*/*/*/*{RECORDING_SUFFIX}{PART_SUFFIX}")):
        if _recover_recording(storage, part, events, now, recipients):
            recovered += 1
            receipt_file = part.with_name(
                part.name[: -len(RECORDING_SUFFIX + PART_SUFFIX)] + RECEIPT_SUFFIX)
            receipts.pop(receipt_file, None)
    for receipt_file, receipt in receipts.items():
        if receipt.get("state") == "open":
            _find_closed_recording(receipt_file, receipt, events, now, recipients)
            _close_receipt(storage, receipt_file, receipt, events, now)
            recovered += 1
        elif (receipt.get("state") in SEALED_STATES and "chain" not in receipt
              and CALL_ID_PATTERN.fullmatch(receipt_file.name.removesuffix(RECEIPT_SUFFIX))):
            # Final, but its seal failed (or it predates the chain): it joins the chain now.
            logger.warning("receipt %s was never sealed; sealing it", receipt_file)
            _seal(storage, receipt_file, receipt, events, now)
    return recovered


def _recover_recording(storage: Path, part: Path, events: EventBus, now: datetime,
                       recipients: Sequence[str]) -> bool:
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
        line = receipt.get("line")
        recording.update(status="unrecoverable", error=str(exc))
        _store(recording, kept, recipients, events, line, call_id, now)
        kept = part.with_name(recording["file"])
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
            recording.update(status="interrupted", duration_s=round(stream.duration_s, 3),
                             codec="opus", sample_rate=stream.input_rate)
            _store(recording, final, recipients, events, line, call_id, now)
            final = final.with_name(recording["file"])
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


def _store(recording: dict[str, Any], plain: Path, recipients: Sequence[str],
           events: EventBus, line: str | None, call_id: str, now: datetime) -> None:
    """Seal a recovered file when there are recipients, and give the receipt the file, hash
    and size of what is on disk (and ``encrypted`` when sealed). A seal that fails leaves
    the plaintext, named, and says so."""
    recording.pop("encrypted", None)
    if recipients:
        try:
            sealed = seal_recording(plain, recipients)
        except Exception as exc:
            events.emit(make_event(EventKind.ERROR, line=line, call_id=call_id, ts=now,
                                   message=f"sealing the recovered recording {plain} failed "
                                   f"({exc}); it stays unencrypted"))
        else:
            recording.update(file=sealed.path.name, sha256=sealed.sha256, bytes=sealed.bytes,
                             encrypted=describe(recipients))
            return
    recording.update(file=plain.name, sha256=file_sha256(plain), bytes=plain.stat().st_size)


def _find_closed_recording(path: Path, receipt: dict[str, Any], events: EventBus,
                           now: datetime, recipients: Sequence[str]) -> None:
    """An open receipt whose recording was closed whole (the crash came before the call's
    end was written, or, with encryption, before or during the sealing): the receipt is
    given the file that is there, sealed now if it is still plain."""
    recording = receipt.get("recording")
    if not isinstance(recording, dict) or recording.get("status") != "recording":
        return
    call_id = path.name.removesuffix(RECEIPT_SUFFIX)
    plain = path.with_name(call_id + RECORDING_SUFFIX)
    sealed = sealed_path(plain)
    if plain.is_file():
        try:
            stream = repair_stream(plain)  # whole already: reads it, changes nothing
        except (RepairError, OSError, ValueError) as exc:
            logger.warning("recording %s cannot be read (%s); kept as it is", plain, exc)
        else:
            recording.update(duration_s=round(stream.duration_s, 3), codec="opus",
                             sample_rate=stream.input_rate)
        recording.update(status="complete")
        _store(recording, plain, recipients, events, receipt.get("line"), call_id, now)
    elif sealed.is_file():
        recording.update(status="complete", file=sealed.name, sha256=file_sha256(sealed),
                         bytes=sealed.stat().st_size)
        if recipients:
            recording.setdefault("encrypted", describe(recipients))
    else:
        return
    logger.warning("call %s: its recording %s was closed before the daemon stopped",
                   call_id, recording["file"])


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
