"""Capture threads that only read and copy, and the engine that runs lines on their clock."""

from __future__ import annotations

import logging
import os
import threading

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
                 priority: int = 0) -> None:
        super().__init__(name=f"capture-{name}", daemon=True)
        self.stream = stream
        self.priority = priority
        self.started = threading.Event()
        """Set once the thread runs with its scheduling settled."""
        self.priority_error: str | None = None
        self._taps = list(taps.items())
        self.frames_captured = 0
        """Frames copied into every ring; the device's sample clock."""
        self.overrun_marks: list[tuple[int, int]] = []
        """(position, lost frames) of each overrun, for the receipts of calls it touched."""
        self.doorbell = threading.Event()
        self.failure: HardwareError | None = None
        self._stopping = False

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
                self.failure = exc
                self.doorbell.set()
                return
            lost = self.stream.take_lost()
            if lost:
                # Silence where the overrun lost audio, so what follows keeps its time.
                self.overrun_marks.append((self.frames_captured, lost))
                for _, ring in self._taps:
                    ring.write_silence(lost)
                self.frames_captured += lost
            for channel, ring in self._taps:
                ring.write(frames[:, channel])
            self.frames_captured += len(frames)
            self.doorbell.set()

    def request_stop(self) -> None:
        self._stopping = True


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
        self.done = threading.Event()
        self._clock = clock
        self._period = period
        self._events = events
        self._until = until
        self._stopping = threading.Event()
        self._marks_seen = 0

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.done.set()

    def _run(self) -> None:
        doorbell = self.capture.doorbell
        while not self._stopping.is_set():
            doorbell.clear()
            captured = self.capture.frames_captured
            while captured - self.position >= self._period and not self._stopping.is_set():
                if self._until is not None and self.position >= self._until:
                    return
                self._tick()
            if self._until is not None and self.position >= self._until:
                return
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
        marks = self.capture.overrun_marks
        while self._marks_seen < len(marks) and marks[self._marks_seen][0] < end:
            position, lost = marks[self._marks_seen]
            self._marks_seen += 1
            logger.warning("overrun on capture %s at sample %d: %d frames lost, silence "
                           "in their place", self.capture_name, position, lost)
            for line in self.lines:
                line.note_overrun(position, lost)
        for line in self.lines:
            try:
                line.tick(start, self._period)
            except Exception as exc:
                logger.exception("line %s failed at sample %d", line.name, start)
                line.fault(start, exc)
        self.position = start + self._period

    def stop(self) -> None:
        self._stopping.set()
        self.capture.doorbell.set()

    def shutdown_lines(self) -> None:
        """Close every call in progress; run after the engine thread has ended."""
        for line in self.lines:
            try:
                line.shutdown(self.position)
            except Exception:
                logger.exception("line %s did not shut down cleanly", line.name)
