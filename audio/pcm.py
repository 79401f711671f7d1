"""Reading audio files and converting them to the line's sample format."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np


class AudioFileError(ValueError):
    """An audio file that linerec cannot use; the message names the file and the fix."""


def read_wav(path: Path, data: bytes | None = None) -> tuple[np.ndarray, int]:
    """Return a PCM WAV file as mono float64 samples in [-1, 1] and its sample rate;
    ``data``, when given, is the file's content already read (``path`` names it)."""
    try:
        with wave.open(io.BytesIO(data) if data is not None else str(path), "rb") as wav:
            channels = wav.getnchannels()
            width = wav.getsampwidth()
            rate = wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except FileNotFoundError as exc:
        raise AudioFileError(f"{path}: file not found") from exc
    except (wave.Error, EOFError, OSError, ValueError, RuntimeError) as exc:
        # The wave module raises RuntimeError for a chunk that runs past the file's end,
        # and ValueError for a path with a NUL byte in it.
        raise AudioFileError(
            f"{path}: not a readable PCM WAV file ({exc or type(exc).__name__}); "
            f"convert it with: sox '{path}' -b 16 -c 1 out.wav"
        ) from exc
    # A file cut off in its data chunk ends with part of a frame: the whole frames are kept.
    raw = raw[: len(raw) - len(raw) % (width * channels)]
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints.astype(np.float64) / float(1 << 23)
    elif width == 4:
        samples = np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)
    else:  # pragma: no cover - wave rejects other widths itself
        raise AudioFileError(f"{path}: {width * 8}-bit samples are not supported")
    if len(samples) == 0:
        raise AudioFileError(f"{path}: the file holds no audio")
    if rate <= 0:
        raise AudioFileError(f"{path}: the header gives a sample rate of {rate} Hz")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples, rate


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling through the spectrum (the files are seconds to minutes long).

    Zero padding on both sides keeps the FFT's circular wrap from folding the end of the
    file onto its start.
    """
    if src_rate == dst_rate:
        return samples.astype(np.float64, copy=True)
    pad = src_rate // 10
    padded = np.concatenate([np.zeros(pad), samples, np.zeros(pad)])
    n_in = len(padded)
    n_out = round(n_in * dst_rate / src_rate)
    spectrum = np.fft.rfft(padded)
    bins = n_out // 2 + 1
    if bins <= len(spectrum):
        spectrum = spectrum[:bins]
    else:
        spectrum = np.concatenate([spectrum, np.zeros(bins - len(spectrum), dtype=complex)])
    out = np.fft.irfft(spectrum, n_out) * (n_out / n_in)
    out_pad = round(pad * dst_rate / src_rate)
    return out[out_pad : out_pad + round(len(samples) * dst_rate / src_rate)]


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16, clipped."""
    return np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)


OPUS_DECODE_RATE = 48000
"""Opus files are decoded at 48 kHz, then resampled like a WAV file of that rate."""


def read_audio_file(path: Path) -> bytes:
    """An audio file's bytes; AudioFileError names it when it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise AudioFileError(f"{path}: file not found") from exc
    except OSError as exc:
        raise AudioFileError(f"{path}: cannot be read: {exc}") from exc
    except ValueError as exc:  # a NUL byte in the path
        raise AudioFileError(f"{str(path)!r} is not a file name ({exc}); give the path of a "
                             "WAV or Ogg Opus file") from exc


def read_audio(path: Path, data: bytes | None = None) -> tuple[np.ndarray, int]:
    """A WAV or Ogg Opus file as mono float64 samples in [-1, 1] and its sample rate."""
    if data is None:
        data = read_audio_file(path)
    if not data.startswith(b"OggS"):
        return read_wav(path, data)
    # Imported here: reading WAV files needs no libopus.
    from linerec.audio.opus import decode_ogg_opus

    try:
        samples = decode_ogg_opus(data, OPUS_DECODE_RATE)
    except ValueError as exc:
        raise AudioFileError(f"{path}: not a usable Ogg Opus file ({exc}); convert it with: "
                             f"opusenc '{path}' out.opus, or use a WAV file") from exc
    if len(samples) == 0:
        raise AudioFileError(f"{path}: the file holds no audio")
    return samples.astype(np.float64) / 32768.0, OPUS_DECODE_RATE


def audio_seconds(path: Path) -> float:
    """How long a WAV or Ogg Opus file plays; raises AudioFileError when it does not decode."""
    samples, rate = read_audio(path)
    return len(samples) / rate


def load_line_audio(path: Path, rate: int, data: bytes | None = None) -> np.ndarray:
    """A WAV or Ogg Opus file as mono int16 at the line's sample rate."""
    samples, file_rate = read_audio(path, data)
    return to_int16(resample(samples, file_rate, rate))


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV, written whole under a temporary name, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype("<i2").tobytes())
    tmp.replace(path)
