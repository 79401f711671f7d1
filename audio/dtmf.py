"""Streaming DTMF detection (ITU-T Q.23/Q.24) with block Goertzel filters, as spandsp does it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ROWS = (697.0, 770.0, 852.0, 941.0)
COLS = (1209.0, 1336.0, 1477.0, 1633.0)
KEYS = ("123A", "456B", "789C", "*0#D")
"""The key at KEYS[row][col] is the low-group tone ROWS[row] plus the high-group COLS[col]."""
KEYS_INDEX = {key: (row, col) for row, keys in enumerate(KEYS) for col, key in enumerate(keys)}

RATES = (8000, 16000)

BLOCK_S = 102 / 8000
"""Goertzel block length, spandsp's 102 samples at 8 kHz (12.75 ms): a tone must fill two
successive blocks, so 40 ms tones always hit and tones under 20 ms never do."""

DBM0_PEAK = 32767 * 10 ** (-3.14 / 20)
"""The peak of a 0 dBm0 sine in int16 units (22 828). G.711's full-scale sine is +3.14 dBm0;
linerec takes int16 full scale as G.711 full scale, so 0 dBm0 is -3.14 dBFS."""

MIN_LEVEL_DBM0 = -30.0
"""Weakest tone of a pair still accepted (each tone, not the pair)."""

NORMAL_TWIST_DB = 8.0
"""How much louder the low-group tone may be than the high-group one (spandsp's 'normal')."""
REVERSE_TWIST_DB = 4.0
"""How much louder the high-group tone may be than the low-group one."""

RELATIVE_PEAK_DB = 8.0
"""The chosen tone of each group must beat the other three of its group by this much."""

TONE_TO_TOTAL = 10 ** (-0.85 / 10)
"""Share of a block's energy the two tones must hold, as spandsp: talk-off protection
(speech spreads its energy over the band), and a block only part-filled by a tone fails,
which is what rejects tones under 20 ms."""

MAX_FREQUENCY_ERROR = 0.025
"""Q.24 asks for +-1.5 % accepted and +-3.5 % rejected; a digit whose measured tones are
further off than the midpoint is dropped."""

NO_TURNS = np.zeros(2, dtype=np.complex128)
"""Phase turns of a block that hit nothing."""


@dataclass(frozen=True)
class Digit:
    symbol: str
    """One of "0123456789*#ABCD"."""
    start: int
    """Sample position where the tone began (to within one block, 12.75 ms)."""
    end: int
    """Sample position where it ended (to within one block)."""


class DtmfDetector:
    """Finds DTMF digits in one line's audio, fed in chunks of any length.

    Each 12.75 ms block gets eight Goertzel filters, done as one matrix product with the
    block's DFT at each DTMF frequency, and a windowed pair of shorter DFTs whose phase turn
    measures how far off that frequency a tone is. A block hits a key when both tones are
    loud enough, within the twist limits, clear of the other tones of their group, and hold
    nearly all of the block's energy. As in spandsp, a digit starts on two successive hits of
    the same key and ends on two successive blocks that disagree with it, so one bad block
    neither ends nor splits a digit. A digit is reported when it ends, and dropped then if
    its tones, measured over all of its blocks, were off frequency.
    """

    def __init__(self, rate: int) -> None:
        if rate not in RATES:
            raise ValueError(f"sample rate {rate} is not one of {RATES}")
        self.rate = rate
        self.block = round(BLOCK_S * rate)
        frequencies = np.array(ROWS + COLS)
        self._basis = np.exp(-2j * np.pi * np.outer(np.arange(self.block), frequencies) / rate)
        # Frequency measurement: Hann-windowed DFTs over the first and the last two thirds of
        # the block; their phase turn over the third between them is the tone's offset from
        # nominal. The window keeps the other group's tone, 236 Hz away at worst, out of it
        # (plain halves of the block let it pull the estimate by 1 %).
        self._lag = self.block // 3
        span = self.block - self._lag
        window = np.hanning(span + 2)[1:-1]
        n = np.arange(span)
        self._window_basis = window[:, None] * np.exp(-2j * np.pi * np.outer(n, frequencies) / rate)
        self._lag_turn = np.exp(-2j * np.pi * frequencies * self._lag / rate)
        # Phase turn -> offset in DFT bins of the whole block, and the largest offset whose
        # energy loss is made good.
        self._turn_to_bins = self.block / (2 * math.pi * self._lag)
        self._max_offset_bins = MAX_FREQUENCY_ERROR * frequencies * self.block / rate
        amplitude = DBM0_PEAK * 10 ** (MIN_LEVEL_DBM0 / 20)
        # Energies are in "energy of the block" units: a sine of peak A filling the block
        # carries A^2 * block / 2, and so does 2 |X|^2 / block of its DFT X.
        self._min_tone = amplitude**2 * self.block / 2
        self._normal_twist = 10 ** (NORMAL_TWIST_DB / 10)
        self._reverse_twist = 10 ** (REVERSE_TWIST_DB / 10)
        self._relative_peak = 10 ** (RELATIVE_PEAK_DB / 10)
        self._pending = np.zeros(0, dtype=np.float64)
        self._pending_at = 0
        self.reset()

    @property
    def last_hit_end(self) -> int | None:
        """End of the latest block in which a key's tone pair was heard, digit or not yet;
        for telling DTMF from speech."""
        return self._last_hit_end

    def reset(self) -> None:
        """Forget everything fed so far, a digit under way included."""
        self._last_hit_end: int | None = None
        self._pending = np.zeros(0, dtype=np.float64)
        self._next: int | None = None
        self._last_hit = ""
        self._last_turns = np.zeros(2, dtype=np.complex128)
        self._in_digit = ""
        self._digit_start = 0
        self._digit_end = 0
        self._turns = np.zeros(2, dtype=np.complex128)

    def feed(self, samples: np.ndarray, position: int) -> list[Digit]:
        """Digits whose tone has ended (been released) within what was fed so far; each digit
        reported once. ``position`` is the sample position of ``samples[0]``; a jump in it (a
        capture gap) ends a digit under way and drops the unfinished block."""
        digits: list[Digit] = []
        if self._next is not None and position != self._next:
            self._release(digits)
            self._pending = np.zeros(0, dtype=np.float64)
        if not len(self._pending):
            self._pending_at = position
        self._next = position + len(samples)
        data = np.concatenate((self._pending, np.asarray(samples, dtype=np.float64)))
        count = len(data) // self.block
        if count:
            blocks = data[: count * self.block].reshape(count, self.block)
            self._blocks(blocks, self._pending_at, digits)
            self._pending_at += count * self.block
        self._pending = data[count * self.block :]
        return digits

    def _blocks(self, blocks: np.ndarray, at: int, digits: list[Digit]) -> None:
        sums = blocks.sum(axis=1)
        energy = np.einsum("ij,ij->i", blocks, blocks) - sums * sums / self.block
        # Energy gate: a block too quiet to hold even the weakest accepted tone skips the
        # filters. On a silent line with no digit under way the whole call ends here.
        loud = energy >= self._min_tone
        if not loud.any() and not self._in_digit and not self._last_hit:
            return
        whole = np.zeros((len(blocks), 8), dtype=np.complex128)
        turns = np.zeros((len(blocks), 8), dtype=np.complex128)
        if loud.any():
            chosen = blocks[loud]
            span = self.block - self._lag
            whole[loud] = chosen @ self._basis
            first = chosen[:, :span] @ self._window_basis
            second = chosen[:, self._lag :] @ self._window_basis * self._lag_turn
            turns[loud] = second * np.conj(first)
        for index in range(len(blocks)):
            start = at + index * self.block
            hit, pair_turns = "", NO_TURNS
            if loud[index]:
                hit, pair_turns = self._classify(whole[index], turns[index], energy[index])
            self._step(hit, pair_turns, start, digits)

    def _classify(self, whole: np.ndarray, turns: np.ndarray, total: float
                  ) -> tuple[str, np.ndarray]:
        """The key this block hits ("" for none), and the phase turns of its two tones."""
        tone = 2 * (whole.real**2 + whole.imag**2) / self.block
        rows, cols = tone[:4], tone[4:]
        row = int(np.argmax(rows))
        col = int(np.argmax(cols))
        pair = [row, 4 + col]
        pair_turns = turns[pair]
        # A tone off its nominal frequency loses energy in a block this short (1.5 % of
        # 1633 Hz costs 1.4 dB): give back what the Goertzel lost, for offsets up to the
        # accepted limit only.
        offset = np.abs(np.angle(pair_turns)) * self._turn_to_bins
        offset = np.minimum(offset, self._max_offset_bins[pair])
        low, high = tone[pair] / np.sinc(offset) ** 2
        if low < self._min_tone or high < self._min_tone:
            return "", pair_turns
        if high >= low * self._reverse_twist or low >= high * self._normal_twist:
            return "", pair_turns
        rows[row] = cols[col] = 0.0
        if rows.max() * self._relative_peak > low or cols.max() * self._relative_peak > high:
            return "", pair_turns
        if low + high <= TONE_TO_TOTAL * total:
            return "", pair_turns
        return KEYS[row][col], pair_turns

    def _step(self, hit: str, turns: np.ndarray, start: int, digits: list[Digit]) -> None:
        """spandsp's hit logic for one block: change only on two successive indications."""
        if hit:
            self._last_hit_end = start + self.block
        if hit and hit == self._in_digit:
            self._digit_end = start + self.block
            self._turns += turns
        if hit != self._in_digit and self._last_hit != self._in_digit:
            new = hit if hit and hit == self._last_hit else ""
            self._release(digits)
            if new:
                self._in_digit = new
                self._digit_start = start - self.block
                self._digit_end = start + self.block
                self._turns = self._last_turns + turns
        self._last_hit = hit
        self._last_turns = turns

    def _release(self, digits: list[Digit]) -> None:
        if self._in_digit and self._on_frequency():
            digits.append(Digit(self._in_digit, self._digit_start, self._digit_end))
        self._in_digit = ""
        self._last_hit = ""

    def _on_frequency(self) -> bool:
        """Whether both tones of the digit under way were within MAX_FREQUENCY_ERROR: the
        phase turn between the windowed DFTs, summed over the digit's blocks, is the offset."""
        row, col = KEYS_INDEX[self._in_digit]
        nominal = np.array([ROWS[row], COLS[col]])
        offset = np.angle(self._turns) * self.rate / (2 * math.pi * self._lag)
        return bool((np.abs(offset) <= MAX_FREQUENCY_ERROR * nominal).all())

