"""Call progress on an off-hook line: ringback, busy and congestion tones, and answering speech."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from linerec.audio.dtmf import RATES, DtmfDetector

BLOCK_S = 0.032
"""Analysis block: 256 samples at 8 kHz, 31.25 Hz bins; cadences are timed to within it."""

TONE_LOW_HZ = 410.0
TONE_HIGH_HZ = 465.0
"""Call progress tones here are 425 Hz, on some exchanges 450 Hz, each +-15 Hz."""

TONE_SHARE = 0.9
"""Share of a block's energy the strongest peak must hold for the block to be one tone;
espeak-ng speech reached 0.79 at most."""

SPEECH_FLOOR_DBFS = -45.0
"""Quieter blocks are silence (level of a sine peak with the same power)."""

HANGOVER_BLOCKS = 2
"""Silent blocks a run of speech may contain, for the stops and short pauses within words."""

RINGBACK_ON_S = (0.7, 1.5)
"""Dutch ringback is 1 s on, 4 s off."""
BUSY_ON_OFF_S = (0.15, 0.7)
"""Busy is 0.5/0.5 s, congestion 0.25/0.25 s: both on and off times lie within this."""
BUSY_MIN_BURSTS = 3
BUSY_HOLD_S = 1.0
"""A busy cadence counts as going on until this long after its latest burst ended."""

MAX_BURSTS = 16
"""Tone bursts remembered for the cadence checks."""


@dataclass(frozen=True)
class _Burst:
    start: int
    end: int


class CallProgress:
    """Follows one off-hook line's audio in 32 ms blocks.

    A block is a progress tone when, in its Hann-windowed spectrum, one peak holds nearly
    all of the energy and lies at 425 or 450 Hz; two such blocks in a row begin a tone
    burst, two without end it. A block is speech when it is loud enough, is not one tone,
    and neither it nor its neighbours carry a tone or a DTMF digit (a DtmfDetector runs
    alongside): the neighbours are checked because a block where a tone starts or stops
    holds a slice of it whose spectrum is spread out like speech's. That needs the next
    block, so speech is known one block (32 ms) late.
    """

    def __init__(self, rate: int, *, min_speech_ms: int = 200) -> None:
        self.listen_for_speech = True
        """Off once only the busy tone matters (after the answer): saves the DTMF detector
        that keeps digits from passing for speech."""
        if rate not in RATES:
            raise ValueError(f"sample rate {rate} is not one of {RATES}")
        self.rate = rate
        self.block = round(BLOCK_S * rate)
        self.min_speech = round(min_speech_ms * rate / 1000)
        self._window = np.hanning(self.block)
        self._bin_hz = rate / self.block
        amplitude = 32767 * 10 ** (SPEECH_FLOOR_DBFS / 20)
        self._floor = amplitude**2 / 2
        self._dtmf = DtmfDetector(rate)
        self._pending = np.zeros(0, dtype=np.float64)
        self._pending_at = 0
        self.reset()

    def reset(self) -> None:
        self._dtmf.reset()
        self._pending = np.zeros(0, dtype=np.float64)
        self._next: int | None = None
        self._fed_until = 0
        # Tone bursts: one under way from _burst_start, and those that ended.
        self._tone_blocks = 0
        self._quiet_blocks = 0
        self._burst_start: int | None = None
        self._burst_last = 0
        self._bursts: list[_Burst] = []
        self._ringback = 0
        self._last_tone_end: int | None = None
        # Speech: the block before the latest (start, speech so far, tone) and the latest.
        self._older_tone = False
        self._previous: tuple[int, bool, bool] | None = None
        self._run_start: int | None = None
        self._run_end = 0
        self._run_gap = 0

    def feed(self, samples: np.ndarray, position: int) -> None:
        """``position`` is the sample position of ``samples[0]``; a jump in it (a capture
        gap) ends what was under way, as silence would."""
        if self._next is not None and position != self._next:
            self._pending = np.zeros(0, dtype=np.float64)
            self._gap()
        if not len(self._pending):
            self._pending_at = position
        self._next = position + len(samples)
        self._fed_until = self._next
        data = np.concatenate((self._pending, np.asarray(samples, dtype=np.float64)))
        count = len(data) // self.block
        for index in range(count):
            start = self._pending_at + index * self.block
            self._analyse(data[index * self.block : (index + 1) * self.block], start)
        self._pending_at += count * self.block
        self._pending = data[count * self.block :]

    @property
    def tone_active(self) -> bool:
        """A 425 Hz or 450 Hz (+-15 Hz) single tone dominates right now: from its second
        32 ms block until the second block without it."""
        return self._burst_start is not None

    @property
    def tone_since(self) -> int | None:
        """Start of the tone burst going on now; None when there is none."""
        return self._burst_start

    def bursts_since(self, position: int, shortest: int, longest: int) -> int:
        """Completed tone bursts that began at or after ``position`` and lasted from
        ``shortest`` to ``longest`` samples."""
        return sum(1 for burst in self._bursts if burst.start >= position
                   and shortest <= burst.end - burst.start <= longest)

    @property
    def ringback_bursts(self) -> int:
        """Completed tone bursts lasting 0.7-1.5 s."""
        return self._ringback

    @property
    def last_tone_end(self) -> int | None:
        """Sample where the latest tone burst ended."""
        return self._last_tone_end

    def speech_since(self) -> int | None:
        """Start of the current run of voice activity that is not a progress tone or DTMF,
        once that run has lasted min_speech_ms; None otherwise: during tone, and in silence
        once it outlasts the hangover (64 ms, for pauses within words). Known 32 ms late."""
        if self.tone_active or self._run_start is None:
            return None
        if self._run_end - self._run_start < self.min_speech:
            return None
        return self._run_start

    def busy_since(self) -> int | None:
        """Start of the first burst of a busy (0.5/0.5 s) or congestion (0.25/0.25 s)
        cadence still going on: at least 3 bursts with on and off times each 0.15-0.7 s, the
        latest running or ended under 1 s ago; else None."""
        low, high = (round(s * self.rate) for s in BUSY_ON_OFF_S)
        bursts = list(self._bursts)
        if self._burst_start is not None:
            running = self._burst_last - self._burst_start
            if running > high:
                return None
            # A running burst is as long as it has been so far: it may yet end in time.
            bursts.append(_Burst(self._burst_start, self._burst_start + max(running, low)))
        elif not bursts or self._fed_until - bursts[-1].end >= BUSY_HOLD_S * self.rate:
            return None
        if not bursts or not low <= bursts[-1].end - bursts[-1].start <= high:
            return None
        first = len(bursts) - 1
        while first > 0:
            before, after = bursts[first - 1], bursts[first]
            if not (low <= before.end - before.start <= high
                    and low <= after.start - before.end <= high):
                break
            first -= 1
        if len(bursts) - first < BUSY_MIN_BURSTS:
            return None
        return bursts[first].start

    # ---- one block -------------------------------------------------------------------

    def _analyse(self, block: np.ndarray, start: int) -> None:
        power = (np.dot(block, block) - block.sum() ** 2 / self.block) / self.block
        loud = power >= self._floor
        tone = progress = False
        if loud:
            tone, progress = self._tonality(block)
        if not self.listen_for_speech:
            self._follow_tone(progress, start)
            return
        self._dtmf.feed(block, start)
        hit = self._dtmf.last_hit_end
        # A DTMF block hit ending within one DTMF block before this one, or in it.
        if hit is not None and hit > start - self._dtmf.block:
            tone = True
        self._follow_tone(progress, start)
        self._follow_speech(start, loud and not tone, tone)

    def _tonality(self, block: np.ndarray) -> tuple[bool, bool]:
        """(one tone dominates, and it is a progress tone)."""
        spectrum = np.fft.rfft((block - block.mean()) * self._window)
        power = spectrum.real**2 + spectrum.imag**2
        # The lowest bins hold what is left of DC and mains hum under the window.
        power[:3] = 0.0
        total = power.sum()
        peak = int(np.argmax(power))
        if power[max(peak - 2, 0) : peak + 3].sum() < TONE_SHARE * total:
            return False, False
        if not 0 < peak < len(power) - 1:
            return True, False
        # Quadratic interpolation of the log spectrum around the peak: the Hann window's
        # main lobe is close to a parabola there.
        left, centre, right = np.log(power[peak - 1 : peak + 2] + 1e-12)
        curvature = left - 2 * centre + right
        shift = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
        frequency = (peak + shift) * self._bin_hz
        return True, TONE_LOW_HZ <= frequency <= TONE_HIGH_HZ

    def _follow_tone(self, progress: bool, start: int) -> None:
        end = start + self.block
        if progress:
            self._tone_blocks += 1
            self._quiet_blocks = 0
            if self._burst_start is None and self._tone_blocks >= 2:
                self._burst_start = start - self.block
            self._burst_last = end
            return
        self._tone_blocks = 0
        self._quiet_blocks += 1
        if self._burst_start is not None and self._quiet_blocks >= 2:
            self._end_burst()

    def _end_burst(self) -> None:
        assert self._burst_start is not None
        burst = _Burst(self._burst_start, self._burst_last)
        self._burst_start = None
        self._last_tone_end = burst.end
        low, high = (round(s * self.rate) for s in RINGBACK_ON_S)
        if low <= burst.end - burst.start <= high:
            self._ringback += 1
        self._bursts = [*self._bursts[-(MAX_BURSTS - 1) :], burst]

    def _follow_speech(self, start: int, speech: bool, tone: bool) -> None:
        previous = self._previous
        self._previous = (start, speech, tone)
        if previous is None:
            self._older_tone = tone
            return
        before, speech_before, tone_before = previous
        # The block before is speech only if neither of its neighbours is a tone.
        self._speech_block(before, speech_before and not self._older_tone and not tone,
                           tone_before)
        self._older_tone = tone_before

    def _speech_block(self, start: int, speech: bool, tone: bool) -> None:
        if speech:
            if self._run_start is None:
                self._run_start = start
            self._run_end = start + self.block
            self._run_gap = 0
        elif self._run_start is not None:
            self._run_gap += 1
            if tone or self._run_gap > HANGOVER_BLOCKS:
                self._run_start = None

    def _gap(self) -> None:
        """Audio went missing: end the tone burst and the speech run under way."""
        if self._burst_start is not None:
            self._end_burst()
        self._tone_blocks = self._quiet_blocks = 0
        self._previous = None
        self._older_tone = False
        self._run_start = None

