"""Disclosures: the audio a call's notice plays, and the check that the line carried it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from linerec.audio.pcm import AudioFileError, load_line_audio, read_audio_file
from linerec.daemon.config import Config, DisclosureConfig, PurposeConfig, disclosure_files


@dataclass(frozen=True)
class PreparedDisclosure:
    """A disclosure ready to play: its parts decoded, joined with pauses, at line rate."""

    name: str
    purpose: PurposeConfig
    languages: list[str]
    parts: list[dict[str, str]]
    """language, file and sha256 of each part's file, in playing order."""
    audio: np.ndarray
    sha256: str
    """Of the int16 samples played: what the receipt can prove went out."""

    def receipt(self) -> dict[str, Any]:
        return {"id": self.name, "languages": self.languages, "parts": self.parts,
                "sha256": self.sha256}


class DisclosureLibrary:
    """Prepares a line's disclosures at call time: files are read (and hashed) each call,
    so a replaced file is what plays and what the receipt names; decoding is cached by
    the file's hash, so an unchanged file is not decoded again."""

    def __init__(self, config: Config, rate: int) -> None:
        self._config = config
        self._rate = rate
        self._decoded: dict[tuple[Path, str], np.ndarray] = {}

    def describe(self, name: str) -> dict[str, Any]:
        """What the receipt says of a disclosure that did not play."""
        disclosure = self._config.disclosure_by_name(name)
        return {"id": name, "languages": disclosure.languages,
                "parts": [{"language": part.language, "file": str(path), "sha256": None}
                          for part, path in zip(disclosure.parts, disclosure_files(disclosure),
                                                strict=True)],
                "sha256": None}

    def purpose_of(self, name: str) -> PurposeConfig:
        return self._config.purpose_by_name(self._config.disclosure_by_name(name).purpose)

    def prepare(self, name: str) -> PreparedDisclosure:
        """Raises AudioFileError naming the file when a part cannot be played."""
        disclosure: DisclosureConfig = self._config.disclosure_by_name(name)
        pause = np.zeros(disclosure.pause_ms * self._rate // 1000, np.int16)
        pieces: list[np.ndarray] = []
        parts = []
        for part, path in zip(disclosure.parts, disclosure_files(disclosure), strict=True):
            data = read_audio_file(path)
            digest = hashlib.sha256(data).hexdigest()
            samples = self._decoded.get((path, digest))
            if samples is None:
                samples = load_line_audio(path, self._rate, data)
                self._decoded = {k: v for k, v in self._decoded.items() if k[0] != path}
                self._decoded[(path, digest)] = samples
            if pieces:
                pieces.append(pause)
            pieces.append(samples)
            parts.append({"language": part.language, "file": str(path), "sha256": digest})
        audio = np.concatenate(pieces)
        if len(audio) > disclosure.max_s * self._rate:
            raise AudioFileError(f"disclosure {name!r} lasts {len(audio) / self._rate:.1f} s, "
                                 f"over its max_s = {disclosure.max_s}")
        return PreparedDisclosure(
            name=name,
            purpose=self._config.purpose_by_name(disclosure.purpose),
            languages=disclosure.languages,
            parts=parts,
            audio=audio,
            sha256=hashlib.sha256(audio.astype("<i2").tobytes()).hexdigest(),
        )


class EchoCheck:
    """Was the disclosure heard on the line? Correlates what the tap captured with what
    was played, at every delay from 0 to ``max_lag`` samples (the output path's latency
    is only bounded, not known), period by period as the audio arrives, so that the
    answer is ready the moment the disclosure has left the line.

    The score is the best normalised correlation over those delays, by magnitude (a line
    transformer may invert the signal). The far end talking over the notice lowers it; a
    silent line output gives about 0."""

    def __init__(self, played: np.ndarray, first: int, max_lag: int) -> None:
        self._first = first
        self._lags = max_lag + 1
        self._length = len(played)
        # Zeros on both sides: a window that reaches before or past the notice reads 0.
        self._padded = np.concatenate([np.zeros(self._lags, np.float32),
                                       played.astype(np.float32),
                                       np.zeros(self._lags, np.float32)])
        self._sums = np.zeros(self._lags)
        self._heard = np.zeros(self._length + self._lags, np.int16)

    def feed(self, samples: np.ndarray, position: int) -> None:
        """Captured line samples [position, position + len(samples))."""
        lo = max(position, self._first)
        hi = min(position + len(samples), self._first + len(self._heard))
        if hi <= lo:
            return
        chunk = samples[lo - position : hi - position]
        offset = lo - self._first
        self._heard[offset : offset + len(chunk)] = chunk
        # Sum i slides the chunk over the notice from played index offset - (lags - 1) + i:
        # that is delay lags - 1 - i. (offset + 1 is that start in the padded array.)
        segment = self._padded[offset + 1 : offset + len(chunk) + self._lags]
        if len(segment) < len(chunk) + self._lags - 1:
            segment = np.concatenate([segment, np.zeros(
                len(chunk) + self._lags - 1 - len(segment), np.float32)])
        self._sums += np.correlate(segment, chunk.astype(np.float32), "valid")[::-1]

    def score(self) -> tuple[float, int]:
        """The best normalised correlation (0 to 1) and the delay where it was found."""
        lag = int(np.argmax(np.abs(self._sums)))
        heard = self._heard[lag : lag + self._length].astype(np.float64)
        played = self._padded[self._lags : self._lags + self._length].astype(np.float64)
        energy = float(np.dot(heard, heard)) * float(np.dot(played, played))
        if energy <= 0.0:
            return 0.0, lag
        return float(abs(self._sums[lag]) / np.sqrt(energy)), lag
