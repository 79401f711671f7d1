"""The storage guard: free space on the recordings' filesystem, watched from its own thread.

Below ``low_mb`` retention runs at once and a ``storage_low`` alarm goes out. Below
``floor_mb`` new calls are not recorded (``storage_full``; the lines' LEDs blink), so a card
that fills up turns calls away at their start instead of cutting recordings off mid-call:
the space left under the floor is for the calls already recording. A level is left only
once free space is a margin above its threshold, so a card hovering at the line does not
flap.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

from linerec.daemon.config import StorageGuardConfig
from linerec.daemon.events import EventBus, EventKind, make_event

logger = logging.getLogger(__name__)

MB = 1_000_000
HYSTERESIS = 0.05
"""A level is left once free space is this share (and at least 20 MB) above its threshold."""


class SpaceLevel(Enum):
    OK = "ok"
    LOW = "low"
    FULL = "full"


def free_bytes(storage: Path) -> int:
    """Space an unprivileged writer (the service user) can still use."""
    stats = os.statvfs(storage)
    return stats.f_bavail * stats.f_frsize


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
        self._stop_requested = threading.Event()

    @property
    def refusing(self) -> bool:
        """New calls are not recorded: the storage is below its floor."""
        return self.level is SpaceLevel.FULL

    def check(self) -> SpaceLevel:
        """Measure once; on a change of level, tell and act."""
        try:
            self.free = free_bytes(self.storage)
        except OSError as exc:
            # Vanished or unreadable storage: recording would fail too. Fail closed.
            logger.error("cannot measure free space on %s: %s", self.storage, exc)
            self._change(SpaceLevel.FULL, f"the storage {self.storage} cannot be measured "
                         f"({exc}); new calls are not recorded")
            return self.level
        level = self._level_for(self.free)
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
        if not above(floor, self.level is SpaceLevel.FULL):
            return SpaceLevel.FULL
        if not above(low, self.level is not SpaceLevel.OK):
            return SpaceLevel.LOW
        return SpaceLevel.OK

    def _change(self, level: SpaceLevel, message: str) -> None:
        if level is self.level:
            return
        self.level = level
        kind = {SpaceLevel.OK: EventKind.STORAGE_OK, SpaceLevel.LOW: EventKind.STORAGE_LOW,
                SpaceLevel.FULL: EventKind.STORAGE_FULL}[level]
        self.events.emit(make_event(kind, line=None, call_id=None, ts=datetime.now(UTC),
                                    free_mb=self.free // MB, message=message))
        if level is not SpaceLevel.OK:
            self._on_low()

    def run(self) -> None:
        while not self._stop_requested.wait(self.config.check_interval_s):
            self.check()

    def stop(self) -> None:
        self._stop_requested.set()
