"""Single-producer, single-consumer ring of one line's captured samples."""

from __future__ import annotations

import numpy as np


class RingOverrun(Exception):
    """The consumer fell so far behind that the samples it asked for were overwritten."""

    def __init__(self, start: int, oldest: int) -> None:
        super().__init__(f"samples {start}..{oldest} were overwritten before they were read")
        self.start = start
        self.oldest = oldest


class SampleRing:
    """A preallocated power-of-two ring of int16 samples with a monotonically increasing
    write counter.

    One thread writes (the capture thread), one thread reads (the line engine). Under the
    GIL this needs no lock: the producer announces how far it is about to write, copies,
    then advances ``written``. A reader never sees a position whose samples are not in
    place, and detects an overwrite, finished or under way, by checking the announced
    position after its copy.
    """

    def __init__(self, min_capacity: int) -> None:
        size = 1 << max(0, min_capacity - 1).bit_length()
        self._buf = np.zeros(size, dtype=np.int16)
        self._mask = size - 1
        self.written = 0
        """Samples written since the ring was made; position of the next sample."""
        self._writing = 0

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def write(self, samples: np.ndarray) -> None:
        """Append samples; called by the producer only. Never blocks, never allocates."""
        n = len(samples)
        self._writing = self.written + n
        start = self.written & self._mask
        first = min(n, len(self._buf) - start)
        self._buf[start : start + first] = samples[:first]
        if first < n:
            self._buf[: n - first] = samples[first:]
        self.written += n

    def write_silence(self, n: int) -> None:
        """Append ``n`` zero samples (where an overrun lost audio); never allocates."""
        self._writing = self.written + n
        remaining = n
        position = self.written
        while remaining > 0:
            start = position & self._mask
            chunk = min(remaining, len(self._buf) - start)
            self._buf[start : start + chunk] = 0
            position += chunk
            remaining -= chunk
        self.written += n

    def read(self, start: int, count: int) -> np.ndarray:
        """Copy ``count`` samples from position ``start``; called by the consumer only.

        Raises ValueError for samples not yet captured and RingOverrun for samples
        already overwritten.
        """
        if count < 0 or start + count > self.written:
            raise ValueError(f"samples {start}..{start + count} are not captured yet")
        self._check(start)
        out = np.empty(count, dtype=np.int16)
        begin = start & self._mask
        first = min(count, len(self._buf) - begin)
        out[:first] = self._buf[begin : begin + first]
        if first < count:
            out[first:] = self._buf[: count - first]
        # The producer may have lapped us while we copied.
        self._check(start)
        return out

    def _check(self, start: int) -> None:
        oldest = self._writing - len(self._buf)
        if start < oldest:
            raise RingOverrun(start, oldest)
