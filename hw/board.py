"""The real telephony HAT: ALSA devices, gpiozero pins and the system clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from linerec.daemon.config import AudioConfig, CaptureConfig, LineConfig, PlaybackConfig
from linerec.hw.alsa import AlsaCapture, AlsaPlayback
from linerec.hw.gpio import GpioInput, GpioLed


class WallClock:
    """Real time. Each tick anchors a capture position to the wall clock, so an event dated
    to an earlier sample (an on-hook that began 800 ms before it was confirmed) gets the
    wall-clock time of that sample."""

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._anchors: dict[str, tuple[int, datetime]] = {}

    def advance(self, capture: str, position: int) -> None:
        self._anchors[capture] = (position, datetime.now(UTC))

    def timestamp(self, capture: str, position: int) -> datetime:
        anchor = self._anchors.get(capture)
        if anchor is None:
            return datetime.now(UTC)
        anchored_at, moment = anchor
        return moment + timedelta(seconds=(position - anchored_at) / self._rate)


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

    def recording_led(self, line: LineConfig) -> GpioLed:
        return GpioLed(line.led_pin, name=f"{line.name} LED")

    def release_capture(self) -> None:
        """A real capture device returns a period every few milliseconds by itself."""

    def close(self) -> None:
        pass
