"""ALSA adapter: the only module that imports alsaaudio."""

from __future__ import annotations

import contextlib
import errno
import time

import alsaaudio
import numpy as np

from linerec.audio import g711
from linerec.daemon.config import AudioConfig, CaptureConfig, PlaybackConfig
from linerec.hw.base import HardwareError

_FORMATS = {
    "S16_LE": alsaaudio.PCM_FORMAT_S16_LE,
    "A_LAW": alsaaudio.PCM_FORMAT_A_LAW,
    "MU_LAW": alsaaudio.PCM_FORMAT_MU_LAW,
}


def _open(
    pcm_type: int, device: str, *, rate: int, channels: int, audio: AudioConfig, key: str,
    sample_format: str = "S16_LE",
) -> alsaaudio.PCM:
    try:
        pcm = alsaaudio.PCM(
            pcm_type,
            alsaaudio.PCM_NORMAL,
            rate=rate,
            channels=channels,
            format=_FORMATS[sample_format],
            periodsize=audio.period_frames,
            periods=audio.periods,
            device=device,
        )
    except alsaaudio.ALSAAudioError as exc:
        raise HardwareError(f"ALSA device {device!r} ({key}) cannot be opened: {exc}") from exc
    info = pcm.info()
    granted = (info["rate"], info["channels"], info["format_name"])
    if granted != (rate, channels, sample_format):
        pcm.close()
        raise HardwareError(
            f"ALSA device {device!r} ({key}) gave {granted[0]} Hz, {granted[1]} channel(s), "
            f"{granted[2]}; it must do {rate} Hz, {channels} channel(s), {sample_format} "
            "(use a plughw: device to convert)"
        )
    return pcm


class AlsaCapture:
    """A capture device read in blocking periods (pyalsaaudio releases the GIL meanwhile)."""

    def __init__(self, capture: CaptureConfig, audio: AudioConfig) -> None:
        self.name = capture.device
        self.channels = capture.channels
        self._pcm = _open(
            alsaaudio.PCM_CAPTURE,
            capture.device,
            rate=audio.rate,
            channels=capture.channels,
            audio=audio,
            key=f"capture {capture.name!r}",
            sample_format=capture.format,
        )
        # G.711 bytes become linear samples by table lookup, in the capture thread: the
        # rings and everything after them only ever see int16.
        self._law = None if capture.format == "S16_LE" else capture.format
        info = self._pcm.info()
        self.period_frames = int(info["period_size"])
        self.buffer_frames = int(info["buffer_size"])
        self.rate = audio.rate
        self.overruns = 0
        self._lost = 0
        self._last_read_at = time.monotonic()
        self._gap_since: float | None = None

    def measure_gap_from(self, last_read_at: float) -> None:
        self._gap_since = last_read_at

    def read_period(self) -> np.ndarray:
        overrun_since, self._gap_since = self._gap_since, None
        while True:
            try:
                frames, data = self._pcm.read()
            except alsaaudio.ALSAAudioError as exc:
                raise HardwareError(f"capture from {self.name!r} failed: {exc}") from exc
            if frames == -errno.EPIPE:
                # pyalsaaudio has already re-prepared the stream; read on.
                self.overruns += 1
                if overrun_since is None:
                    overrun_since = self._last_read_at
                continue
            if frames >= 0:
                break
        now = time.monotonic()
        if overrun_since is not None:
            self._lost += self._measure_lost(overrun_since, now, frames)
        self._last_read_at = now
        return self._decode(frames, data)

    def _measure_lost(self, last_read_at: float, now: float, frames: int) -> int:
        """What an overrun lost: the time from the last good period to the end of this
        one, less this period. The stream stopped in between, so only the clock knows."""
        return max(0, round((now - last_read_at) * self.rate) - frames)

    def take_lost(self) -> int:
        lost, self._lost = self._lost, 0
        return lost

    def _decode(self, frames: int, data: bytes) -> np.ndarray:
        if self._law is not None:
            codes = np.frombuffer(data, dtype=np.uint8).reshape(frames, self.channels)
            return g711.decode(codes, self._law)
        return np.frombuffer(data, dtype="<i2").reshape(frames, self.channels)

    def close(self) -> None:
        # A device that has gone away may fail to close as well; it is gone either way.
        with contextlib.suppress(alsaaudio.ALSAAudioError):
            self._pcm.close()


class AlsaPlayback:
    """A playback device whose channels are line outputs, written in blocking periods of
    interleaved frames by its playback thread."""

    def __init__(self, playback: PlaybackConfig, audio: AudioConfig) -> None:
        self.name = playback.device
        self.channels = playback.channels
        self._pcm = _open(
            alsaaudio.PCM_PLAYBACK,
            playback.device,
            rate=audio.rate,
            channels=playback.channels,
            audio=audio,
            key=f"playback {playback.name!r}",
        )
        self.buffer_frames = int(self._pcm.info()["buffer_size"])
        self.underruns = 0

    def write(self, frames: np.ndarray) -> None:
        """Write int16 frames shaped (n, channels); raises HardwareError when it fails."""
        data = frames.astype("<i2").tobytes()
        try:
            # pyalsaaudio re-prepares an underrun stream silently before it writes: look first.
            if self._pcm.state() == alsaaudio.PCM_STATE_XRUN:
                self.underruns += 1
            written = self._pcm.write(data)
        except alsaaudio.ALSAAudioError as exc:
            raise HardwareError(f"playback to {self.name!r} failed: {exc}") from exc
        if written != len(frames):
            raise HardwareError(
                f"playback to {self.name!r} took {written} of {len(frames)} frames")

    def skip(self, frames: np.ndarray) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(alsaaudio.ALSAAudioError):
            self._pcm.close()
