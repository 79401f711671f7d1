"""The small interfaces every hardware edge implements, real and simulated alike."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np

from linerec.daemon.config import AudioConfig, CaptureConfig, LineConfig, PlaybackConfig

logger = logging.getLogger(__name__)

CLOCK_STEP_MIN_S = 0.1
"""A wall-clock jump against the monotonic clock this big is a step. The two clocks only
part when the wall clock is set (slewing moves both alike), so the threshold need only
clear how long reading the pair can take; 0.1 s is under the smallest step NTP clients make
(ntpd steps from 128 ms, systemd-timesyncd from 0.4 s, chrony's ``makestep`` usually 1 s)."""
CLOCK_STEPS_KEPT = 64
"""Steps remembered per capture device: a call only needs the ones since it began."""


def output_latency(*, capture_period: int, capture_buffer: int, output_buffer: int,
                   line_delay: int) -> int:
    """How many capture samples after the line output is given a sample that sample is
    surely in a line's ring. Both devices run on the HAT's one clock:

    - the blocking write takes at most one period to accept it,
    - it leaves the output at most one output buffer later,
    - the codec, transformer and line add ``line_delay``,
    - the capture device holds it at most one capture buffer before the capture thread
      reads it, and the capture thread holds one period between reading and the ring.
    """
    return 2 * capture_period + output_buffer + line_delay + capture_buffer


class HardwareError(RuntimeError):
    """A device failed or could not be opened; the message names the device."""


class CaptureStream(Protocol):
    """A multi-channel capture device, read one period at a time by its capture thread."""

    channels: int
    period_frames: int
    buffer_frames: int
    """Frames the device can hold before the capture thread reads them."""
    overruns: int
    """Overruns (-EPIPE) seen so far; the stream has already recovered from each."""

    def read_period(self) -> np.ndarray:
        """Block until one period is captured; returns int16 frames shaped
        (period_frames, channels). After an overrun it recovers and reads on."""

    def measure_gap_from(self, last_read_at: float) -> None:
        """This stream replaces one that failed: report, with its first period, the frames
        lost since that one's last good period."""

    def take_lost(self) -> int:
        """Frames an overrun lost just before the period read last (0 without one): the
        capture thread puts silence in their place, so later audio keeps its time."""

    def close(self) -> None: ...


class PlaybackStream(Protocol):
    """A playback device whose channels are line outputs (through the HAT's
    transformers), one channel per line."""

    channels: int
    buffer_frames: int
    """Frames the device buffers: what is written leaves the line at most this much later."""
    underruns: int
    """Times the device ran dry before a write (a gap in what it played)."""

    def write(self, frames: np.ndarray) -> None:
        """Play int16 frames shaped (n, channels), blocking while the device is full;
        raises HardwareError when it fails."""

    def skip(self, frames: np.ndarray) -> None:
        """Silence the playback thread drops to catch up after a stall: a device with a
        clock of its own is simply not given it."""

    def close(self) -> None: ...


class BinaryInput(Protocol):
    """A GPIO input such as the hook sensor or the ring detector."""

    @property
    def is_active(self) -> bool: ...

    @property
    def changes(self) -> int:
        """Level changes seen since the input was opened, counted on every edge. The line
        reads the level once per period; the count tells it the level did not hold still
        in between (chatter), which a level read alone cannot."""

    def close(self) -> None: ...


class Indicator(Protocol):
    """A GPIO output such as the recording LED."""

    @property
    def is_lit(self) -> bool: ...

    def on(self) -> None: ...

    def off(self) -> None: ...

    def blink(self, on_s: float, off_s: float) -> None:
        """Flash until ``on`` or ``off`` (a line in fault)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class ClockStep:
    """The wall clock was set while the daemon ran."""

    sample: int
    """The capture position of the tick that first saw the new time."""
    at: datetime
    """The wall-clock time after the step, at that tick."""
    seconds: float
    """How far the wall clock jumped: positive forward, negative back."""


class ClockSteps:
    """Finds steps of the wall clock per capture device, by how far the wall clock moved
    against a monotonic clock since the last tick. (Against the samples captured it would
    also move by however far the engine lags behind the capture, which is seconds under
    load: the ring holds 8 s.)"""

    def __init__(self, threshold_s: float = CLOCK_STEP_MIN_S) -> None:
        self._threshold = threshold_s
        self._offset: dict[str, float] = {}
        """Per capture device: wall-clock seconds minus monotonic seconds."""
        self._steps: dict[str, deque[ClockStep]] = {}

    def check(self, capture: str, position: int, wall: datetime, monotonic: float) -> \
            ClockStep | None:
        offset = wall.timestamp() - monotonic
        known = self._offset.setdefault(capture, offset)
        if abs(offset - known) < self._threshold:
            return None
        self._offset[capture] = offset
        step = ClockStep(position, wall, round(offset - known, 3))
        self._steps.setdefault(capture, deque(maxlen=CLOCK_STEPS_KEPT)).append(step)
        logger.warning("the wall clock stepped by %+.3f s (capture %s, sample %d); now %s",
                       step.seconds, capture, position, wall.isoformat())
        return step

    def since(self, capture: str, position: int) -> list[ClockStep]:
        return [step for step in self._steps.get(capture, ()) if step.sample >= position]


class Clock(Protocol):
    """The daemon's time. Capture sample positions are the timebase; this maps them to
    wall-clock time and, on the simulated HAT, moves the world forward."""

    def advance(self, capture: str, position: int) -> None:
        """Called before the engine reads the line inputs for samples up to ``position``."""

    def timestamp(self, capture: str, position: int) -> datetime:
        """UTC wall-clock time of a capture sample position."""

    def synchronised(self) -> bool | None:
        """Is the wall clock synchronised (NTP)? None when that cannot be told."""

    def steps(self, capture: str, since: int) -> list[ClockStep]:
        """The wall clock's steps seen from capture position ``since`` on (NTP setting the
        time): timestamps before and after one differ by the step as well."""


class Hat(Protocol):
    """Everything the daemon needs from the telephony HAT."""

    @property
    def clock(self) -> Clock: ...

    def open_capture(self, capture: CaptureConfig, audio: AudioConfig) -> CaptureStream: ...

    def open_playback(self, playback: PlaybackConfig, audio: AudioConfig) -> PlaybackStream: ...

    def hook_sensor(self, line: LineConfig) -> BinaryInput: ...

    def ring_sensor(self, line: LineConfig) -> BinaryInput: ...

    def polarity_sensor(self, line: LineConfig) -> BinaryInput | None:
        """The line polarity input, where the HAT has one (``polarity_pin``)."""

    def recording_led(self, line: LineConfig) -> Indicator: ...

    def service_led(self, pin: int) -> Indicator:
        """The appliance's own LED (config ``service_led_pin``)."""
        ...

    def release_capture(self) -> None:
        """Unblock capture reads so capture threads can stop (after they were told to)."""

    def close(self) -> None: ...
