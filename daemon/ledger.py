"""The appliance's audit log: an append-only, hash-chained record of what became of receipts.

``<storage>/audit.jsonl`` holds one JSON object per line. Each line names the sha256 of the
line before it (``prev``), so a line removed, inserted or edited breaks the chain; each also
carries the receipt chain's head after it (``head``: the last sealed receipt's ``seq`` and
``sha256``), so a writer finds the head by reading the last line only. The daemon and the
``linerec`` command share the file: appends happen under ``flock`` (read the tail, append,
one fsync before the lock is let go), readers take a shared lock. The log holds call ids,
never numbers or names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from linerec.audio.recording import fsync_dir
from linerec.daemon.events import iso_ms

logger = logging.getLogger(__name__)

LEDGER_NAME = "audit.jsonl"

TAIL_BLOCK = 8192
"""Bytes read at a time, backwards from the end, to find the last line."""


class EntryKind(StrEnum):
    RECEIPT = "receipt"
    """A receipt was sealed: its place in the chain and the sha256 of its bytes."""
    DELETED = "deleted"
    """A call's files were deleted: which, why, by whom, and the receipt's seq and sha256."""
    HOLD = "hold"
    """A legal hold: retention leaves the call alone until it is released."""
    RELEASE = "release"
    """The end of a legal hold."""
    EXPORT = "export"
    """Calls were copied out (to a folder or a zip)."""
    TORN_TAIL = "torn_tail"
    """A write cut off by a crash left a partial line; it was dropped before this one."""


@dataclass(frozen=True)
class ChainHead:
    """The last sealed receipt: the next one gets ``seq + 1`` and names ``sha256``."""

    seq: int
    sha256: str | None

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "sha256": self.sha256}


GENESIS = ChainHead(0, None)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_entry(entry: dict[str, Any]) -> bytes:
    """One line: compact, keys sorted, ASCII only, so its bytes (and hash) are unambiguous."""
    return (json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            + "\n").encode("ascii")


class LedgerSession:
    """The audit log while this process holds its exclusive lock: the head, and appends."""

    def __init__(self, ledger: Ledger, fd: int) -> None:
        self._ledger = ledger
        self._fd = fd
        size = os.fstat(fd).st_size
        last, torn = _read_tail(fd, size)
        self._torn = torn
        self._prev = sha256_hex(last) if last else None
        self.head = _head_of(last, fd, ledger.path) if last else GENESIS
        self.size = size - len(torn)
        """Bytes of whole lines in the log (a torn tail excluded)."""
        self.unsynced = False

    def append(self, kind: EntryKind, **fields: Any) -> dict[str, Any]:
        """Append an entry that does not move the receipt chain (not a receipt)."""
        if kind is EntryKind.RECEIPT:
            raise ValueError("receipts are appended with append_receipt")
        return self._write(kind, fields, self.head)

    def append_receipt(self, *, call_id: str, path: str, sha256: str,
                       supersedes: str | None = None) -> dict[str, Any]:
        """The next link of the receipt chain; ``supersedes`` is the sha256 of the version
        of this call's receipt that this one replaces (recovery amending a sealed receipt)."""
        seq = self.head.seq + 1
        fields: dict[str, Any] = {"call_id": call_id, "path": path, "seq": seq,
                                  "sha256": sha256, "previous_sha256": self.head.sha256}
        if supersedes is not None:
            fields["supersedes"] = supersedes
        return self._write(EntryKind.RECEIPT, fields, ChainHead(seq, sha256))

    def read_since(self, offset: int) -> bytes:
        """The whole lines from ``offset`` on: what others appended since a replay."""
        return _read_all(self._fd, self.size, offset)

    def _write(self, kind: EntryKind, fields: dict[str, Any], head: ChainHead) -> dict[str, Any]:
        data = b""
        if self._torn:
            # Only a writer that died mid-line leaves a partial line (every writer holds the
            # lock): that entry never happened. It is dropped, and the drop is recorded.
            os.ftruncate(self._fd, self.size)
            dropped = {"kind": str(EntryKind.TORN_TAIL), "at": _now(),
                       "dropped_bytes": len(self._torn),
                       "dropped_sha256": sha256_hex(self._torn),
                       "prev": self._prev, "head": self.head.as_json()}
            line = encode_entry(dropped)
            data += line
            self._prev = sha256_hex(line)
            logger.warning("%s ended in a cut-off line of %d bytes (a crash mid-write); "
                           "dropped and recorded", self._ledger.path, len(self._torn))
            self._torn = b""
        entry = {"kind": str(kind), "at": _now(), **fields, "prev": self._prev,
                 "head": head.as_json()}
        line = encode_entry(entry)
        data += line
        _write_all(self._fd, data)
        self.unsynced = True
        self._prev = sha256_hex(line)
        self.head = head
        self.size += len(data)
        return entry


class Ledger:
    """``<storage>/audit.jsonl``; cheap to construct, opened per operation."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.path = storage / LEDGER_NAME

    @contextlib.contextmanager
    def locked(self) -> Iterator[LedgerSession]:
        """Exclusive: the daemon's lines, the retention sweep and the command take turns.
        Each holder keeps the lock for a few small writes and fsyncs only."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if created:
                self._settle_new_file()
            session = LedgerSession(self, fd)
            try:
                yield session
            finally:
                # One fsync for all of a session's lines, before anyone else may read them
                # or act on them (a deletion removes files only after its line is durable).
                if session.unsynced:
                    os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock

    def append(self, kind: EntryKind, **fields: Any) -> dict[str, Any]:
        with self.locked() as session:
            return session.append(kind, **fields)

    def read(self) -> bytes:
        """All of the log (b"" when there is none yet), read under a shared lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return b""
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return _read_all(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def _settle_new_file(self) -> None:
        # The log's name must survive a power cut; and when root (an operator's command)
        # creates it, it must stay writable for the daemon, which owns the storage.
        fsync_dir(self.storage)
        if os.geteuid() == 0:
            owner = self.storage.stat()
            with contextlib.suppress(OSError):
                os.chown(self.path, owner.st_uid, owner.st_gid)


@dataclass
class LedgerState:
    """What the audit log says, replayed line by line: the receipt of each call as last
    sealed, the deletions, the holds in force; and every inconsistency found on the way."""

    receipts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """call id -> its current (last) receipt entry."""
    deleted: dict[str, dict[str, Any]] = field(default_factory=dict)
    holds: dict[str, dict[str, Any]] = field(default_factory=dict)
    head: ChainHead = GENESIS
    offset: int = 0
    """Bytes of the log replayed so far (whole lines only)."""
    lines: int = 0
    last_sha256: str | None = None
    problems: list[tuple[int, str]] = field(default_factory=list)
    """(line number, what is wrong)."""

    @classmethod
    def load(cls, ledger: Ledger) -> LedgerState:
        state = cls()
        state.feed(ledger.read())
        return state

    def feed(self, data: bytes) -> None:
        """Replay the whole lines in ``data`` (what follows ``offset``); a partial last
        line waits for more."""
        end = data.rfind(b"\n") + 1
        for raw in data[:end].splitlines(keepends=True):
            self._replay(raw)
        self.offset += end

    def _replay(self, raw: bytes) -> None:
        self.lines += 1
        number = self.lines
        sha = sha256_hex(raw)
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            self.problems.append((number, "not a valid entry (edited or corrupted)"))
            self.last_sha256 = sha
            return
        if entry.get("prev") != self.last_sha256:
            self.problems.append((number, "its prev does not match the line before: a line "
                                  "was removed, inserted or edited there"))
        self.last_sha256 = sha
        kind = entry.get("kind")
        call_id = entry.get("call_id")
        if kind == EntryKind.RECEIPT:
            self._replay_receipt(number, entry)
        elif kind == EntryKind.DELETED and isinstance(call_id, str):
            sealed = self.receipts.pop(call_id, None)
            if sealed is not None and entry.get("sha256") != sealed.get("sha256"):
                self.problems.append((number, f"the receipt of {call_id} deleted here is not "
                                      "the one sealed: it had been changed before"))
            self.deleted[call_id] = entry
            self.holds.pop(call_id, None)
        elif kind == EntryKind.HOLD and isinstance(call_id, str):
            self.holds[call_id] = entry
        elif kind == EntryKind.RELEASE and isinstance(call_id, str):
            self.holds.pop(call_id, None)
        elif kind not in (EntryKind.EXPORT, EntryKind.TORN_TAIL):
            self.problems.append((number, f"unknown entry {kind!r} (or no call id)"))
        if entry.get("head") != self.head.as_json():
            self.problems.append((number, f"its head {entry.get('head')} is not the receipt "
                                  f"chain's head {self.head.as_json()}"))

    def _replay_receipt(self, number: int, entry: dict[str, Any]) -> None:
        call_id = entry.get("call_id")
        seq = entry.get("seq")
        sha = entry.get("sha256")
        if not isinstance(call_id, str) or not isinstance(seq, int) or not isinstance(sha, str):
            self.problems.append((number, "a receipt entry without call_id, seq or sha256"))
            return
        if seq != self.head.seq + 1:
            self.problems.append((number, f"receipt seq {seq} follows seq {self.head.seq}: "
                                  "the chain has a gap or a repeat"))
        if entry.get("previous_sha256") != self.head.sha256:
            self.problems.append((number, f"receipt seq {seq} does not name the receipt "
                                  "before it"))
        sealed = self.receipts.get(call_id)
        if sealed is not None and entry.get("supersedes") != sealed.get("sha256"):
            self.problems.append((number, f"{call_id} is sealed again without superseding "
                                  "its sealed receipt"))
        if call_id in self.deleted:
            self.problems.append((number, f"{call_id} is sealed again after its deletion"))
        self.receipts[call_id] = entry
        self.head = ChainHead(seq, sha)


def _now() -> str:
    return iso_ms(datetime.now(UTC))


def _read_all(fd: int, size: int, offset: int = 0) -> bytes:
    chunks = []
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_tail(fd: int, size: int) -> tuple[bytes, bytes]:
    """(the last whole line, the bytes of a cut-off line after it), reading backwards."""
    buf = b""
    pos = size
    while pos > 0:
        step = min(TAIL_BLOCK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        end = buf.rfind(b"\n")
        if end == -1:
            continue
        start = buf.rfind(b"\n", 0, end)
        if start != -1 or pos == 0:
            return buf[start + 1 : end + 1], buf[end + 1 :]
    return b"", buf


def _head_of(last: bytes, fd: int, path: Path) -> ChainHead:
    head = _parse_head(last)
    if head is not None:
        return head
    # The last line is damaged (verify reports it). Recording goes on: the head is taken
    # from the last line that still says it.
    logger.error("the last line of %s is damaged; run `linerec verify` to see what else is",
                 path)
    data = _read_all(fd, os.fstat(fd).st_size)
    for raw in reversed(data.splitlines(keepends=True)):
        head = _parse_head(raw)
        if head is not None:
            return head
    return GENESIS


def _parse_head(raw: bytes) -> ChainHead | None:
    try:
        head = json.loads(raw)["head"]
        seq, sha = head["seq"], head["sha256"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(seq, int) and (sha is None or isinstance(sha, str)):
        return ChainHead(seq, sha)
    return None
