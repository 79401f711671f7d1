"""Caller id (CLIP) on an idle line: DTMF CLIP digit strings and ETSI V.23 FSK messages."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from linerec.audio.dtmf import RATES, Digit

ABSENCE_REASONS = {"P": "private", "O": "unavailable"}
"""ETSI EN 300 659-3 reason for absence of the number (parameter 0x04, SDMF number)."""

DTMF_ABSENCE_CODES = {"00": "unavailable", "10": "private"}
"""DTMF CLIP B<code>C; another code also means no number, and is taken as unavailable."""

DTMF_DIGIT_GAP_S = 1.0
"""Digits further apart than this belong to different attempts: the parser starts over."""
MAX_DTMF_DIGITS = 24

MARK_HZ = 1300.0
SPACE_HZ = 2100.0
BAUD = 1200.0

MIN_LEVEL_DBFS = -50.0
"""Weakest FSK carrier decoded (sine peak); EN 300 659-1 sends it at -13.5 dBV nominal and
lines lose up to 30 dB, and the decoder must work down to -40 dBFS."""

MIN_MARK_BITS = 20
"""Continuous mark before the first byte of a message. EN 300 659-1 sends 180 +-25 after
the channel seizure (80 +-25 without one); asking for some keeps noise and speech, whose
mark/space decisions flip every few samples, from starting messages."""

MAX_BYTE_GAP_BITS = 16
"""Mark allowed between a stop bit and the next start bit within a message."""

class _Hunt(Enum):
    GIVEN_UP = "given up"
    """The message being received is given up: hunt for a new one from the cursor. Not an
    in-band position: positions may be negative, and -1 is one."""


MESSAGE_CALL_SETUP = 0x80
MESSAGE_SDMF = 0x04
PARAM_DATE_TIME = 0x01
PARAM_NUMBER = 0x02
PARAM_NUMBER_ABSENCE = 0x04
PARAM_NAME = 0x07


@dataclass(frozen=True)
class CallerId:
    number: str | None
    """Digits (and a leading + if sent)."""
    name: str | None
    absence: str | None
    """Why there is no number: "private" or "unavailable" (ETSI 'P' / 'O'; DTMF CLIP B10C /
    B00C), else None."""
    source: str
    """Where it was heard: "dtmf" or "fsk"."""
    position: int
    """Sample position where the message ended."""
    date_time: str | None = None
    """"MMDDHHMM" as the exchange sent it (FSK only; no year, local time of the exchange)."""


class DtmfClipParser:
    """Turns detected DTMF digits (idle line, before/between the first rings) into a CallerId.

    Forms: A<number>C (Dutch), D<number>C, <number># and B<code>C (absence: B00C unavailable,
    B10C private). Digits arriving more than ~1 s apart start over.
    """

    def __init__(self, rate: int = 8000) -> None:
        """``rate`` times the 1 s that starts the parser over; pass the line's rate."""
        if rate not in RATES:
            raise ValueError(f"sample rate {rate} is not one of {RATES}")
        self._max_gap = round(DTMF_DIGIT_GAP_S * rate)
        self.reset()

    def reset(self) -> None:
        self._form = ""
        """"number" after A or D, "absence" after B, "bare" for digits with no start symbol."""
        self._digits = ""
        self._last_end: int | None = None

    def feed(self, digit: Digit) -> CallerId | None:
        if self._last_end is not None and digit.start - self._last_end > self._max_gap:
            self._form, self._digits = "", ""
        self._last_end = digit.end
        symbol = digit.symbol
        if symbol in "AD":
            self._form, self._digits = "number", ""
        elif symbol == "B":
            self._form, self._digits = "absence", ""
        elif symbol.isdigit():
            self._form = self._form or "bare"
            self._digits += symbol
            if len(self._digits) > MAX_DTMF_DIGITS:
                self._form, self._digits = "", ""
        elif symbol == "C" and self._form == "number" and self._digits:
            return self._finish(CallerId(self._digits, None, None, "dtmf", digit.end))
        elif symbol == "C" and self._form == "absence" and self._digits:
            reason = DTMF_ABSENCE_CODES.get(self._digits, "unavailable")
            return self._finish(CallerId(None, None, reason, "dtmf", digit.end))
        elif symbol == "#" and self._form in ("bare", "number") and self._digits:
            return self._finish(CallerId(self._digits, None, None, "dtmf", digit.end))
        else:
            # '*', or an end symbol with nothing before it: not caller id.
            self._form, self._digits = "", ""
        return None

    def _finish(self, caller: CallerId) -> CallerId:
        self._form, self._digits = "", ""
        return caller


class FskCallerIdDecoder:
    """ETSI EN 300 659-1/-2 on-hook data transmission (V.23 FSK, 1200 baud) -> CallerId.

    Demodulation: the line is correlated with the mark and the space tone over a sliding
    window one bit long (a matched filter per tone); the sign of the difference of their
    energies is the bit, their sum tells whether a carrier is there at all. A UART then
    resynchronises on every start bit's edge and samples each bit where the window lies
    exactly over it. The channel seizure decodes as 0x55 bytes with one bit of mark between
    them, so a message begins only at a byte that follows a long run of mark; it is taken
    when its checksum is right.

    Cheap when idle: audio is handled in 10 ms blocks, and a block quieter than the weakest
    carrier skips the demodulator unless a message is being received.
    """

    def __init__(self, rate: int) -> None:
        if rate not in RATES:
            raise ValueError(f"sample rate {rate} is not one of {RATES}")
        self.rate = rate
        self._bit = rate / BAUD
        self._window = round(self._bit)
        self._block = rate // 100
        amplitude = 32767 * 10 ** (MIN_LEVEL_DBFS / 20)
        self._min_carrier = (amplitude * self._window / 2) ** 2
        # Blocks under half the weakest carrier's power skip the demodulator.
        self._min_power = amplitude**2 / 2 / 2
        n = np.arange(rate)
        # Both tones are whole numbers of hertz, so their phase repeats every second: the
        # oscillators are tables indexed by position modulo the rate.
        self._mark_osc = np.exp(-2j * np.pi * MARK_HZ * n / rate)
        self._space_osc = np.exp(-2j * np.pi * SPACE_HZ * n / rate)
        # Where, after the first space sample of a start bit, bit i's window lies over it:
        # the energies cross when half the window has reached the start bit.
        self._first_bit_delay = (self._window - 1) / 2
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.float64)
        self._pending_at = 0
        self._next: int | None = None
        self._history = np.zeros(self._window - 1, dtype=np.float64)
        # Demodulated but not yet decoded: from absolute position self._base onwards.
        self._base = 0
        self._diff = np.zeros(0, dtype=np.float64)
        self._carrier = np.zeros(0, dtype=bool)
        self._cursor = 0
        self._last_non_mark = -(1 << 62)
        self._message: list[int] | None = None

    def feed(self, samples: np.ndarray, position: int) -> list[CallerId]:
        """Caller ids whose message ended within what was fed so far, each reported once.
        A jump in ``position`` (a capture gap) drops a message being received."""
        found: list[CallerId] = []
        if self._next is not None and position != self._next:
            self.reset()
        if self._next is None:
            self._base = self._cursor = position
            self._last_non_mark = position - 1
        if not len(self._pending):
            self._pending_at = position
        self._next = position + len(samples)
        data = np.concatenate((self._pending, np.asarray(samples, dtype=np.float64)))
        usable = len(data) // self._block * self._block
        if usable:
            self._demodulate(data[:usable], self._pending_at)
            self._pending_at += usable
            self._decode(found)
        self._pending = data[usable:]
        return found

    def _demodulate(self, data: np.ndarray, at: int) -> None:
        blocks = data.reshape(-1, self._block)
        sums = blocks.sum(axis=1)
        power = (np.einsum("ij,ij->i", blocks, blocks) - sums * sums / self._block) / self._block
        loud = power >= self._min_power
        history = self._history
        self._history = data[len(data) - len(history) :]
        if not loud.any() and self._message is None:
            # Nothing that could be a carrier and no message under way: drop what is left.
            self._base = self._cursor = at + len(data)
            self._diff = np.zeros(0, dtype=np.float64)
            self._carrier = np.zeros(0, dtype=bool)
            self._last_non_mark = at + len(data) - 1
            return
        x = np.concatenate((history, data))
        phase = (np.arange(at - len(history), at + len(data)) % self.rate)
        mark = self._sliding(x * self._mark_osc[phase])
        space = self._sliding(x * self._space_osc[phase])
        mark_energy = mark.real**2 + mark.imag**2
        space_energy = space.real**2 + space.imag**2
        carrier = mark_energy + space_energy >= self._min_carrier
        carrier &= np.repeat(loud, self._block)
        self._diff = np.concatenate((self._diff, mark_energy - space_energy))
        self._carrier = np.concatenate((self._carrier, carrier))

    def _sliding(self, values: np.ndarray) -> np.ndarray:
        """Sums over the window ending at each sample (the first window - 1 are history)."""
        total = np.cumsum(values)
        total[self._window :] -= total[: -self._window].copy()
        return total[self._window - 1 :]

    def _decode(self, found: list[CallerId]) -> None:
        end = self._base + len(self._diff)
        while self._cursor < end:
            in_message = self._message is not None
            edge = self._next_start_bit(end) if in_message else self._message_start(end)
            if edge is None:
                break
            if edge is _Hunt.GIVEN_UP:
                continue
            byte = self._read_byte(edge)
            if byte is None:
                # Not all of the byte is here yet: look at it again with more audio.
                self._cursor = edge
                break
            value, resume, stop_end = byte
            if self._message is None and value in (MESSAGE_CALL_SETUP, MESSAGE_SDMF):
                self._message = [value]
            elif self._message is not None and value >= 0:
                message = self._message
                message.append(value)
                # Type, length, the length's bytes, checksum.
                if len(message) > 1 and len(message) == message[1] + 3:
                    caller = _parse_message(bytes(message), round(stop_end))
                    if caller is not None:
                        found.append(caller)
                    self._message = None
                    self._last_non_mark = resume
            else:
                # A false start, a framing error, or a byte that begins no message.
                self._message = None
                self._last_non_mark = edge
                resume = edge + 1
            self._cursor = resume
        # Keep only what the decoder may still look at (and one sample before it).
        drop = min(self._cursor, end) - self._base - 1
        if drop > 0:
            self._diff = self._diff[drop:]
            self._carrier = self._carrier[drop:]
            self._base += drop

    def _message_start(self, end: int) -> int | None:
        """The first space sample (with carrier) after a long enough run of mark, or None
        when there is none yet."""
        offset = self._cursor - self._base
        diff = self._diff[offset:]
        carrier = self._carrier[offset:]
        non_mark = np.flatnonzero(~carrier | (diff <= 0))
        if not len(non_mark):
            self._cursor = end
            return None
        absolute = non_mark + self._cursor
        previous = np.concatenate(([self._last_non_mark], absolute[:-1]))
        candidates = np.flatnonzero((absolute - previous - 1 >= MIN_MARK_BITS * self._bit)
                                    & carrier[non_mark])
        if not len(candidates):
            self._last_non_mark = int(absolute[-1])
            self._cursor = end
            return None
        first = int(candidates[0])
        if first:
            self._last_non_mark = int(absolute[first - 1])
        self._cursor = int(absolute[first])
        return self._cursor

    def _next_start_bit(self, end: int) -> int | _Hunt | None:
        """The start bit of the message's next byte; None to wait for more audio; GIVEN_UP when
        the message is given up because the carrier went or the mark between bytes went on
        too long."""
        offset = self._cursor - self._base
        non_mark = np.flatnonzero(~self._carrier[offset:] | (self._diff[offset:] <= 0))
        limit = MAX_BYTE_GAP_BITS * self._bit
        if len(non_mark) and non_mark[0] <= limit and self._carrier[offset + non_mark[0]]:
            self._cursor += int(non_mark[0])
            return self._cursor
        if not len(non_mark) and end - self._cursor <= limit:
            return None
        # Hunt for a new message from here; the mark since the stop bit counts towards it.
        self._message = None
        self._last_non_mark = self._cursor - 1
        return _Hunt.GIVEN_UP

    def _read_byte(self, edge: int) -> tuple[int, int, float] | None:
        """UART-style: the byte (-1 for a bad start or stop bit) with the bits sampled where
        the window covers each exactly, where to look for the next start bit, and where the
        stop bit ends; None when the byte is not all here yet."""
        index = edge - self._base
        crossing = float(edge)
        if index > 0:
            before, after = self._diff[index - 1], self._diff[index]
            if before > 0 > after:
                crossing = edge - 1 + before / (before - after)
        start = crossing - self._first_bit_delay + 1
        # Between samples, the decision is interpolated: a bit is under seven samples long
        # at 8 kHz, and rounding to the nearest sample would eat a good part of the eye.
        points = start + (np.arange(10) + 1) * self._bit - 1 - self._base
        below = np.floor(points).astype(np.int64)
        # Resume after the stop bit's sampling point, which is mark: the next start bit's
        # energies cross half a window after the stop bit ends, later than that.
        resume = int(below[-1]) + 1 + self._base
        if below[-1] + 1 >= len(self._diff):
            return None
        weight = points - below
        diff = self._diff[below] * (1 - weight) + self._diff[below + 1] * weight
        bits = diff > 0
        carrier = self._carrier[below] & self._carrier[below + 1]
        if not carrier.all() or bits[0] or not bits[9]:
            return -1, resume, start + 10 * self._bit
        value = int(np.dot(bits[1:9], 1 << np.arange(8)))
        return value, resume, start + 10 * self._bit


def _parse_message(message: bytes, position: int) -> CallerId | None:
    """A whole message (type, length, body, checksum) -> CallerId; None when the checksum
    is wrong or the parameters do not add up."""
    if sum(message) & 0xFF:
        return None
    body = message[2:-1]
    if message[0] == MESSAGE_SDMF:
        # Date and time, then the number or a reason for its absence, with no parameters.
        if len(body) < 8:
            return None
        return _caller(body[8:].decode("latin-1").strip(), None, None, position,
                       body[:8].decode("latin-1"))
    params: dict[int, str] = {}
    index = 0
    while index < len(body):
        if index + 2 > len(body) or index + 2 + body[index + 1] > len(body):
            return None
        kind, size = body[index], body[index + 1]
        params[kind] = body[index + 2 : index + 2 + size].decode("latin-1").strip()
        index += 2 + size
    return _caller(params.get(PARAM_NUMBER, ""), params.get(PARAM_NAME),
                   params.get(PARAM_NUMBER_ABSENCE), position, params.get(PARAM_DATE_TIME))


def _printable(text: str | None) -> str | None:
    """A field as sent, without the control characters a garbled message can carry: they
    would reach receipts, tags and the log."""
    return None if text is None else "".join(c for c in text if c.isprintable()).strip()


def _caller(number: str, name: str | None, absence_code: str | None, position: int,
            date_time: str | None) -> CallerId:
    number = _printable(number) or ""
    name, date_time = _printable(name), _printable(date_time) or None
    # Some exchanges put the reason for absence where the number goes.
    if number in ABSENCE_REASONS:
        absence_code, number = number, ""
    absence = ABSENCE_REASONS.get(absence_code or "")
    return CallerId(number or None, name or None, absence, "fsk", position, date_time)
