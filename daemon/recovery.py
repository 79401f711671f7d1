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

A receipt that cannot be read (cut off or garbled on a damaged card) is moved aside as
``<call_id>.json.corrupt`` with an ``error`` event naming it, and a new one is made from what
is left (the recording's tags), so that the next start does not trip over it again. A
receipt write that a crash cut off (``.json.tmp``) is finished or dropped. Whatever goes
wrong with one call is reported and the next is looked at: the start-up never fails here,
so a damaged call cannot keep the appliance from answering the next (a crash loop).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from linerec.audio.ogg import RepairedStream, RepairError, repair_stream
from linerec.audio.recording import PART_SUFFIX, fsync_dir
from linerec.daemon.encryption import TMP_SUFFIX, describe, seal_recording, sealed_path
from linerec.daemon.events import EventBus, EventKind, iso_ms, journal_fields, make_event
from linerec.daemon.ledger import LEDGER_NAME, Ledger, LedgerState
from linerec.daemon.paths import (
    CALL_ID_PATTERN,
    RECEIPT_SUFFIX,
    RECORDING_SUFFIX,
    SEALED_SUFFIX,
    check_call_id,
)
from linerec.daemon.receipt import (
    CORRUPT_SUFFIX,
    RECEIPT_TMP_SUFFIX,
    SEALED_STATES,
    file_sha256,
    seal_receipt,
    write_receipt,
)

logger = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"

T = TypeVar("T")


def recover_interrupted(storage: Path, events: EventBus, now: datetime | None = None, *,
                        recipients: Sequence[str] = ()) -> int:
    """Recover every interrupted call under ``storage``, sealing its recording to
    ``recipients`` when given; returns how many. Never raises for what it finds on disk: a
    call it cannot recover is logged and reported as an ``error`` event, and left."""
    now = now or datetime.now(UTC)
    for tmp in sorted(storage.glob(f"*/*/*/*{RECEIPT_SUFFIX}{RECEIPT_TMP_SUFFIX}")):
        _guarded(events, now, tmp, partial(_settle_receipt_write, tmp))
    receipts: dict[Path, dict[str, Any]] = {}
    unusable: dict[Path, str] = {}
    for path in sorted(storage.glob(f"*/*/*/*{RECEIPT_SUFFIX}")):
        receipt, problem = _read_receipt(path)
        if problem is None:
            receipts[path] = receipt
        elif CALL_ID_PATTERN.fullmatch(path.name.removesuffix(RECEIPT_SUFFIX)):
            unusable[path] = problem
        else:
            logger.warning("%s %s; not named like a linerec receipt, left alone", path, problem)
    # Before anything else is sealed: a seal cut off by the crash is one past the head.
    _guarded(events, now, storage / LEDGER_NAME,
             lambda: _complete_cut_off_seal(storage, receipts))
    superseded: dict[str, str | None] = {}
    """Call id -> the sha256 its receipt was sealed with, for each receipt moved aside here:
    the receipt made in its place is sealed as superseding it."""
    sealed_state = LedgerState.load(Ledger(storage))
    for path, problem in unusable.items():
        sealed = sealed_state.receipts.get(path.name.removesuffix(RECEIPT_SUFFIX))
        superseded[path.name.removesuffix(RECEIPT_SUFFIX)] = \
            sealed.get("sha256") if sealed else None
        _guarded(events, now, path, partial(
            _quarantine, storage, path, problem, events, now, recipients,
            sealed=sealed is not None, superseded=superseded))
    for cut_off in sorted(storage.glob(f"*/*/*/*{SEALED_SUFFIX}{TMP_SUFFIX}")):
        # Sealing was cut off before the rename: the plaintext is still there.
        _guarded(events, now, cut_off, cut_off.unlink)
    recovered = 0
    for part in sorted(storage.glob(f"*/*/*/*{RECORDING_SUFFIX}{PART_SUFFIX}")):
        if _guarded(events, now, part, partial(
                _recover_recording, storage, part, events, now, recipients, superseded)):
            recovered += 1
            receipt_file = part.with_name(
                part.name[: -len(RECORDING_SUFFIX + PART_SUFFIX)] + RECEIPT_SUFFIX)
            receipts.pop(receipt_file, None)
    for receipt_file, receipt in receipts.items():
        if receipt.get("state") == "open":
            if _guarded(events, now, receipt_file, partial(
                    _close_open_receipt, storage, receipt_file, receipt, events, now,
                    recipients)):
                recovered += 1
        elif (receipt.get("state") in SEALED_STATES and "chain" not in receipt
              and CALL_ID_PATTERN.fullmatch(receipt_file.name.removesuffix(RECEIPT_SUFFIX))):
            # Final, but its seal failed (or it predates the chain): it joins the chain now.
            logger.warning("receipt %s was never sealed; sealing it", receipt_file)
            _guarded(events, now, receipt_file,
                     partial(_seal, storage, receipt_file, receipt, events, now))
    return recovered


def _guarded(events: EventBus, now: datetime, path: Path, work: Callable[[], T]) -> T | None:
    """One call's recovery: whatever goes wrong is logged and published as an ``error``
    naming the file, and the start goes on. A start that failed here would fail again at
    every restart (the file is still there), and no line would ever be armed."""
    try:
        return work()
    except Exception as exc:
        logger.exception("start-up recovery of %s failed", path)
        call_id = path.name.split(".", 1)[0]
        known = CALL_ID_PATTERN.fullmatch(call_id) is not None
        events.emit(make_event(EventKind.ERROR, line=_line_of(call_id) if known else None,
                               call_id=call_id if known else None, ts=now,
                               message=f"the start-up recovery of {path} failed ({exc}); it "
                               "is left as it is for a person to look at (`linerec verify` "
                               "reports it), and the lines are armed all the same"))
        return None


def _line_of(call_id: str) -> str:
    """The line a call id names (``<UTC start>-<line>-<6 hex>``)."""
    return call_id.split("-", 1)[1].rsplit("-", 1)[0]


def _read_receipt(path: Path) -> tuple[dict[str, Any], str | None]:
    """The receipt, and what makes it unusable (None when nothing does)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError, RecursionError) as exc:
        return {}, f"cannot be read ({exc})"
    if not isinstance(data, dict):
        return {}, "is not a JSON object"
    if data.get("state") not in ("open", *SEALED_STATES):
        return {}, f"has no valid state ({str(data.get('state'))[:40]!r})"
    if not isinstance(data.get("recording"), dict | None):
        return {}, "has a recording that is not an object"
    return data, None


def _close_open_receipt(storage: Path, path: Path, receipt: dict[str, Any], events: EventBus,
                        now: datetime, recipients: Sequence[str]) -> bool:
    _find_closed_recording(path, receipt, events, now, recipients)
    _close_receipt(storage, path, receipt, events, now)
    return True


def _settle_receipt_write(tmp: Path) -> None:
    """A receipt write cut off between its temporary file and the rename: the receipt
    itself is the last whole version when there is one; else a whole temporary file is the
    call's only receipt and takes its place (a cut-off one is moved aside with the rest)."""
    path = tmp.with_name(tmp.name.removesuffix(RECEIPT_TMP_SUFFIX))
    if path.exists():
        tmp.unlink()
        return
    if _read_receipt(tmp)[1] is None:
        os.replace(tmp, path)
        fsync_dir(path.parent)
        logger.warning("the receipt %s was being written when the daemon stopped; its new "
                       "version is kept", path)
    else:
        # Left under the receipt's name, so that the next step moves it aside and reports it.
        os.replace(tmp, path)


def _quarantine(storage: Path, path: Path, problem: str, events: EventBus, now: datetime,
                recipients: Sequence[str], *, sealed: bool,
                superseded: dict[str, str | None]) -> None:
    """Move an unusable receipt aside (its bytes kept for a person), say so, and put a
    receipt made from what is left in its place: the interrupted recording (the ``.part``
    step rebuilds it from its tags), a closed recording's tags, or, for a call with no
    recording that the audit log does not hold, the call id alone. A sealed receipt of a
    call without a recording is for a backup to restore: nothing here could replace it."""
    call_id = path.name.removesuffix(RECEIPT_SUFFIX)
    kept = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{n}")
    os.replace(path, kept)
    fsync_dir(path.parent)
    plain = path.with_name(call_id + RECORDING_SUFFIX)
    part = plain.with_name(plain.name + PART_SUFFIX)
    sealed_file = sealed_path(plain)
    if part.exists():
        done = "a new receipt is made from its interrupted recording"
    elif plain.is_file() or sealed_file.is_file():
        receipt = _rebuilt_receipt(call_id, plain, sealed_file, events, now, recipients)
        _seal(storage, path, receipt, events, now, superseded.pop(call_id, None))
        done = "a new receipt, sealed as interrupted, was made from its recording"
    elif not sealed:
        receipt = {"call_id": call_id, "line": _line_of(call_id), "state": "open",
                   "recording": None}
        _close_receipt(storage, path, receipt, events, now)
        done = "a new receipt, sealed as interrupted, holds what its call id says"
    else:
        done = "the audit log holds it sealed: restore it from a backup"
    events.emit(make_event(EventKind.ERROR, line=_line_of(call_id), call_id=call_id, ts=now,
                           message=f"the receipt {path} {problem}; its bytes are kept in "
                           f"{kept} and {done}; `linerec verify` reports it until a person "
                           "has looked at it"))


def _read_closed(plain: Path, recording: dict[str, Any]) -> RepairedStream | None:
    """A recording closed whole: its length and rate into ``recording``; its stream (for
    the tags), or None when it cannot be read (it is kept as it is)."""
    try:
        stream = repair_stream(plain)  # whole already: reads it, changes nothing
    except (RepairError, OSError, ValueError) as exc:
        logger.warning("recording %s cannot be read (%s); kept as it is", plain, exc)
        return None
    recording.update(duration_s=round(stream.duration_s, 3), codec="opus",
                     sample_rate=stream.input_rate)
    return stream


def _rebuilt_receipt(call_id: str, plain: Path, sealed: Path, events: EventBus,
                     now: datetime, recipients: Sequence[str]) -> dict[str, Any]:
    """An interrupted receipt from a closed recording whose receipt was lost: what its Ogg
    tags say (a sealed file's cannot be read here: its call id, then)."""
    receipt: dict[str, Any] = {"call_id": call_id, "line": _line_of(call_id),
                               "state": "interrupted", "end_reason": "interrupted",
                               "recovered_at": iso_ms(now)}
    recording: dict[str, Any] = {"status": "complete"}
    if plain.is_file():
        stream = _read_closed(plain, recording)
        if stream is not None:
            receipt.update(line=stream.tags.get("LINE") or receipt["line"],
                           direction=stream.tags.get("DIRECTION"),
                           started_at=stream.tags.get("START_TIME"))
        _store(recording, plain, recipients, events, receipt["line"], call_id, now)
    else:
        recording.update(file=sealed.name, sha256=file_sha256(sealed),
                         bytes=sealed.stat().st_size)
        if recipients:
            recording["encrypted"] = describe(recipients)
    receipt["recording"] = recording
    return receipt


def _recover_recording(storage: Path, part: Path, events: EventBus, now: datetime,
                       recipients: Sequence[str], superseded: dict[str, str | None]) -> bool:
    name = part.name[: -len(RECORDING_SUFFIX + PART_SUFFIX)]
    try:
        call_id = check_call_id(name)
    except ValueError:
        logger.warning("%s is not named like a linerec recording; left alone", part)
        return False
    final = part.with_name(call_id + RECORDING_SUFFIX)
    receipt_file = part.with_name(call_id + RECEIPT_SUFFIX)
    receipt, problem = _read_receipt(receipt_file)
    if problem is not None:
        # Not a receipt named like a call (those were moved aside before): start afresh.
        receipt = {}
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
        _close_receipt(storage, receipt_file, receipt, events, now,
                       superseded.pop(call_id, None))
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
        _read_closed(plain, recording)
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
                   now: datetime, supersedes: str | None = None) -> None:
    receipt.update(state="interrupted", end_reason="interrupted", recovered_at=iso_ms(now))
    recording = receipt.get("recording")
    if isinstance(recording, dict) and recording.get("status") == "recording":
        # The receipt was written when recording began, and the file is gone since (or the
        # daemon stopped before it was made): the office must hear of a recording it lacks.
        recording["status"] = "missing"
        events.emit(make_event(
            EventKind.ERROR, line=receipt.get("line"), call_id=receipt.get("call_id"),
            ts=now, message=f"the recording {recording.get('file')} of the interrupted call "
            f"{receipt.get('call_id')} is missing beside its receipt {path}: it was removed, "
            "or the daemon stopped before the file was made; the receipt says `missing`"))
    _seal(storage, path, receipt, events, now, supersedes)
    logger.warning("call %s was interrupted; its receipt %s says so",
                   receipt.get("call_id"), path,
                   extra=journal_fields(line=receipt.get("line"), call_id=receipt.get("call_id")))


def _seal(storage: Path, path: Path, receipt: dict[str, Any], events: EventBus,
          now: datetime, supersedes: str | None = None) -> None:
    """Seal into the chain; when the audit log cannot be written, the receipt is still
    written (unsealed, so the next start tries again) and the office is told."""
    name = path.name.removesuffix(RECEIPT_SUFFIX)
    if CALL_ID_PATTERN.fullmatch(name):
        receipt.setdefault("call_id", name)
    try:
        seal_receipt(storage, path, receipt, supersedes=supersedes)
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
