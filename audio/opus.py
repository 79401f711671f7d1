"""The Opus encoder adapter: the only module that imports opuslib."""

from __future__ import annotations

import numpy as np
import opuslib

FRAMES_PER_SECOND = 50
"""20 ms frames: the frame size the recorder always encodes."""

_BANDWIDTH_FOR_RATE = {8000: opuslib.BANDWIDTH_NARROWBAND, 16000: opuslib.BANDWIDTH_WIDEBAND}
_SIGNAL_VOICE = 3001  # OPUS_SIGNAL_VOICE
_PCM = np.dtype("<i2")
"""libopus takes native 16-bit samples; every Pi and PC linerec runs on is little-endian."""


class VoiceEncoder:
    """Mono Opus encoder tuned for telephone speech: voip, signal voice, 20 ms frames,
    bandwidth limited to what the line's sample rate carries."""

    def __init__(self, *, rate: int, bitrate: int, complexity: int) -> None:
        if rate not in _BANDWIDTH_FOR_RATE:
            raise ValueError(f"sample rate {rate} is not one of {sorted(_BANDWIDTH_FOR_RATE)}")
        self.rate = rate
        self.frame_samples = rate // FRAMES_PER_SECOND
        self._encoder = opuslib.Encoder(rate, 1, opuslib.APPLICATION_VOIP)
        self._encoder.bitrate = bitrate
        self._encoder.complexity = complexity
        self._encoder.signal = _SIGNAL_VOICE
        self._encoder.max_bandwidth = _BANDWIDTH_FOR_RATE[rate]

    @property
    def lookahead(self) -> int:
        """Encoder delay in input-rate samples; the stream's pre-skip comes from it."""
        return int(self._encoder.lookahead)

    def encode(self, frame: np.ndarray) -> bytes:
        """Encode exactly one 20 ms frame (opuslib does not check the length itself)."""
        if len(frame) != self.frame_samples:
            raise ValueError(f"an Opus frame is {self.frame_samples} samples, got {len(frame)}")
        pcm = frame.tobytes() if frame.dtype == _PCM else frame.astype(_PCM).tobytes()
        return bytes(self._encoder.encode(pcm, self.frame_samples))
