"""The daemon's life once its recorder is built, the same for `linerec run` on the HAT and
for the simulator: start, READY=1, STATUS= when it changes, WATCHDOG=1 only while the
capture advances, then STOPPING=1 and an orderly stop."""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from linerec.daemon.events import EventKind, make_event
from linerec.daemon.runtime import Recorder
from linerec.daemon.supervisor import ServiceNotifier

logger = logging.getLogger(__name__)

TICK_S = 0.2
"""How often the loop looks at the recorder: well inside any watchdog interval."""
RECHECK_S = 60.0
"""How often the start-up checks run again: a clock that NTP synchronises a minute after
boot, or a permission fixed by hand, stops counting as a problem."""


class Outcome(enum.Enum):
    STOPPED = "stopped"
    """SIGTERM or SIGINT."""
    FINISHED = "finished"
    """``finished()`` said so: the simulator's scenario ended, or a capture device died."""
    RESTART = "restart"
    """Device settings changed over MQTT and no line has a call."""


class CaptureWatchdog:
    """Decides when systemd may be told WATCHDOG=1: only when every capture device has
    delivered audio and every engine has worked through it since the last ping. A hung
    driver, a stuck capture thread or a deadlocked engine stops the pings, and systemd
    (WatchdogSec) restarts the service, which reopens the devices."""

    def __init__(self, recorder: Recorder, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._recorder = recorder
        # Half of systemd's interval, as sd_watchdog_enabled(3) advises.
        self._every = interval_s / 2
        self._clock = clock
        self._last_ping = clock()
        self._seen = recorder.progress()
        self.stalled: list[str] = []
        """Capture devices that did not advance at the last look."""

    def due(self) -> bool:
        """True when a ping is due and earned; remembers the progress it saw."""
        now = self._clock()
        if now - self._last_ping < self._every:
            return False
        progress = self._recorder.progress()
        self.stalled = [name for name, (captured, processed) in progress.items()
                        if captured <= self._seen[name][0] or processed <= self._seen[name][1]]
        if self.stalled:
            return False
        self._seen = progress
        self._last_ping = now
        return True


class StartupChecks:
    """``linerec doctor``'s checks that need no exclusive hardware, run by the daemon at
    start and every RECHECK_S: each failure goes out once as a ``check_failed`` event (the
    journal, MQTT) and keeps the service LED blinking until it passes again."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._due = 0.0

    def run(self) -> None:
        from linerec.daemon.doctor import startup_checks

        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + RECHECK_S
        recorder = self._recorder
        failing = []
        for check in startup_checks(recorder.config):
            if check.ok:
                if check.problem:
                    logger.warning("%s", check.line())
                if check.name in recorder.check_failures:
                    logger.warning("the %s check passes again", check.name)
                continue
            failing.append(check.name)
            if check.name not in recorder.check_failures:
                recorder.events.emit(make_event(
                    EventKind.CHECK_FAILED, line=None, call_id=None, ts=datetime.now(UTC),
                    check=check.name, message=check.problem, fix=check.fix))
        recorder.check_failures = failing


def serve(recorder: Recorder, notifier: ServiceNotifier, stop: threading.Event, *,
          finished: Callable[[], bool], restart_pending: Callable[[], bool],
          on_ready: Callable[[], None] | None = None,
          checks: StartupChecks | None = None) -> Outcome:
    """Start the recorder, tell systemd, and look after it until a signal, ``finished``,
    or a restart to apply new device settings. The recorder is stopped in every case
    (STOPPING=1 first); errors from its start propagate after that stop."""
    try:
        recorder.start()
        if checks is not None:
            checks.run()
        summary = recorder.summary()
        recorder.show_service_state()
        notifier.ready(summary)
        logger.info("ready: %s", summary)
        if on_ready is not None:
            on_ready()
        interval = notifier.watchdog_interval()
        watchdog = CaptureWatchdog(recorder, interval) if interval else None
        stalled: list[str] = []
        while not stop.wait(TICK_S):
            if finished():
                return Outcome.FINISHED
            if checks is not None:
                checks.run()
            if restart_pending() and recorder.free():
                return Outcome.RESTART
            if watchdog is not None:
                if watchdog.due():
                    notifier.watchdog()
                if watchdog.stalled != stalled:
                    stalled = watchdog.stalled
                    if stalled:
                        # No ping: systemd restarts linerec if this lasts WatchdogSec.
                        logger.error("capture %s delivers no audio: the watchdog is not "
                                     "fed", ", ".join(stalled))
            recorder.show_service_state()
            if recorder.summary() != summary:
                summary = recorder.summary()
                notifier.status(summary)
        return Outcome.STOPPED
    finally:
        notifier.stopping()
        recorder.stop()
