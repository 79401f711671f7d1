"""One recording on disk: Opus-encoded 20 ms frames in an Ogg file written crash-safely."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from linerec.audio.ogg import OPUS_GRANULE_RATE, OggOpusWriter
from linerec.audio.opus import FRAMES_PER_SECOND, VoiceEncoder

PART_SUFFIX = ".part"

logger = logging.getLogger(__name__)


class RecordingFile:
    """Encodes samples into ``<path>.part`` and renames it to ``path`` when closed.

    The final name only ever holds a complete stream with its EOS page; what a crash
    leaves behind is the ``.part``.
    """

    def __init__(
        self,
        path: Path,
        *,
        rate: int,
        bitrate: int,
        complexity: int,
        page_interval_s: float,
        vendor: str,
        tags: Mapping[str, str],
    ) -> None:
        self.path = path
        self.part_path = path.with_name(path.name + PART_SUFFIX)
        self._encoder = VoiceEncoder(rate=rate, bitrate=bitrate, complexity=complexity)
        self._frame = self._encoder.frame_samples
        self._scale = OPUS_GRANULE_RATE // rate
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.part_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._writer = OggOpusWriter(
            self._file,
            input_rate=rate,
            pre_skip=self._encoder.lookahead * self._scale,
            vendor=vendor,
            tags=tags,
            serial=secrets.randbits(32),
            packets_per_page=max(1, round(page_interval_s * FRAMES_PER_SECOND)),
        )
        self._carry = np.zeros(0, dtype=np.int16)
        self._frames_encoded = 0
        self.samples = 0
        """Input samples handed to the recording so far."""

    def write(self, samples: np.ndarray) -> None:
        """Encode whole 20 ms frames; a partial frame waits for the next call."""
        self.samples += len(samples)
        pending = np.concatenate([self._carry, samples]) if len(self._carry) else samples
        whole = len(pending) - len(pending) % self._frame
        for start in range(0, whole, self._frame):
            self._encode(pending[start : start + self._frame])
        self._carry = pending[whole:].copy()

    def close(self) -> int:
        """Finish the stream, make it durable, give it its final name; returns its size."""
        # Decoding must yield pre-skip + every input sample: pad with silence, then let the
        # EOS granule trim the padding back off.
        needed = self._writer.pre_skip + self.samples * self._scale
        frames_needed = math.ceil(needed / (self._frame * self._scale))
        tail = np.zeros(max(0, frames_needed - self._frames_encoded) * self._frame, np.int16)
        tail[: len(self._carry)] = self._carry
        for start in range(0, len(tail), self._frame):
            self._encode(tail[start : start + self._frame])
        self._writer.finish(self.samples)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.part_path, self.path)
        try:
            _fsync_dir(self.path.parent)
        except OSError as exc:
            # The file itself is complete and synced; only its new name may not survive a
            # power cut yet.
            logger.warning("fsync of %s failed: %s", self.path.parent, exc)
        return self._writer.bytes_written

    def abandon(self) -> None:
        """Close without finishing, after an I/O error; the .part stays for inspection."""
        with contextlib.suppress(OSError):
            self._file.close()

    def _encode(self, frame: np.ndarray) -> None:
        self._writer.add_packet(self._encoder.encode(frame), self._frame)
        self._frames_encoded += 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
