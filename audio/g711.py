"""G.711 A-law and mu-law (ISDN B channels) to and from 16-bit linear, by lookup table."""

from __future__ import annotations

import numpy as np


def _alaw_to_linear() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    mantissa = (codes & 0x0F) << 4
    segment = (codes & 0x70) >> 4
    shift = np.maximum(segment - 1, 0)
    magnitude = np.where(segment == 0, mantissa + 8, (mantissa + 0x108) << shift)
    return np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)


def _ulaw_to_linear() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((codes & 0x0F) << 3) + 0x84) << ((codes & 0x70) >> 4)
    return np.where(codes & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


ALAW_TO_LINEAR = _alaw_to_linear()
ULAW_TO_LINEAR = _ulaw_to_linear()


def _segment(value: np.ndarray, ends: list[int]) -> np.ndarray:
    return np.searchsorted(np.array(ends), value, side="left")


def _linear_to_alaw() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    pcm = np.where(pcm >= 0, pcm, -pcm - 1)
    segment = _segment(pcm, [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
    shift = np.where(segment < 2, 1, segment)
    code = (np.minimum(segment, 7) << 4) | ((pcm >> shift) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _linear_to_ulaw() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    pcm = np.minimum(np.abs(pcm), 8159) + (0x84 >> 2)
    segment = _segment(pcm, [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    code = (np.minimum(segment, 7) << 4) | ((pcm >> (segment + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


LINEAR_TO_ALAW = _linear_to_alaw()
"""Indexed by sample + 32768."""
LINEAR_TO_ULAW = _linear_to_ulaw()


def decode(codes: np.ndarray, law: str) -> np.ndarray:
    """G.711 bytes (uint8) to int16 samples; ``law`` is "A_LAW" or "MU_LAW"."""
    return (ALAW_TO_LINEAR if law == "A_LAW" else ULAW_TO_LINEAR)[codes]


def encode(samples: np.ndarray, law: str) -> np.ndarray:
    """int16 samples to G.711 bytes (uint8)."""
    table = LINEAR_TO_ALAW if law == "A_LAW" else LINEAR_TO_ULAW
    return table[samples.astype(np.int32) + 32768]
