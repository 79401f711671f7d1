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
    (WatchdogSec) restarts the service, which reopens the devices. A device that failed
    and is being reopened does not stop them while its thread keeps trying: a restart
    would not bring it back sooner, and would cut off the lines on healthy devices (the
    lines' LEDs and the health topic say it is gone). A playback device that stops taking
    audio stops them too: its lines could not play a disclosure, and a restart reopens it."""

    def __init__(self, recorder: Recorder, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._recorder = recorder
        self._interval = interval_s
        # Half of systemd's interval, as sd_watchdog_enabled(3) advises.
        self._every = interval_s / 2
        self._clock = clock
        self._last_ping = clock()
        self._seen = recorder.progress()
        self._played = recorder.playback_progress()
        self.stalled: list[str] = []
        """Capture devices that did not advance at the last look."""
        self._told = False

    def due(self) -> bool:
        """True when a ping is due and earned; remembers the progress it saw."""
        now = self._clock()
        if now - self._last_ping < self._every:
            return False
        progress = self._recorder.progress()
        played = self._recorder.playback_progress()
        self.stalled = [f"capture {name}" for name, now in progress.items()
                        if not now.advanced_since(self._seen[name])]
        # A playback device is stuck when periods wait for it and it took none, or when it
        # failed (a restart reopens it); with the capture gone no period comes, and an idle
        # device is not stuck.
        self.stalled += [f"playback {name}" for name, (blocks, waiting) in played.items()
                         if waiting and blocks <= self._played[name][0]]
        if self.stalled:
            if not self._told and now - self._last_ping >= self._interval * 0.75:
                # Said once the restart is near, not at every look that comes up short.
                self._told = True
                logger.error("no progress from %s for %.1f s: the watchdog is not fed, and "
                             "systemd restarts linerec if this goes on",
                             ", ".join(self.stalled), now - self._last_ping)
            return False
        self._told = False
        self._seen = progress
        self._played = played
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
        while not stop.wait(TICK_S):
            if finished():
                return Outcome.FINISHED
            if checks is not None:
                checks.run()
            if restart_pending() and recorder.free():
                return Outcome.RESTART
            if watchdog is not None and watchdog.due():
                notifier.watchdog()
            recorder.show_service_state()
            if recorder.summary() != summary:
                summary = recorder.summary()
                notifier.status(summary)
        return Outcome.STOPPED
    finally:
        notifier.stopping()
        recorder.stop()
