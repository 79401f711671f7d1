"""One recording on disk: Opus-encoded 20 ms frames in an Ogg file written crash-safely."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from linerec.audio.ogg import OPUS_GRANULE_RATE, OggOpusWriter
from linerec.audio.opus import FRAMES_PER_SECOND, VoiceEncoder

PART_SUFFIX = ".part"

logger = logging.getLogger(__name__)


MAX_REWIND_S = 3.0
"""How far before the audio written so far a recording may by default still be ended: the
longest on-hook confirmation (2 s) and the longest period (4096 frames at 8 kHz), with
room to spare."""


WRITE_BUFFER_BYTES = 128 * 1024
"""The file's buffer: larger than all the pages one write can make (8 s of audio, the
ring, is 64 kB at the highest bitrate), so that a page only ever reaches the file through
the explicit flush. A flush that fails (the disk full) keeps the bytes it could not write,
and the next flush (at close, once the storage guard's reserve has freed room) writes
them: the recording is closed with everything it had. A flush inside ``write`` of the
buffer itself would instead refuse the page it was handed, which the Ogg writer already
counts as written."""


class _Syncer(threading.Thread):
    """fdatasync off the engine thread. An SD card can take hundreds of milliseconds to
    sync; the engine meanwhile has disclosures to keep playing and other lines to encode.
    Each request carries a duplicate of the descriptor, so the file stays open for the sync
    whatever the recording does meanwhile; a failure is handed back to the recording."""

    def __init__(self) -> None:
        super().__init__(name="recording-sync", daemon=True)
        self.requests: queue.SimpleQueue[tuple[int, RecordingFile | None]] = (
            queue.SimpleQueue())

    def run(self) -> None:
        while True:
            fd, recording = self.requests.get()
            try:
                if recording is not None:
                    os.fdatasync(fd)
                else:
                    os.fsync(fd)
            except OSError as exc:
                if recording is not None:
                    recording.sync_error = exc
                logger.warning("sync failed: %s", exc)
            finally:
                os.close(fd)


_syncer: _Syncer | None = None
_syncer_lock = threading.Lock()


def _sync_later(fd: int, recording: RecordingFile | None) -> None:
    """Queue a sync of (a duplicate of) ``fd``: a recording's data, or a folder."""
    global _syncer
    with _syncer_lock:
        if _syncer is None:
            _syncer = _Syncer()
            _syncer.start()
    _syncer.requests.put((os.dup(fd), recording))


class RecordingFile:
    """Encodes samples into ``<path>.part`` and renames it to ``path`` when closed.

    Each Ogg page goes to the operating system as soon as it is complete (a crash of the
    process loses at most the page being filled) and to the disk every ``fsync_interval_s``
    of audio (a power cut loses at most that). The final name only ever holds a complete
    stream with its EOS page; what a crash leaves behind is the ``.part``.

    The folder must exist: the line makes the call's folder (``paths.make_call_folder``),
    which never makes the storage itself again.
    """

    def __init__(
        self,
        path: Path,
        *,
        rate: int,
        bitrate: int,
        complexity: int,
        page_interval_s: float,
        fsync_interval_s: float,
        vendor: str,
        tags: Mapping[str, str],
        max_rewind_s: float = MAX_REWIND_S,
    ) -> None:
        self.path = path
        self.part_path = path.with_name(path.name + PART_SUFFIX)
        self._encoder = VoiceEncoder(rate=rate, bitrate=bitrate, complexity=complexity)
        self._frame = self._encoder.frame_samples
        self._scale = OPUS_GRANULE_RATE // rate
        fd = os.open(self.part_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: BinaryIO = os.fdopen(fd, "wb", buffering=WRITE_BUFFER_BYTES)
        packets_per_page = max(1, round(page_interval_s * FRAMES_PER_SECOND))
        self._writer = OggOpusWriter(
            self._file,
            input_rate=rate,
            pre_skip=self._encoder.lookahead * self._scale,
            vendor=vendor,
            tags=tags,
            serial=secrets.randbits(32),
            packets_per_page=packets_per_page,
            keep_pages=math.ceil(max_rewind_s * FRAMES_PER_SECOND / packets_per_page) + 2,
        )
        self._file.flush()
        # The .part's name must survive a power cut, for the recovery at the next start.
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _sync_later(folder, None)
        finally:
            os.close(folder)
        self.sync_error: OSError | None = None
        """Set by the sync thread when a sync failed; the next write raises it."""
        self._pages_on_disk = self._writer.pages_written
        self._fsync_every = max(1, round(fsync_interval_s * rate))
        self._synced_at = 0
        self._unsynced = False
        self._carry = np.zeros(0, dtype=np.int16)
        self.samples = 0
        """Input samples handed to the recording so far (its length, once closed)."""

    def write(self, samples: np.ndarray) -> None:
        """Encode whole 20 ms frames; a partial frame waits for the next call. An OSError
        (the disk full, say) leaves the samples encoded and their pages buffered: ``close``
        may still finish the stream with them once there is room."""
        if self.sync_error is not None:
            raise self.sync_error
        self.samples += len(samples)
        pending = np.concatenate([self._carry, samples]) if len(self._carry) else samples
        whole = len(pending) - len(pending) % self._frame
        for start in range(0, whole, self._frame):
            self._encode(pending[start : start + self._frame])
        self._carry = pending[whole:].copy()
        if self._writer.pages_written != self._pages_on_disk:
            self._file.flush()
            self._pages_on_disk = self._writer.pages_written
            self._unsynced = True
        if self._unsynced and self.samples - self._synced_at >= self._fsync_every:
            _sync_later(self._file.fileno(), self)
            self._synced_at = self.samples
            self._unsynced = False

    def close(self, end: int | None = None) -> int:
        """Finish the stream after ``end`` samples (default: all written), make it durable
        and give it its final name; returns its size. ``end`` may lie up to ``max_rewind_s``
        before the samples written: the stream is then cut back."""
        end = self.samples if end is None else end
        if not 0 <= end <= self.samples:
            raise ValueError(f"cannot end a recording of {self.samples} samples at {end}")
        # Decoding must yield pre-skip + every kept sample: pad with silence, then let the
        # EOS granule trim the padding (and anything after the end) back off.
        needed = self._writer.pre_skip + end * self._scale
        tail = self._carry
        while self._writer.decoded < needed:
            frame = np.zeros(self._frame, np.int16)
            frame[: min(len(tail), self._frame)] = tail[: self._frame]
            tail = tail[self._frame :]
            self._encode(frame)
        self._writer.finish(end)
        self.samples = end
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.part_path, self.path)
        try:
            fsync_dir(self.path.parent)
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


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
