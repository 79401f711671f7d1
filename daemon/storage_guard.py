"""The storage guard: free space on the recordings' filesystem, watched from its own thread.

Below ``low_mb`` retention runs at once and a ``storage_low`` alarm goes out. Below
``floor_mb`` new calls are not recorded (``storage_full``; the lines' LEDs blink), so a card
that fills up turns calls away at their start instead of cutting recordings off mid-call:
the space left under the floor is for the calls already recording. A level is left only
once free space is a margin above its threshold, so a card hovering at the line does not
flap.

The floor is a forecast; ``StorageState`` handles the storage filling up for real (ENOSPC:
a floor set to 0, a card smaller than thought, another writer) and storage that goes away
(read-only after disk errors, unmounted, the folder removed): calls are turned away from
the moment a write fails, and the recordings in progress are closed with what they had,
using a reserve set aside for exactly that.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

from linerec.daemon.config import StorageGuardConfig
from linerec.daemon.events import EventBus, EventKind, make_event
from linerec.daemon.paths import reserve_path

logger = logging.getLogger(__name__)

MB = 1_000_000
HYSTERESIS = 0.05
"""A level is left once free space is this share (and at least 20 MB) above its threshold."""
RESERVE_BYTES = 256 * 1024
"""Space kept in ``<storage>/.linerec-reserve`` and released at the first ENOSPC, so that
the recordings in progress can still be closed and every receipt written. Why a reserve at
all: when the disk is full, closing a recording needs room too (the page the encoder had
buffered, the EOS page, the receipt written beside it through a temporary file, a line in
the audit log), and without it the recording that hit ENOSPC is left as a ``.part`` with no
receipt. Why this size: closing two recordings, sealing their receipts and a turned-away
call's took 16 KiB (four 4 KiB blocks, tests/test_storage_faults.py), so the worst case is
a few blocks per line; 256 KiB covers the four lines of the largest HAT profile many times
over, with dozens of turned-away calls' receipts after them, and is nothing on a card of
gigabytes. Filesystem reserved blocks (ext4's 5 %) do not help: they
are root's, and the daemon runs as its own user."""
RESUME_BYTES = 2 * RESERVE_BYTES
"""After the storage filled up, recording resumes once this much is free (the reserve made
again, and as much again for recording), above the floor: so that the first new call does
not fill it again at once."""
RESUME_INODES = 64
"""...and, where the file system counts them, this many free inodes: a storage full of
inodes (or over a quota) fails with ENOSPC (EDQUOT) while bytes look free."""
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""Write failures that mean: no room left on the storage."""


def storage_full_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


class StorageState:
    """What every writer to one storage shares: the reserve, and the failure a writer saw.

    The engine threads report write failures here (``write_failed``); the guard thread sets
    the reserve aside and lifts a failure once the storage is usable again. One per storage
    folder in the process (``storage_state``): the lines and the guard each find it from the
    folder, as they find every file in it (daemon/paths.py).
    """

    def __init__(self, storage: Path, reserve_bytes: int = RESERVE_BYTES) -> None:
        self.storage = storage
        self.reserve_path = reserve_path(storage)
        self.reserve_bytes = reserve_bytes
        self.failure: OSError | None = None
        """The latest write failure, until the guard finds the storage usable again."""
        self._recorders: list[weakref.WeakMethod[Callable[[], bool]]] = []
        """Each line's "is a recording of mine open?" (``watch``)."""
        self.root_dev: int | None = None
        """The storage folder's device at the guard's latest good check."""
        self.released = False
        """The reserve was given up to close recordings: the storage is full."""
        self.unusable: str | None = None
        """Set by the guard while the storage is gone, unmounted or read-only: why, and what
        to do. Nothing is written there meanwhile, not even a receipt: a folder made again
        by a write, or a file on an empty mount point, would hide where nobody looks."""
        self.wake = threading.Event()
        """Set on a failure: the guard measures at once instead of at its next interval."""
        self._lock = threading.Lock()

    @property
    def refusing(self) -> bool:
        """A write failed and the guard has not seen the storage usable since."""
        return self.released or self.failure is not None or self.unusable is not None

    def write_failed(self, exc: OSError) -> bool:
        """A write to the storage failed; from now on new calls are turned away. Returns
        whether the storage is full: then the reserve has been released, and the caller
        should close its recording (and write its receipt) now, in the space it freed."""
        self.failure = exc
        full = storage_full_error(exc)
        if full:
            with self._lock:
                if not self.released:
                    self.released = True
                    try:
                        self.reserve_path.unlink()
                    except FileNotFoundError:
                        pass
                    except OSError as unlink_error:
                        logger.error("cannot release the reserve %s: %s", self.reserve_path,
                                     unlink_error)
                    logger.error("%s is full (%s): the %d kB reserve is released to close "
                                 "the recordings in progress", self.storage, exc,
                                 self.reserve_bytes // 1024)
        self.wake.set()
        return full

    def watch(self, recording_open: Callable[[], bool]) -> None:
        """A line that records here: ``recording_open`` (a bound method) tells whether it
        has a recording open."""
        self._recorders.append(weakref.WeakMethod(recording_open))

    def recordings_open(self) -> bool:
        return any(method is not None and method()
                   for method in (ref() for ref in self._recorders))

    def held(self) -> bool:
        """Must a write failure stand for now? While a recording that was open when it
        happened is still open: the guard, woken at once by the failure, must not find the
        storage usable (and take back the room just freed) before every line has closed
        its recording in it, at its next tick."""
        return self.failure is not None and self.recordings_open()

    def moved(self) -> bool:
        """Is the storage folder no longer the one the guard last found usable (removed,
        or its card unmounted and the bare mount point left)? Asked at each call's start
        and before each recording is made, so that no call waits for the guard's next
        look; a move counts as a failed write, which wakes the guard."""
        known = self.root_dev
        if known is None:
            return False
        try:
            moved = os.stat(self.storage).st_dev != known
        except OSError:
            moved = True
        if moved:
            self.write_failed(OSError(errno.ENODEV, f"the storage {self.storage} is not the "
                                      "file system the guard last found there"))
        return moved

    def ensure_reserve(self, free: int, inodes: int | None = None) -> bool:
        """Set the reserve aside if it is not (at start, after a release, on storage that
        came back). After a release, only once the recordings open then are closed and
        ``RESUME_BYTES`` (and ``RESUME_INODES``, where ``inodes`` is known) are free.
        Returns whether the reserve is in place."""
        with self._lock:
            try:
                if self.reserve_path.stat().st_size >= self.reserve_bytes \
                        and not self.released:
                    return True
            except FileNotFoundError:
                pass
            if self.released and (free < RESUME_BYTES or self.held()
                                  or (inodes is not None and inodes < RESUME_INODES)):
                return False
            try:
                _allocate(self.reserve_path, self.reserve_bytes)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    self.reserve_path.unlink()
                logger.warning("cannot set aside the %d kB reserve %s: %s",
                               self.reserve_bytes // 1024, self.reserve_path, exc)
                return False
            self.released = False
            return True


def _allocate(path: Path, size: int) -> None:
    """A file of ``size`` bytes whose blocks are really taken (not a sparse file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            block = bytes(64 * 1024)  # a filesystem without fallocate: write it out
            for offset in range(0, size, len(block)):
                os.pwrite(fd, block[: size - offset], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


_states: dict[str, StorageState] = {}
_states_lock = threading.Lock()


def storage_state(storage: Path) -> StorageState:
    """The one ``StorageState`` of a storage folder in this process."""
    key = os.path.abspath(storage)
    with _states_lock:
        state = _states.get(key)
        if state is None:
            state = _states[key] = StorageState(storage)
        return state


class SpaceLevel(Enum):
    OK = "ok"
    LOW = "low"
    FULL = "full"


def free_bytes(storage: Path) -> int:
    """Space an unprivileged writer (the service user) can still use."""
    stats = os.statvfs(storage)
    return stats.f_bavail * stats.f_frsize


def free_inodes(storage: Path) -> int | None:
    """Inodes an unprivileged writer can still use; None where the file system does not
    count them (FAT, btrfs)."""
    stats = os.statvfs(storage)
    return stats.f_favail if stats.f_files else None


class StorageGuard(threading.Thread):
    def __init__(self, storage: Path, config: StorageGuardConfig, events: EventBus, *,
                 on_low: Callable[[], None] = lambda: None) -> None:
        super().__init__(name="storage-guard", daemon=True)
        self.storage = storage
        self.config = config
        self.events = events
        self._on_low = on_low
        self.level = SpaceLevel.OK
        self.free = 0
        """Bytes free at the latest check."""
        self.state = storage_state(storage)
        self._under_floor = False
        """FULL because of the floor (left with its margin), not because a write failed
        (left once the reserve is made again)."""
        self._full_why = ""
        """What made the level FULL, as told last."""
        self._mounted: bool | None = None
        """Was the storage a mount point of its own at the latest good check?"""
        self._stop_requested = threading.Event()

    @property
    def refusing(self) -> bool:
        """New calls are not recorded: the storage is below its floor, or a write to it
        failed and it has not been seen usable since."""
        return self.level is SpaceLevel.FULL or self.state.refusing

    def check(self) -> SpaceLevel:
        """Measure once; on a change of level, tell and act."""
        problem = self._unusable()
        self.state.unusable = problem
        if problem is not None:
            # Recording would fail too, or would land where nobody looks. Fail closed.
            logger.error("%s", problem)
            self._under_floor = False
            self._change(SpaceLevel.FULL, problem, why=problem)
            return self.level
        self.free = free_bytes(self.storage)
        failure = self.state.failure
        if not self.state.ensure_reserve(self.free, free_inodes(self.storage)):
            self.free = free_bytes(self.storage)
            need_kb = (RESUME_BYTES if self.state.released else RESERVE_BYTES) // 1024
            cause = (f"writing failed ({failure.strerror})" if failure is not None
                     and storage_full_error(failure) else "there is no room")
            self._change(SpaceLevel.FULL, f"the storage {self.storage} is full: {cause}. "
                         "Recordings in progress were closed with what they had; new calls "
                         f"are not recorded until {need_kb} kB are free (and the floor of "
                         f"{self.config.floor_mb} MB): export and delete calls, or fit a "
                         "larger card", why="full")
            self._under_floor = False
            return self.level
        self.free = free_bytes(self.storage)
        if failure is not None and self.state.failure is failure and not self.state.held():
            # Usable again (measured, writable, and the reserve in place).
            self.state.failure = None
        level = self._level_for(self.free)
        self._under_floor = level is SpaceLevel.FULL
        if level is not self.level:
            free_mb = self.free // MB
            self._change(level, {
                SpaceLevel.OK: f"{free_mb} MB free on {self.storage}: recording as usual",
                SpaceLevel.LOW: f"only {free_mb} MB free on {self.storage} (alarm below "
                                f"{self.config.low_mb} MB); expired calls are being deleted "
                                "now: export and delete calls, or fit a larger card",
                SpaceLevel.FULL: f"only {free_mb} MB free on {self.storage}, under the floor "
                                 f"of {self.config.floor_mb} MB: new calls are not recorded "
                                 "until space is freed",
            }[level])
        return self.level

    def _level_for(self, free: int) -> SpaceLevel:
        def above(threshold_mb: int, staying: bool) -> bool:
            margin = max(threshold_mb * MB * HYSTERESIS, 20 * MB) if staying else 0
            return free >= threshold_mb * MB + margin

        floor, low = self.config.floor_mb, self.config.low_mb
        if not above(floor, self.level is SpaceLevel.FULL and self._under_floor):
            return SpaceLevel.FULL
        if not above(low, self.level is not SpaceLevel.OK):
            return SpaceLevel.LOW
        return SpaceLevel.OK

    def _change(self, level: SpaceLevel, message: str, *, why: str = "floor") -> None:
        """Tell a new level; and a new cause of FULL (``why``: the floor, a full storage, or
        the storage gone or read-only): each needs its own fix."""
        if level is self.level and (level is not SpaceLevel.FULL or why == self._full_why):
            return
        self.level = level
        self._full_why = why
        kind = {SpaceLevel.OK: EventKind.STORAGE_OK, SpaceLevel.LOW: EventKind.STORAGE_LOW,
                SpaceLevel.FULL: EventKind.STORAGE_FULL}[level]
        self.events.emit(make_event(kind, line=None, call_id=None, ts=datetime.now(UTC),
                                    free_mb=self.free // MB, message=message))
        if level is not SpaceLevel.OK:
            self._on_low()

    def _unusable(self) -> str | None:
        """Why the storage cannot take recordings now (each message says what to do), or
        None."""
        storage = self.storage
        try:
            stats = os.statvfs(storage)
            here = os.stat(storage)
            parent = os.stat(storage.parent) if storage.parent != storage else here
        except OSError as exc:
            return (f"the storage {storage} cannot be measured ({exc.strerror}): it is gone "
                    "(unmounted, or the folder removed); mount it again or create the "
                    "folder; new calls are not recorded meanwhile")
        mounted = here.st_dev != parent.st_dev
        if self._mounted and not mounted:
            # The card or disk went away and left its empty mount point: recordings would
            # go to the system's own disk, where nobody looks for them, and fill it.
            return (f"the storage {storage} is no longer mounted (it was a file system of "
                    "its own at start): mount it again; new calls are not recorded meanwhile")
        if stats.f_flag & os.ST_RDONLY or not os.access(storage, os.W_OK):
            return (f"the storage {storage} is read-only (remounted after disk errors, or "
                    "its permissions changed): check the card or disk (fsck), make it "
                    "writable for the service user, or replace it; new calls are not "
                    "recorded meanwhile")
        self._mounted = mounted
        self.state.root_dev = here.st_dev
        return None

    def run(self) -> None:
        while True:
            self.state.wake.wait(self.config.check_interval_s)
            if self._stop_requested.is_set():
                return
            self.state.wake.clear()
            try:
                self.check()
            except OSError as exc:  # measured a moment ago; gone between two calls
                logger.error("cannot check the storage %s: %s", self.storage, exc)

    def stop(self) -> None:
        self._stop_requested.set()
        self.state.wake.set()
