"""The simulated telephone exchange's signals: DTMF, caller id (DTMF CLIP and V.23 FSK), tones."""

from __future__ import annotations

from datetime import datetime

import numpy as np

FULL_SCALE = 32767.0
"""int16 full scale; every level here is a sine's peak relative to it (dBFS)."""

DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
DTMF_COLS = (1209.0, 1336.0, 1477.0, 1633.0)
DTMF_KEYS = ("123A", "456B", "789C", "*0#D")
"""Row by row: the key at DTMF_KEYS[r][c] is the low tone DTMF_ROWS[r] plus DTMF_COLS[c]."""

FSK_MARK_HZ = 1300.0
FSK_SPACE_HZ = 2100.0
FSK_BAUD = 1200.0
SEIZURE_BITS = 300
MARK_BITS = 180

MDMF = 0x80
PARAM_DATE_TIME = 0x01
PARAM_NUMBER = 0x02
PARAM_NUMBER_ABSENCE = 0x04
PARAM_NAME = 0x07
PARAM_NAME_ABSENCE = 0x08
ABSENCE_CODES = {"private": "P", "unavailable": "O", "P": "P", "O": "O"}
"""Reason for absence: the words CallerId uses, or the ETSI codes themselves."""

PROGRESS_CADENCES = {
    # kind -> (on, off) seconds; off 0 is a continuous tone
    "dial": (1.0, 0.0),
    "ringback": (1.0, 4.0),
    "busy": (0.5, 0.5),
    "congestion": (0.25, 0.25),
}
"""Dutch call progress tones (ITU list, as in Asterisk's indications for nl)."""


def _amplitude(level_dbfs: float) -> float:
    return FULL_SCALE * 10 ** (level_dbfs / 20)


def _sine(frequency: float, samples: int, rate: int, amplitude: float) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(samples) / rate)


def _key_tones(key: str) -> tuple[float, float]:
    for row, keys in enumerate(DTMF_KEYS):
        if key in keys:
            return DTMF_ROWS[row], DTMF_COLS[keys.index(key)]
    raise ValueError(f"{key!r} is not a DTMF key; keys are 0-9, *, #, A-D")


def dtmf(digits: str, rate: int, *, on_ms: int = 70, off_ms: int = 70, level_dbfs: float = -10.0,
         twist_db: float = 0.0) -> np.ndarray:
    """Each digit as ``on_ms`` of its tone pair then ``off_ms`` of silence.

    ``level_dbfs`` is the low-group tone's peak; the high-group tone is ``twist_db`` lower
    (positive: normal twist, low group louder; negative: reverse twist, high group louder).
    """
    on = round(on_ms * rate / 1000)
    off = round(off_ms * rate / 1000)
    low_amplitude = _amplitude(level_dbfs)
    high_amplitude = _amplitude(level_dbfs - twist_db)
    parts = []
    for key in digits.upper():
        low, high = _key_tones(key)
        parts.append(_sine(low, on, rate, low_amplitude) + _sine(high, on, rate, high_amplitude))
        parts.append(np.zeros(off))
    return np.concatenate([np.zeros(0), *parts]).astype(np.float32)


def dtmf_clip(number: str, rate: int, *, form: str = "A") -> np.ndarray:
    """Caller id as DTMF before the first ring: form "A" sends A<number>C (the Dutch form),
    "D" D<number>C, "#" <number>#; "private" and "unavailable" send B10C and B00C."""
    keys = {
        "A": f"A{number}C",
        "D": f"D{number}C",
        "#": f"{number}#",
        "private": "B10C",
        "unavailable": "B00C",
    }.get(form)
    if keys is None:
        raise ValueError(f"DTMF CLIP form {form!r} is not one of A, D, #, private, unavailable")
    return dtmf(keys, rate)


def callerid_message(*, number: str | None, name: str | None = None,
                     when: datetime | None = None, absence: str | None = None) -> bytes:
    """An ETSI EN 300 659-3 call setup message (MDMF), its checksum byte included."""
    params = b""
    if when is not None:
        params += _param(PARAM_DATE_TIME, when.strftime("%m%d%H%M").encode("ascii"))
    if number is not None:
        params += _param(PARAM_NUMBER, number.encode("ascii"))
    if absence is not None:
        if absence not in ABSENCE_CODES:
            raise ValueError(f"absence {absence!r} is not one of {', '.join(ABSENCE_CODES)}")
        params += _param(PARAM_NUMBER_ABSENCE, ABSENCE_CODES[absence].encode("ascii"))
    if name is not None:
        params += _param(PARAM_NAME, name.encode("latin-1"))
    if len(params) > 255:
        raise ValueError("caller id message longer than 255 bytes")
    message = bytes([MDMF, len(params)]) + params
    return message + bytes([-sum(message) & 0xFF])


def _param(kind: int, value: bytes) -> bytes:
    if not 0 < len(value) <= 255:
        raise ValueError(f"caller id parameter 0x{kind:02x} must be 1 to 255 bytes")
    return bytes([kind, len(value)]) + value


def v23_fsk(data: bytes, rate: int, *, level_dbfs: float = -15.0, frequency_error: float = 0.0,
            seizure_bits: int = SEIZURE_BITS, mark_bits: int = MARK_BITS) -> np.ndarray:
    """Bytes as an on-hook V.23 FSK burst: channel seizure (alternating bits, starting with a
    space), mark, then each byte LSB first between a start (space) and a stop (mark) bit.

    ``frequency_error`` scales both tones (0.015 is 1.5 % high); the phase runs on across
    bit changes, as a modem's oscillator does.
    """
    bits: list[int] = [index % 2 for index in range(seizure_bits)]
    bits += [1] * mark_bits
    for byte in data:
        bits += [0, *((byte >> i) & 1 for i in range(8)), 1]
    # A few marks after the last stop bit, as transmitters leave the carrier on briefly.
    bits += [1] * 4
    total = int(np.ceil(len(bits) * rate / FSK_BAUD))
    bit_of_sample = np.minimum((np.arange(total) * FSK_BAUD / rate).astype(np.int64),
                               len(bits) - 1)
    frequency = np.where(np.asarray(bits)[bit_of_sample] == 1, FSK_MARK_HZ, FSK_SPACE_HZ)
    frequency = frequency * (1 + frequency_error)
    phase = 2 * np.pi * np.cumsum(frequency) / rate
    return (_amplitude(level_dbfs) * np.sin(phase)).astype(np.float32)


def fsk_caller_id(rate: int, *, number: str | None, name: str | None = None,
                  when: datetime | None = None, absence: str | None = None,
                  level_dbfs: float = -15.0, frequency_error: float = 0.0) -> np.ndarray:
    """On-hook caller id (ETSI EN 300 659-1, V.23 FSK) of one call setup message."""
    message = callerid_message(number=number, name=name, when=when, absence=absence)
    return v23_fsk(message, rate, level_dbfs=level_dbfs, frequency_error=frequency_error)


def progress_tone(kind: str, seconds: float, rate: int, *, frequency: float = 425.0,
                  level_dbfs: float = -15.0) -> np.ndarray:
    """``seconds`` of a call progress tone: "dial" (continuous), "ringback" (1 s on, 4 s off),
    "busy" (0.5/0.5 s) or "congestion" (0.25/0.25 s), each starting with the tone on."""
    if kind not in PROGRESS_CADENCES:
        raise ValueError(f"progress tone {kind!r} is not one of {', '.join(PROGRESS_CADENCES)}")
    on, off = PROGRESS_CADENCES[kind]
    total = round(seconds * rate)
    tone = _sine(frequency, total, rate, _amplitude(level_dbfs))
    if off:
        t = np.arange(total) / rate
        tone[(t % (on + off)) >= on] = 0.0
    return tone.astype(np.float32)
