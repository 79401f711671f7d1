"""The real telephony HAT: ALSA devices, gpiozero pins and the system clock."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from datetime import UTC, datetime, timedelta

from linerec.daemon.config import AudioConfig, CaptureConfig, LineConfig, PlaybackConfig
from linerec.hw.alsa import AlsaCapture, AlsaPlayback
from linerec.hw.base import ClockStep, ClockSteps
from linerec.hw.gpio import GpioInput, GpioLed, pin_factory_name

CLOCK_READ_MAX_S = 0.01
"""A wall-clock reading that took longer than this (the thread was preempted in between) is
not compared with the monotonic clock: the next tick's is."""
_TIME_ERROR = 5
"""adjtimex(2): the clock is not synchronised."""


class _Timex(ctypes.Structure):
    # struct timex of linux/timex.h on 64-bit and 32-bit alike: every field is a long
    # (or int padded to one) up to the reserved tail, which only has to be big enough.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long),
                ("freq", ctypes.c_long), ("maxerror", ctypes.c_long),
                ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long),
                ("tolerance", ctypes.c_long), ("time_sec", ctypes.c_long),
                ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("reserved", ctypes.c_long * 32)]


@functools.cache
def _libc() -> ctypes.CDLL:
    # Found once: find_library runs ldconfig, and receipts ask at every call.
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def system_clock_synchronised() -> bool | None:
    """Is the system clock synchronised, as the kernel tells NTP daemons (adjtimex with
    no changes: no privileges needed)? None where that cannot be asked."""
    try:
        libc = _libc()
        timex = _Timex()
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)


class WallClock:
    """Real time. Each tick anchors a capture position to the wall clock, so an event dated
    to an earlier sample (an on-hook that began 800 ms before it was confirmed) gets the
    wall-clock time of that sample. When NTP sets the clock, a tick sees the wall clock
    jump against the monotonic one: the step is logged and kept for the receipts."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._anchors: dict[str, tuple[int, datetime]] = {}
        self._steps = ClockSteps()

    def advance(self, capture: str, position: int) -> None:
        before = time.monotonic()
        now = datetime.now(UTC)
        after = time.monotonic()
        self._anchors[capture] = (position, now)
        if after - before < CLOCK_READ_MAX_S:
            self._steps.check(capture, position, now, (before + after) / 2)

    def steps(self, capture: str, since: int) -> list[ClockStep]:
        return self._steps.since(capture, since)

    def timestamp(self, capture: str, position: int) -> datetime:
        anchor = self._anchors.get(capture)
        if anchor is None:
            return datetime.now(UTC)
        anchored_at, moment = anchor
        return moment + timedelta(seconds=(position - anchored_at) / self._rate)

    def synchronised(self) -> bool | None:
        return system_clock_synchronised()


class PiHat:
    """The HAT on a Raspberry Pi. gpiozero picks its pin factory (lgpio on current Pis;
    GPIOZERO_PIN_FACTORY overrides)."""

    def __init__(self, rate: int) -> None:
        self.clock = WallClock(rate)

    def open_capture(self, capture: CaptureConfig, audio: AudioConfig) -> AlsaCapture:
        return AlsaCapture(capture, audio)

    def open_playback(self, playback: PlaybackConfig, audio: AudioConfig) -> AlsaPlayback:
        return AlsaPlayback(playback, audio)

    def hook_sensor(self, line: LineConfig) -> GpioInput:
        return GpioInput(line.hook_pin, active_high=line.hook_active_high,
                         name=f"{line.name} hook")

    def ring_sensor(self, line: LineConfig) -> GpioInput:
        return GpioInput(line.ring_pin, active_high=line.ring_active_high,
                         name=f"{line.name} ring")

    def polarity_sensor(self, line: LineConfig) -> GpioInput | None:
        if line.polarity_pin is None:
            return None
        return GpioInput(line.polarity_pin, active_high=line.polarity_active_high,
                         name=f"{line.name} polarity")

    def recording_led(self, line: LineConfig) -> GpioLed:
        return GpioLed(line.led_pin, name=f"{line.name} LED")

    def service_led(self, pin: int) -> GpioLed:
        return GpioLed(pin, name="service LED")

    def gpio_backend(self) -> str:
        return pin_factory_name()

    def release_capture(self) -> None:
        """A real capture device returns a period every few milliseconds by itself."""

    def close(self) -> None:
        pass
