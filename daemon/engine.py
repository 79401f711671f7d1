"""Capture threads that only read and copy, and the engine that runs lines on their clock."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from linerec.audio.ring import SampleRing
from linerec.daemon.events import EventBus, EventKind, make_event
from linerec.daemon.line import Line
from linerec.hw.base import CaptureStream, Clock, HardwareError

logger = logging.getLogger(__name__)


class CaptureThread(threading.Thread):
    """Reads one capture device period by period and copies each channel into its line's
    ring. Nothing else happens here: no logging, no disk, no MQTT, no lock shared with slow
    code. The doorbell is an Event whose lock is only ever held for an instant."""

    def __init__(self, name: str, stream: CaptureStream, taps: dict[int, SampleRing],
                 priority: int = 0,
                 reopen: Callable[[], CaptureStream] | None = None) -> None:
        super().__init__(name=f"capture-{name}", daemon=True)
        self.stream = stream
        self._reopen = reopen
        self.priority = priority
        self.started = threading.Event()
        """Set once the thread runs with its scheduling settled."""
        self.priority_error: str | None = None
        self._taps = list(taps.items())
        self.frames_captured = 0
        """Frames copied into every ring; the device's sample clock."""
        self.gaps: list[tuple[int, int, str]] = []
        """(position, frames lost, cause) of each gap that silence fills: an ``overrun``, or
        the ``device`` failing and being reopened. For the receipts of calls it touched."""
        self.device_error: str | None = None
        """Why the device is gone, while the thread tries to reopen it."""
        self.reopened = 0
        self.reopen_attempts = 0
        """Attempts to reopen a failed device: while it is gone, these show the thread is
        alive and trying (the watchdog counts them as progress)."""
        self.doorbell = threading.Event()
        self.failure: HardwareError | None = None
        self._stopping = False
        self._stop_event = threading.Event()
        self._last_good_read = time.monotonic()

    def run(self) -> None:
        if self.priority:
            try:
                # Inside the thread, this changes only this thread.
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.priority))
            except OSError as exc:
                self.priority_error = str(exc)
        self.started.set()
        while not self._stopping:
            try:
                frames = self.stream.read_period()
            except HardwareError as exc:
                if self._recover(exc):
                    continue
                self.failure = exc
                self.doorbell.set()
                return
            self._last_good_read = time.monotonic()
            lost = self.stream.take_lost()
            if lost:
                # Silence where audio was lost, so that what follows keeps its time.
                cause = "device" if self._just_reopened else "overrun"
                self.gaps.append((self.frames_captured, lost, cause))
                for _, ring in self._taps:
                    ring.write_silence(lost)
                self.frames_captured += lost
            self._just_reopened = False
            for channel, ring in self._taps:
                ring.write(frames[:, channel])
            self.frames_captured += len(frames)
            self.doorbell.set()

    _just_reopened = False

    def _recover(self, error: HardwareError) -> bool:
        """The device failed (unplugged, suspended, busy): close it and reopen it with a
        growing delay until it comes back or the recorder stops. The gap is measured from
        the last good period, by the new stream."""
        if self._reopen is None:
            return False
        self.device_error = str(error)
        self.doorbell.set()  # the engine reports it
        with contextlib.suppress(Exception):
            self.stream.close()
        delay = 0.1
        while not self._stop_event.wait(delay):
            self.reopen_attempts += 1
            try:
                stream = self._reopen()
            except Exception:  # whatever the reopen raises, try again later
                delay = min(delay * 2, 5.0)
                continue
            # From this thread's last good period, not the failed stream's: a stream that
            # failed again before delivering anything has no good period of its own.
            stream.measure_gap_from(self._last_good_read)
            self.stream = stream
            self.device_error = None
            self.reopened += 1
            self._just_reopened = True
            return True
        return False

    def request_stop(self) -> None:
        self._stopping = True
        self._stop_event.set()

    def close(self) -> None:
        """Close the device (whichever stream is current after reopens)."""
        self.stream.close()


class TapEngine(threading.Thread):
    """Runs the lines of one capture device: one tick per captured period, in order.

    ``until`` stops the engine at a sample position (the simulator's end of scenario).
    """

    def __init__(
        self,
        name: str,
        capture: CaptureThread,
        lines: list[Line],
        *,
        clock: Clock,
        period: int,
        events: EventBus,
        until: int | None = None,
    ) -> None:
        super().__init__(name=f"engine-{name}", daemon=True)
        self.capture_name = name
        self.capture = capture
        self.lines = lines
        self.position = 0
        """Next capture sample position to process."""
        self.turns = 0
        """Turns of the engine's loop: it waits at most 0.5 s for the doorbell, so this
        rises while the engine is alive, with audio or without."""
        self.done = threading.Event()
        self._clock = clock
        self._period = period
        self._events = events
        self._until = until
        self._stopping = threading.Event()
        self._gaps_seen = 0
        self._device_error: str | None = None

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.done.set()

    def _run(self) -> None:
        doorbell = self.capture.doorbell
        while not self._stopping.is_set():
            self.turns += 1
            doorbell.clear()
            captured = self.capture.frames_captured
            while captured - self.position >= self._period and not self._stopping.is_set():
                if self._until is not None and self.position >= self._until:
                    return
                self._tick()
            if self._until is not None and self.position >= self._until:
                return
            if self.capture.device_error is not None:
                self._watch_device(self.position)
            if self.capture.failure is not None:
                self._events.emit(make_event(
                    EventKind.ERROR, line=None, call_id=None,
                    ts=self._clock.timestamp(self.capture_name, self.position),
                    message=str(self.capture.failure)))
                return
            doorbell.wait(0.5)

    def _tick(self) -> None:
        start = self.position
        end = start + self._period
        self._clock.advance(self.capture_name, end)
        self._watch_device(start)
        gaps = self.capture.gaps
        while self._gaps_seen < len(gaps) and gaps[self._gaps_seen][0] < end:
            position, lost, cause = gaps[self._gaps_seen]
            self._gaps_seen += 1
            logger.warning("%s on capture %s at sample %d: %d frames lost, silence in their "
                           "place", cause, self.capture_name, position, lost)
            for line in self.lines:
                line.note_capture_gap(position, lost, cause)
        for line in self.lines:
            try:
                line.tick(start, self._period)
            except Exception as exc:
                logger.exception("line %s failed at sample %d", line.name, start,
                                 extra=line.journal_fields())
                line.fault(start, exc)
        self.position = start + self._period

    def _watch_device(self, position: int) -> None:
        """Report a device that failed, once, and its return; the lines' LEDs show it."""
        error = self.capture.device_error
        if bool(error) != bool(self._device_error):
            for line in self.lines:
                line.show_capture_lost(bool(error))
        if error and error != self._device_error:
            logger.error("capture device %s failed (%s); reopening it", self.capture_name, error)
            self._events.emit(make_event(
                EventKind.ERROR, line=None, call_id=None,
                ts=self._clock.timestamp(self.capture_name, position),
                message=f"capture device {self.capture_name} failed: {error}; reopening it"))
        elif self._device_error and not error:
            logger.warning("capture device %s is back", self.capture_name)
        self._device_error = error

    def stop(self) -> None:
        self._stopping.set()
        self.capture.doorbell.set()

    def shutdown_lines(self) -> None:
        """Close every call in progress; run after the engine thread has ended."""
        for line in self.lines:
            try:
                line.shutdown(self.position)
            except Exception:
                logger.exception("line %s did not shut down cleanly", line.name,
                                 extra=line.journal_fields())
