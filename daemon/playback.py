"""Playback threads: each mixes its lines' outputs into one multi-channel device, so that
several lines can play their disclosures at once without waiting for each other."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from linerec.audio.ring import SampleRing
from linerec.hw.base import HardwareError, PlaybackStream

logger = logging.getLogger(__name__)

CATCH_UP_BLOCKS = 3
"""Blocks of silence queued on every channel beyond which the thread drops silence: after a
stall the output is not held behind for good (a disclosure is never dropped)."""


@dataclass
class WriteTicket:
    """Filled in by the playback thread when the block holding a chunk goes to the device."""

    captured_before_write: int | None = None
    """The line's ring position just before the device was given the block."""


class OutputChannel:
    """One line's output: a channel of a playback device. ``write`` queues a period and
    returns at once; the playback thread plays it."""

    def __init__(self, thread: PlaybackThread, index: int, ring: SampleRing) -> None:
        self._thread = thread
        self.index = index
        self.ring = ring
        self.queue: deque[tuple[np.ndarray, WriteTicket | None, bool]] = deque()
        self.underruns = 0
        """Underruns of the device since it opened, as this channel saw them."""

    @property
    def buffer_frames(self) -> int:
        return self._thread.device.buffer_frames

    def write(self, samples: np.ndarray, *, ticket: WriteTicket | None = None,
              silent: bool = False) -> None:
        """Queue one period; raises HardwareError once the device has failed."""
        failure = self._thread.failure
        if failure is not None:
            raise failure
        self.queue.append((samples, ticket, silent))
        self._thread.doorbell.set()


class PlaybackThread(threading.Thread):
    """Plays one device: takes the next period from every channel's queue (silence for
    channels no line uses), interleaves them and writes the block, blocking while the device
    is full. Before each write it notes every line's capture position in the tickets of the
    chunks in that block: the disclosure's end is dated by it."""

    def __init__(self, name: str, device: PlaybackStream) -> None:
        super().__init__(name=f"playback-{name}", daemon=True)
        self.device = device
        self.channels: dict[int, OutputChannel] = {}
        self.doorbell = threading.Event()
        self.failure: HardwareError | None = None
        self.blocks = 0
        """Blocks handed to the device (or skipped): the engines queue a period every
        tick, so this rises as long as the device takes audio."""
        self._stopping = False

    def channel(self, index: int, ring: SampleRing) -> OutputChannel:
        output = OutputChannel(self, index, ring)
        self.channels[index] = output
        return output

    def run(self) -> None:
        try:
            self._run()
        except HardwareError as exc:
            self.failure = exc
            logger.error("%s; the lines it serves fail their disclosures closed", exc)

    def _run(self) -> None:
        outputs = list(self.channels.values())
        while not self._stopping:
            self.doorbell.clear()
            if not outputs or any(not output.queue for output in outputs):
                self.doorbell.wait(0.5)
                continue
            catch_up = all(len(o.queue) > CATCH_UP_BLOCKS and o.queue[0][2] for o in outputs)
            chunks = [output.queue.popleft() for output in outputs]
            frames = len(chunks[0][0])
            block = np.zeros((frames, self.device.channels), dtype=np.int16)
            if catch_up:
                self.device.skip(block)
                self.blocks += 1
                continue
            for output, (samples, ticket, _) in zip(outputs, chunks, strict=True):
                block[:, output.index] = samples
                if ticket is not None:
                    ticket.captured_before_write = output.ring.written
            underruns = self.device.underruns
            self.device.write(block)
            self.blocks += 1
            if self.device.underruns != underruns:
                for output in outputs:
                    output.underruns += 1

    def stop(self) -> None:
        self._stopping = True
        self.doorbell.set()
