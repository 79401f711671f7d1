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


_DECODE_RATES = (8000, 12000, 16000, 24000, 48000)
_MAX_FRAME_MS = 120


def decode_ogg_opus(data: bytes, rate: int) -> np.ndarray:
    """An Ogg Opus file (RFC 7845) decoded to mono int16 at ``rate`` (a rate libopus
    decodes to directly), pre-skip and end trim applied. Raises ValueError when the file
    is not Ogg Opus or does not decode."""
    from linerec.audio.ogg import ogg_packets

    if rate not in _DECODE_RATES:
        raise ValueError(f"Opus decodes to {_DECODE_RATES} Hz, not {rate}")
    packets, last_granule = ogg_packets(data)
    if len(packets) < 2 or not packets[0].startswith(b"OpusHead") or len(packets[0]) < 19:
        raise ValueError("not an Ogg Opus file (no OpusHead)")
    channels = packets[0][9]
    pre_skip = int.from_bytes(packets[0][10:12], "little")
    if channels not in (1, 2) or packets[0][18] != 0:
        raise ValueError("only mono or stereo Opus (channel mapping family 0) is supported")
    decoder = opuslib.Decoder(rate, channels)
    frame = rate * _MAX_FRAME_MS // 1000
    pcm = bytearray()
    try:
        for packet in packets[2:]:
            pcm += decoder.decode(packet, frame)
    except opuslib.OpusError as exc:
        raise ValueError(f"the Opus audio does not decode: {exc}") from exc
    samples = np.frombuffer(bytes(pcm), dtype=_PCM)
    if channels == 2:
        samples = samples.reshape(-1, 2).mean(axis=1).astype(np.int16)
    skip = pre_skip * rate // 48000
    end = max(0, (last_granule - pre_skip) * rate // 48000) if last_granule > 0 else None
    return samples[skip:][:end] if end is not None else samples[skip:]
