"""The stored calls as a whole: find, export, delete, legal holds, retention, and verify.

Every change goes through the audit log (``ledger.py``): a deletion is recorded before the
files go, so the receipt chain still accounts for a deleted receipt; holds are entries in
the log, and the holds in force are what replaying it leaves.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import secrets
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from linerec.audio.recording import fsync_dir
from linerec.daemon.events import EventBus, EventKind, make_event
from linerec.daemon.ledger import EntryKind, Ledger, LedgerState
from linerec.daemon.numbers import number_matches
from linerec.daemon.paths import (
    CALL_ID_PATTERN,
    RECEIPT_SUFFIX,
    RECORDING_SUFFIX,
    SEALED_SUFFIX,
    check_call_id,
    receipt_path,
)
from linerec.daemon.receipt import CORRUPT_SUFFIX, SEALED_STATES, file_sha256

logger = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 24 * 3600.0
"""How often the daemon sweeps for expired calls (seconds); once at start too."""

REASON_MAX_CHARS = 300
INDEX_NAME = "index.csv"
INDEX_COLUMNS = (
    "call_id", "started_at", "ended_at", "line", "direction", "number", "state",
    "purpose", "lawful_basis", "retention_until", "receipt", "receipt_sha256",
    "recording", "recording_sha256", "duration_s",
)


class ArchiveError(ValueError):
    """A request that cannot be carried out as asked; ``str()`` names the argument or file
    and what to do. Nothing has been changed when it is raised."""


# ---------------------------------------------------------------------------------------
# The calls on disk


@dataclass
class Call:
    """One call as stored: its receipt (``{}`` when unreadable, with ``error`` saying why)."""

    call_id: str
    receipt_path: Path
    receipt: dict[str, Any]
    error: str | None = None

    @property
    def folder(self) -> Path:
        return self.receipt_path.parent

    @property
    def state(self) -> str | None:
        state = self.receipt.get("state")
        return state if isinstance(state, str) else None

    @property
    def started_at(self) -> datetime | None:
        return _parse_time(self.receipt.get("started_at"))

    @property
    def number(self) -> str | None:
        value = section(self.receipt, "number").get("value")
        return value if isinstance(value, str) else None

    @property
    def recording_file(self) -> Path | None:
        """The recording the receipt names, when it is on disk."""
        name = section(self.receipt, "recording").get("file")
        if not isinstance(name, str) or "/" in name or not name.startswith(self.call_id):
            return None
        path = self.folder / name
        return path if path.is_file() else None

    @property
    def retention_until(self) -> date | None:
        value = self.receipt.get("retention_until")
        try:
            return date.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            return None

    def files(self) -> list[Path]:
        """Every file named after the call in its folder (recording, leftovers), the receipt
        last: removed in this order, an interrupted deletion leaves the receipt to find."""
        return sorted((p for p in self.folder.glob(f"{self.call_id}.*") if p.is_file()),
                      key=lambda p: (p == self.receipt_path, p.name))


def section(receipt: dict[str, Any], key: str) -> dict[str, Any]:
    """A receipt's sub-object (``number``, ``recording``...), ``{}`` when null or absent."""
    value = receipt.get(key)
    return value if isinstance(value, dict) else {}


def load_call(path: Path) -> Call:
    call_id = path.name.removesuffix(RECEIPT_SUFFIX)
    try:
        receipt = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Call(call_id, path, {}, error=f"cannot be read: {exc}")
    if not isinstance(receipt, dict):
        return Call(call_id, path, {}, error="is not a JSON object")
    return Call(call_id, path, receipt)


def iter_calls(storage: Path) -> Iterator[Call]:
    """Every call's receipt under ``storage``, oldest first."""
    for path in sorted(storage.glob(f"*/*/*/*{RECEIPT_SUFFIX}")):
        if CALL_ID_PATTERN.fullmatch(path.name.removesuffix(RECEIPT_SUFFIX)):
            yield load_call(path)


def resolve_calls(storage: Path, call_ids: Iterable[str]) -> list[Call]:
    """The calls named, all of them checked first: an ArchiveError names the first bad one."""
    calls = []
    for value in call_ids:
        try:
            call_id = check_call_id(value)
        except ValueError as exc:
            raise ArchiveError(f"{exc}; copy call ids from `linerec recordings find`") from None
        try:
            started = datetime.strptime(call_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            # The form lets a 13th month or a 25th hour through; no call started then.
            raise ArchiveError(f"{call_id!r} is not a linerec call id: {call_id[:16]} is not "
                               "a time; copy call ids from `linerec recordings find`") from None
        path = receipt_path(storage, call_id, started)
        if not path.is_file():
            # Named by its UTC start, but a receipt moved by hand is still found.
            found = sorted(storage.glob(f"*/*/*/{call_id}{RECEIPT_SUFFIX}"))
            deleted = LedgerState.load(Ledger(storage)).deleted.get(call_id) \
                if not found else None
            if deleted is not None:
                raise ArchiveError(f"call {call_id} was deleted on {deleted.get('at')} "
                                   f"({deleted.get('who')}: {deleted.get('reason')})")
            if not found:
                raise ArchiveError(f"call {call_id}: no receipt under {storage}; check the id "
                                   "with `linerec recordings find`")
            path = found[0]
        call = load_call(path)
        if call.error:
            raise ArchiveError(f"call {call_id}: its receipt {path} {call.error}; run "
                               "`linerec verify` and repair or restore it first")
        calls.append(call)
    return calls


# ---------------------------------------------------------------------------------------
# Finding calls

_NUMBER_CHARS = re.compile(r"^\+?[0-9*?\s().\-/]+$")


def normalise_number(value: str) -> str:
    """Digits only, and a leading + when the number was written with one."""
    digits = "".join(ch for ch in value if ch.isdigit())
    return "+" + digits if value.strip().startswith("+") else digits


def number_matcher(pattern: str, country_code: str = "31") -> Callable[[str | None], bool]:
    """``*`` any digits, ``?`` one digit; spaces, dashes, dots, slashes and brackets are
    ignored on both sides, and national and international forms are the same number (as
    in the number rules: linerec.daemon.numbers). Raises ValueError for anything that is
    not a number pattern."""
    text = pattern.strip()
    if not text or not _NUMBER_CHARS.fullmatch(text) or not any(
            ch.isdigit() or ch in "*?" for ch in text):
        raise ValueError(f"{pattern!r} is not a phone number pattern; give digits, with a "
                         "leading + if international and * or ? as wildcards, like +3120*")

    def matches(number: str | None) -> bool:
        return number is not None and number_matches(text, number, country_code)

    return matches


@dataclass(frozen=True)
class CallFilter:
    """What ``find`` and ``export`` select; every criterion given must hold."""

    number: str | None = None
    """Phone number pattern (see number_matcher)."""
    date_from: date | None = None
    """First UTC day of the call's start, inclusive."""
    date_to: date | None = None
    """Last UTC day of the call's start, inclusive."""
    line: str | None = None
    """The line's name, exactly."""
    country_code: str = "31"
    """The lines' country calling code, for comparing +31 20 ... with 020 ..."""
    _number: Callable[[str | None], bool] | None = field(default=None, init=False,
                                                         repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.number is not None:
            object.__setattr__(self, "_number", number_matcher(self.number, self.country_code))
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError(f"the period {self.date_from} to {self.date_to} is empty: the "
                             "first day comes after the last")

    def matches(self, call: Call) -> bool:
        if self.line is not None and call.receipt.get("line") != self.line:
            return False
        if self._number is not None and not self._number(call.number):
            return False
        if self.date_from or self.date_to:
            started = call.started_at
            if started is None:
                return False
            day = started.astimezone(UTC).date()
            if (self.date_from and day < self.date_from) or (self.date_to and day > self.date_to):
                return False
        return True


def call_summary(call: Call, held: bool, *, relative_to: Path | None = None) -> dict[str, Any]:
    """What ``find`` tells of a call; paths relative to ``relative_to`` when given (MQTT
    replies name no paths of the appliance's disk)."""
    receipt = call.receipt
    number = section(receipt, "number")
    recording = section(receipt, "recording")
    file = call.recording_file

    def shown(path: Path) -> str:
        return str(path.relative_to(relative_to)) if relative_to else str(path)

    return {
        "call_id": call.call_id,
        "started_at": receipt.get("started_at"),
        "ended_at": receipt.get("ended_at"),
        "line": receipt.get("line"),
        "direction": receipt.get("direction"),
        "number": call.number,
        "number_unknown": number.get("unknown_reason"),
        "state": call.state,
        "duration_s": recording.get("duration_s") if file else None,
        "recording": shown(file) if file else None,
        "receipt": shown(call.receipt_path),
        "retention_until": receipt.get("retention_until"),
        "held": held,
    }


def find_calls(storage: Path, selection: CallFilter) -> list[Call]:
    """The readable receipts that match, oldest first; unreadable ones are logged."""
    found = []
    for call in iter_calls(storage):
        if call.error:
            logger.warning("receipt %s %s; skipped (run `linerec verify`)",
                           call.receipt_path, call.error)
        elif selection.matches(call):
            found.append(call)
    return found


def current_holds(storage: Path) -> dict[str, dict[str, Any]]:
    """call id -> the hold entry in force."""
    return LedgerState.load(Ledger(storage)).holds


# ---------------------------------------------------------------------------------------
# Holds


def hold_calls(storage: Path, call_ids: Iterable[str], reason: str) -> list[str]:
    """Put calls under legal hold; returns those newly held (the others already were)."""
    calls = resolve_calls(storage, call_ids)
    reason = check_reason(reason, calls, required=True)
    ledger = Ledger(storage)
    held = []
    with ledger.locked() as session:
        state = LedgerState()
        state.feed(session.read_since(0))
        for call in calls:
            if call.call_id in state.holds or call.call_id in held:
                continue
            session.append(EntryKind.HOLD, call_id=call.call_id, reason=reason, who="operator")
            held.append(call.call_id)
    return held


def release_calls(storage: Path, call_ids: Iterable[str], reason: str | None = None) -> list[str]:
    """End the legal hold of calls; each must be on hold."""
    ids = []
    for value in call_ids:
        try:
            ids.append(check_call_id(value))
        except ValueError as exc:
            raise ArchiveError(f"{exc}; copy call ids from `linerec recordings find`") from None
    reason = check_reason(reason or "", [], required=False)
    with Ledger(storage).locked() as session:
        state = LedgerState()
        state.feed(session.read_since(0))
        for call_id in ids:
            if call_id not in state.holds:
                raise ArchiveError(f"call {call_id} is not on hold; see the holds with "
                                   "`linerec recordings find`")
        for call_id in dict.fromkeys(ids):
            session.append(EntryKind.RELEASE, call_id=call_id, reason=reason or None,
                           who="operator")
    return list(dict.fromkeys(ids))


def check_reason(reason: str, calls: Iterable[Call], *, required: bool) -> str:
    """The audit log keeps no personal data: a reason is one short line and must not carry
    the caller's number (a ticket or request reference is what belongs there)."""
    text = reason.strip()
    if required and not text:
        raise ArchiveError("--reason is required: say why, e.g. a request or ticket "
                           "reference (no names or phone numbers)")
    if "\n" in text or len(text) > REASON_MAX_CHARS:
        raise ArchiveError(f"--reason must be one line of at most {REASON_MAX_CHARS} "
                           "characters")
    digits = "".join(ch for ch in text if ch.isdigit())
    for call in calls:
        number = normalise_number(call.number or "").lstrip("+")
        if len(number) >= 5 and (number in digits or number[-7:] in digits):
            raise ArchiveError("--reason must not contain the caller's phone number: the "
                               "audit log keeps no personal data; give a request or ticket "
                               "reference instead")
    return text


# ---------------------------------------------------------------------------------------
# Deleting


@dataclass(frozen=True)
class Deleted:
    call_id: str
    files: tuple[str, ...]
    reason: str
    who: str


def delete_calls(storage: Path, call_ids: Iterable[str], reason: str, *,
                 events: EventBus | None = None) -> list[Deleted]:
    """An operator's deletion: every call is checked before any is touched (known, ended,
    not on hold); each is recorded in the audit log, then its files removed."""
    calls = resolve_calls(storage, call_ids)
    reason = check_reason(reason, calls, required=True)
    state = LedgerState.load(Ledger(storage))
    for call in calls:
        if call.state not in SEALED_STATES:
            raise ArchiveError(f"call {call.call_id} is {call.state or 'not closed'}: only a "
                               "call that has ended can be deleted; try again after it ended")
        if call.call_id in state.holds:
            raise ArchiveError(f"call {call.call_id} is under legal hold "
                               f"({state.holds[call.call_id].get('reason')}); release it with "
                               "`linerec recordings release` first")
    deleted: list[Deleted] = []
    for call in dict((c.call_id, c) for c in calls).values():
        done = _delete(storage, state, call, reason, "operator", events)
        if done is None:
            raise ArchiveError(f"call {call.call_id} was put on hold meanwhile; not deleted "
                               f"(already deleted: {', '.join(d.call_id for d in deleted)})")
        deleted.append(done)
    return deleted


def _delete(storage: Path, state: LedgerState, call: Call, reason: str, who: str,
            events: EventBus | None) -> Deleted | None:
    """Record, then remove; None when the call is (now) on hold. The lock is held for one
    log line only: the daemon's lines seal receipts under it."""
    with Ledger(storage).locked() as session:
        state.feed(session.read_since(state.offset))
        if call.call_id in state.holds:
            return None
        files = call.files()
        chain = call.receipt.get("chain")
        seq = chain.get("seq") if isinstance(chain, dict) else None
        sha = file_sha256(call.receipt_path) if call.receipt_path.is_file() else None
        session.append(EntryKind.DELETED, call_id=call.call_id, files=[f.name for f in files],
                       reason=reason, who=who, seq=seq, sha256=sha)
        state.feed(session.read_since(state.offset))
    # The line is durable now; removing the files needs no lock (a crash in between is
    # finished by the next sweep).
    for path in files:
        path.unlink(missing_ok=True)
    fsync_dir(call.folder)
    logger.info("deleted call %s (%s): %s", call.call_id, who, reason)
    if events is not None:
        events.emit(make_event(EventKind.RECORDING_DELETED, line=call.receipt.get("line"),
                               call_id=call.call_id, ts=datetime.now(UTC), who=who,
                               reason=reason, files=[f.name for f in files]))
    return Deleted(call.call_id, tuple(f.name for f in files), reason, who)


def _prune_folders(storage: Path, folders: Iterable[Path], today: date) -> None:
    """Remove day (then month, year) folders left empty, but never today's or yesterday's:
    a call starting now creates its folder and then its file, and must not lose the folder
    in between."""
    recent = {today, today - timedelta(days=1)}
    months = {(d.year, d.month) for d in recent}
    years = {d.year for d in recent}
    for folder in sorted(set(folders), reverse=True):
        try:
            y, m, d = (int(part) for part in folder.relative_to(storage).parts)
            day = date(y, m, d)
        except ValueError:
            continue
        if day in recent:
            continue
        for path, keep in ((folder, False), (folder.parent, (y, m) in months),
                           (folder.parent.parent, y in years)):
            if keep:
                break
            try:
                path.rmdir()
            except OSError:
                break  # not empty
            fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------
# Retention


def sweep_retention(storage: Path, *, today: date | None = None,
                    events: EventBus | None = None,
                    should_stop: Callable[[], bool] = lambda: False) -> list[str]:
    """Delete every ended call whose ``retention_until`` lies before ``today`` (UTC) and
    that is not on hold; finish deletions a crash interrupted; returns the call ids deleted."""
    today = today or datetime.now(UTC).date()
    state = LedgerState.load(Ledger(storage))
    deleted: list[str] = []
    folders: list[Path] = []
    for path in sorted(storage.glob("*/*/*/*")):
        if path.name.split(".", 1)[0] in state.deleted and path.is_file():
            # Recorded as deleted, file still there: a crash came between the two (or a
            # backup was restored over the storage).
            path.unlink()
            logger.warning("removed %s: its call was deleted before", path)
            folders.append(path.parent)
    for call in iter_calls(storage):
        if should_stop():
            break
        until = call.retention_until
        if (call.state not in SEALED_STATES or until is None or until >= today
                or call.call_id in state.deleted):
            continue
        if call.call_id in state.holds:
            logger.debug("call %s is past its retention but on hold", call.call_id)
            continue
        done = _delete(storage, state, call, f"retention period ended {until.isoformat()}",
                       "retention", events)
        if done is not None:
            deleted.append(call.call_id)
            folders.append(call.folder)
    _prune_folders(storage, folders, today)
    if deleted:
        logger.info("retention: deleted %d call(s) past their retention date", len(deleted))
    return deleted


class RetentionSweeper(threading.Thread):
    """The daemon's retention: a sweep at start, then one every ``interval_s``. Its own
    thread, never an engine's; a failed sweep is logged and reported, and the next one
    comes as planned."""

    def __init__(self, storage: Path, events: EventBus,
                 interval_s: float = RETENTION_INTERVAL_S) -> None:
        super().__init__(name="retention", daemon=True)
        self.storage = storage
        self.events = events
        self.interval_s = interval_s
        self.sweeps = 0
        self._stop_requested = threading.Event()
        self._wake = threading.Event()

    def run(self) -> None:
        while not self._stop_requested.is_set():
            self._wake.clear()
            self.sweep_once()
            self.sweeps += 1
            self._wake.wait(self.interval_s)

    def sweep_now(self) -> None:
        """Sweep at once (the storage guard, when space runs low), not at the next turn."""
        self._wake.set()

    def sweep_once(self) -> list[str]:
        try:
            return sweep_retention(self.storage, events=self.events,
                                   should_stop=self._stop_requested.is_set)
        except Exception as exc:
            logger.exception("retention sweep of %s failed", self.storage)
            self.events.emit(make_event(
                EventKind.ERROR, line=None, call_id=None, ts=datetime.now(UTC),
                message=f"the retention sweep of {self.storage} failed ({exc}); expired "
                "calls stay until the next sweep"))
            return []

    def stop(self) -> None:
        self._stop_requested.set()
        self._wake.set()


# ---------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class Exported:
    destination: Path
    kind: str
    """``zip`` or ``folder``."""
    call_ids: tuple[str, ...]
    files: int


def export_calls(storage: Path, calls: list[Call], destination: Path, *,
                 reason: str | None = None) -> Exported:
    """Copy the calls' receipts and recordings, with an index, into a new folder or a new
    ``.zip``; written under a temporary name and renamed whole, never over anything."""
    if not calls:
        raise ArchiveError("no call to export; check the selection with "
                           "`linerec recordings find`")
    for call in calls:
        if call.state not in SEALED_STATES:
            raise ArchiveError(f"call {call.call_id} is still {call.state or 'not closed'}; "
                               "export it after it ended")
    reason = check_reason(reason or "", calls, required=False)
    kind = "zip" if destination.suffix.lower() == ".zip" else "folder"
    if not destination.parent.is_dir():
        raise ArchiveError(f"--output {destination}: the folder {destination.parent} does "
                           "not exist; create it or choose another place")
    if destination.exists() and not (kind == "folder" and destination.is_dir()
                                     and not any(destination.iterdir())):
        raise ArchiveError(f"--output {destination} exists already; choose a new name "
                           "(an export never overwrites)")
    members = _export_members(calls)
    tmp = destination.with_name(f".{destination.name}.partial-{secrets.token_hex(4)}")
    try:
        if kind == "zip":
            _write_zip(tmp, members)
            os.link(tmp, destination)  # fails rather than replace a file made meanwhile
            tmp.unlink()
        else:
            _write_folder(tmp, members)
            os.rename(tmp, destination)
    except FileExistsError:
        raise ArchiveError(f"--output {destination} was created meanwhile; choose a new "
                           "name") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    call_ids = tuple(call.call_id for call in calls)
    Ledger(storage).append(EntryKind.EXPORT, call_ids=list(call_ids), destination=kind,
                           reason=reason or None, files=len(members))
    return Exported(destination, kind, call_ids, len(members))


def _export_members(calls: list[Call]) -> list[tuple[str, Path | bytes]]:
    """(name in the export, source file or bytes), the index last."""
    members: list[tuple[str, Path | bytes]] = []
    index = io.StringIO()
    writer = csv.DictWriter(index, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for call in calls:
        receipt = call.receipt
        recording = call.recording_file
        rec = section(receipt, "recording")
        purpose = section(receipt, "purpose")
        members.append((call.receipt_path.name, call.receipt_path))
        if recording is not None:
            members.append((recording.name, recording))
        writer.writerow({
            "call_id": call.call_id,
            "started_at": receipt.get("started_at"),
            "ended_at": receipt.get("ended_at"),
            "line": receipt.get("line"),
            "direction": receipt.get("direction"),
            "number": call.number or "",
            "state": call.state,
            "purpose": purpose.get("name"),
            "lawful_basis": purpose.get("lawful_basis"),
            "retention_until": receipt.get("retention_until"),
            "receipt": call.receipt_path.name,
            "receipt_sha256": file_sha256(call.receipt_path),
            "recording": recording.name if recording else "",
            "recording_sha256": file_sha256(recording) if recording else "",
            "duration_s": rec.get("duration_s") if recording else "",
        })
    members.append((INDEX_NAME, index.getvalue().encode("utf-8")))
    return members


def _write_zip(path: Path, members: list[tuple[str, Path | bytes]]) -> None:
    with zipfile.ZipFile(path, "x") as archive:
        for name, source in members:
            # Opus is compressed already, and a sealed recording looks random; the JSON and
            # the index are text.
            compression = (zipfile.ZIP_STORED if name.endswith((RECORDING_SUFFIX, SEALED_SUFFIX))
                           else zipfile.ZIP_DEFLATED)
            if isinstance(source, Path):
                archive.write(source, name, compress_type=compression)
            else:
                archive.writestr(name, source, compress_type=compression)
    with path.open("rb") as written:
        os.fsync(written.fileno())


def _write_folder(path: Path, members: list[tuple[str, Path | bytes]]) -> None:
    path.mkdir(mode=0o700)
    for name, source in members:
        if isinstance(source, Path):
            shutil.copyfile(source, path / name)
        else:
            (path / name).write_bytes(source)
    fsync_dir(path)


# ---------------------------------------------------------------------------------------
# Verify


@dataclass(frozen=True)
class Break:
    """One thing wrong: the file it concerns and what."""

    where: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class Verification:
    breaks: list[Break]
    sealed: int
    """Receipts the audit log holds as current (not deleted)."""
    deleted: int
    lines: int


def verify(storage: Path) -> Verification:
    """Check the audit log's line chain, every sealed receipt against its hash and its place
    in the receipt chain, every recording against the hash in its receipt, and that every
    final receipt on disk is in the chain and every deleted one is gone."""
    ledger = Ledger(storage)
    data = ledger.read()
    state = LedgerState()
    state.feed(data)
    breaks = [Break(ledger.path, f"line {number}: {problem}")
              for number, problem in state.problems]
    if data and not data.endswith(b"\n"):
        breaks.append(Break(ledger.path, "the last line is cut off (a write interrupted by "
                            "a crash); the daemon's next write repairs it"))
    on_disk = {call.call_id: call for call in iter_calls(storage)}
    strays = _stray_recordings(storage, on_disk)
    per_call = {call_id: _check_call(storage, call_id, state, on_disk.get(call_id),
                                     strays.get(call_id))
                for call_id in sorted({*state.receipts, *state.deleted, *on_disk, *strays})}
    suspects = [call_id for call_id, found in per_call.items() if found]
    if suspects:
        # The daemon may have sealed or deleted a call while we read: look again at those
        # calls with the log as it is now.
        newer = LedgerState()
        newer.feed(ledger.read())
        if newer.lines != state.lines:
            for call_id in suspects:
                again = next(iter(storage.glob(f"*/*/*/{call_id}{RECEIPT_SUFFIX}")), None)
                per_call[call_id] = _check_call(
                    storage, call_id, newer, load_call(again) if again else None,
                    strays.get(call_id))
    for found in per_call.values():
        breaks.extend(found)
    breaks.extend(
        Break(path, "a receipt that could not be read at start-up, moved aside (the daemon "
              "made a new one from what was left, or the audit log still names the lost "
              "one): compare it with a backup, restore the receipt if one is missing, then "
              "remove this file")
        for path in sorted(storage.glob(f"*/*/*/*{RECEIPT_SUFFIX}{CORRUPT_SUFFIX}*")))
    return Verification(breaks, len(state.receipts), len(state.deleted), state.lines)


def _stray_recordings(storage: Path, on_disk: dict[str, Call]) -> dict[str, list[Path]]:
    """Recordings (and kept unreadable ones) whose receipt is not on disk."""
    strays: dict[str, list[Path]] = {}
    for path in sorted(storage.glob("*/*/*/*.opus*")):
        call_id = path.name.split(".", 1)[0]
        if CALL_ID_PATTERN.fullmatch(call_id) and call_id not in on_disk:
            strays.setdefault(call_id, []).append(path)
    return strays


def _check_call(storage: Path, call_id: str, state: LedgerState, call: Call | None,
                strays: list[Path] | None) -> list[Break]:
    if call_id in state.deleted:
        left = [*(call.files() if call else []), *(strays or [])]
        when = state.deleted[call_id].get("at")
        return [Break(path, f"deleted on {when} (audit log) but still on disk; the daemon's "
                      "next retention sweep removes it") for path in left]
    sealed = state.receipts.get(call_id)
    if sealed is None:
        found = [Break(path, "recording without a receipt") for path in strays or []]
        if call is not None and call.error:
            found.append(Break(call.receipt_path, f"{call.error}"))
        elif call is not None and call.state in SEALED_STATES:
            found.append(Break(call.receipt_path, f"a {call.state} receipt that is not in the "
                               "audit log: sealed outside the chain, or its log line removed"))
        return found
    path = storage / str(sealed.get("path"))
    if call is None or not path.is_file():
        return [Break(path, f"receipt seq {sealed.get('seq')} is missing, and the audit log "
                      "records no deletion: removed or moved by hand")]
    actual = file_sha256(path)
    if actual != sealed.get("sha256"):
        return [Break(path, f"changed since it was sealed as seq {sealed.get('seq')} (sha256 "
                      f"{actual[:12]}… on disk, {str(sealed.get('sha256'))[:12]}… in the "
                      "audit log)")]
    found = []
    chain = call.receipt.get("chain")
    if chain != {"seq": sealed.get("seq"), "previous_sha256": sealed.get("previous_sha256")}:
        found.append(Break(path, f"its chain {chain} is not its place in the audit log "
                           f"(seq {sealed.get('seq')})"))
    if call.receipt.get("call_id") != call_id:
        found.append(Break(path, f"names call {call.receipt.get('call_id')!r}, not {call_id}"))
    recording = call.receipt.get("recording")
    if isinstance(recording, dict) and isinstance(recording.get("sha256"), str):
        name = str(recording.get("file"))
        file = call.folder / name
        if "/" in name or not file.is_file():
            found.append(Break(file, "the recording its receipt names is missing"))
        elif file_sha256(file) != recording["sha256"]:
            found.append(Break(file, "the recording differs from the sha256 in its receipt"))
    # A recording beside a receipt that does not name it: put there by hand, or kept for a
    # call its receipt says was not recorded (a never_record number, a failed disclosure).
    named = str(recording.get("file")) if isinstance(recording, dict) else None
    for other in sorted(call.folder.glob(f"{call_id}{RECORDING_SUFFIX}*")):
        if other.name != named:
            found.append(Break(other, "a recording its receipt does not name: the receipt "
                               "says this call was not recorded, or recorded to another file"))
    return found


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
