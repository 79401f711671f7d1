"""Line signals: DTMF against sox, caller id (DTMF CLIP and V.23 FSK), call progress tones,
and no false digits, tones or answers in espeak-ng speech."""

from __future__ import annotations

import subprocess
import wave
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from linerec.audio.callerid import CallerId, DtmfClipParser, FskCallerIdDecoder
from linerec.audio.dtmf import COLS, KEYS, ROWS, Digit, DtmfDetector
from linerec.audio.progress import CallProgress
from linerec.hw import exchange

RATES = (8000, 16000)
CHUNKS = (32, 160, 4096)
START = 123_456
"""Streams start at an arbitrary sample position: positions are absolute."""

ALL_KEYS = "".join(KEYS)


def int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(samples), -32768, 32767).astype(np.int16)


def silence(rate: int, seconds: float) -> np.ndarray:
    return np.zeros(round(rate * seconds), dtype=np.float32)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2"), wav.getframerate()


def digits_in(samples: np.ndarray, rate: int, chunk: int = 160) -> list[Digit]:
    detector = DtmfDetector(rate)
    found: list[Digit] = []
    data = int16(np.concatenate((samples, silence(rate, 0.1))))
    for offset in range(0, len(data), chunk):
        found += detector.feed(data[offset : offset + chunk], START + offset)
    return found


def symbols(samples: np.ndarray, rate: int, chunk: int = 160) -> str:
    return "".join(digit.symbol for digit in digits_in(samples, rate, chunk))


def caller_ids(samples: np.ndarray, rate: int, chunk: int = 160) -> list[CallerId]:
    decoder = FskCallerIdDecoder(rate)
    found: list[CallerId] = []
    data = int16(samples)
    for offset in range(0, len(data), chunk):
        found += decoder.feed(data[offset : offset + chunk], START + offset)
    return found


def tone_pair(key: str, rate: int, *, seconds: float = 0.07, level_dbfs: float = -10.0,
              frequency_error: float = 0.0) -> np.ndarray:
    """One key's tones, both off by ``frequency_error``, then silence."""
    row = next(r for r, keys in enumerate(KEYS) if key in keys)
    col = KEYS[row].index(key)
    t = np.arange(round(seconds * rate)) / rate
    amplitude = 32767 * 10 ** (level_dbfs / 20)
    tones = sum(amplitude * np.sin(2 * np.pi * f * (1 + frequency_error) * t + phase)
                for f, phase in ((ROWS[row], 0.3), (COLS[col], 1.1)))
    return np.concatenate((tones, silence(rate, 0.07)))


def dc_free(samples: np.ndarray, rate: int, cutoff: float = 300.0) -> np.ndarray:
    """What the HAT's line transformer passes: nothing below ``cutoff`` hertz."""
    spectrum = np.fft.rfft(samples)
    spectrum[np.fft.rfftfreq(len(samples), 1 / rate) < cutoff] = 0
    return np.fft.irfft(spectrum, len(samples))


# ---- speech from espeak-ng, resampled by sox ----------------------------------------

SPEECH = {
    "en": "Good morning. I would like to change the delivery address of my order. The new "
          "address is Keizersgracht one hundred and twelve in Amsterdam. Please call me "
          "back tomorrow morning.",
    "nl": "Goedemorgen, u spreekt met de klantenservice. Ik wil graag mijn adres wijzigen. "
          "Het nieuwe adres is Keizersgracht honderdtwaalf in Amsterdam. Kunt u mij morgen "
          "terugbellen?",
}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], np.ndarray]:
    """About ten seconds of espeak-ng speech per voice, at each line rate."""
    folder = tmp_path_factory.mktemp("speech")
    found = {}
    for voice, text in SPEECH.items():
        source = folder / f"{voice}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(source), text], check=True)
        for rate in RATES:
            path = folder / f"{voice}-{rate}.wav"
            subprocess.run(["sox", str(source), "-r", str(rate), "-b", "16", str(path)],
                           check=True)
            samples, got = read_wav(path)
            assert got == rate
            assert len(samples) > 8 * rate
            found[voice, rate] = samples.astype(np.float32)
    return found


# ---- DTMF ---------------------------------------------------------------------------


@pytest.mark.parametrize("rate", RATES)
def test_every_key_from_sox_is_detected(tmp_path: Path, rate: int) -> None:
    for key in ALL_KEYS:
        row = next(r for r, keys in enumerate(KEYS) if key in keys)
        low, high = ROWS[row], COLS[KEYS[row].index(key)]
        path = tmp_path / f"{rate}-{ord(key)}.wav"
        subprocess.run(["sox", "-n", "-r", str(rate), "-b", "16", "-c", "1", str(path), "synth",
                        "0.07", "sine", str(low), "sine", str(high), "remix", "-", "gain", "-6"],
                       check=True)
        tone, got = read_wav(path)
        assert got == rate and len(tone) == round(0.07 * rate)
        # The oracle first: its spectrum is the key's tone pair and nothing else.
        power = np.abs(np.fft.rfft(tone * np.hanning(len(tone)), 8 * rate)) ** 2
        freqs = np.fft.rfftfreq(8 * rate, 1 / rate)
        low_band = freqs < 1100
        assert freqs[low_band][np.argmax(power[low_band])] == pytest.approx(low, abs=2)
        assert freqs[~low_band][np.argmax(power[~low_band])] == pytest.approx(high, abs=2)
        near = (np.abs(freqs - low) < 60) | (np.abs(freqs - high) < 60)
        assert power[near].sum() > 0.99 * power.sum()
        found = digits_in(np.concatenate((silence(rate, 0.05), tone)), rate)
        assert [d.symbol for d in found] == [key], key
        # The tone lies at START + 50 ms .. + 120 ms; positions are good to one block.
        assert abs(found[0].start - (START + 0.05 * rate)) <= 0.013 * rate
        assert abs(found[0].end - (START + 0.12 * rate)) <= 0.013 * rate


@pytest.mark.parametrize("rate", RATES)
def test_every_key_from_the_exchange_whatever_the_chunks(rate: int) -> None:
    signal = exchange.dtmf(ALL_KEYS + "11", rate)
    results = {chunk: digits_in(signal, rate, chunk) for chunk in CHUNKS}
    assert "".join(d.symbol for d in results[160]) == ALL_KEYS + "11"
    assert results[32] == results[160] == results[4096]
    on = round(0.07 * rate)
    for index, digit in enumerate(results[160]):
        assert abs(digit.start - (START + 2 * on * index)) <= 0.013 * rate
        assert abs(digit.end - (START + 2 * on * index + on)) <= 0.013 * rate


@pytest.mark.parametrize("rate", RATES)
def test_tone_duration_limits(rate: int) -> None:
    assert symbols(exchange.dtmf("5" * 10, rate, on_ms=15, off_ms=60), rate) == ""
    assert symbols(exchange.dtmf("5" * 10, rate, on_ms=45, off_ms=60), rate) == "5" * 10


@pytest.mark.parametrize("rate", RATES)
def test_a_gap_separates_equal_digits(rate: int) -> None:
    assert symbols(exchange.dtmf("77", rate, on_ms=60, off_ms=40), rate) == "77"


@pytest.mark.parametrize("rate", RATES)
def test_twist_limits(rate: int) -> None:
    keys = "1D5*"
    # Normal twist (low group louder) up to 8 dB, reverse twist up to 4 dB.
    assert symbols(exchange.dtmf(keys, rate, twist_db=6.0), rate) == keys
    assert symbols(exchange.dtmf(keys, rate, twist_db=-3.0), rate) == keys
    assert symbols(exchange.dtmf(keys, rate, twist_db=10.0), rate) == ""
    assert symbols(exchange.dtmf(keys, rate, twist_db=-6.0), rate) == ""


@pytest.mark.parametrize("rate", RATES)
def test_frequency_tolerance(rate: int) -> None:
    for error in (0.01, -0.01):
        signal = np.concatenate([tone_pair(k, rate, frequency_error=error) for k in ALL_KEYS])
        assert symbols(signal, rate) == ALL_KEYS
    for error in (0.04, -0.04):
        signal = np.concatenate([tone_pair(k, rate, frequency_error=error) for k in ALL_KEYS])
        assert symbols(signal, rate) == ""


@pytest.mark.parametrize("rate", RATES)
def test_level_limit(rate: int) -> None:
    # The minimum is -30 dBm0 per tone, -33 dBFS.
    assert symbols(exchange.dtmf(ALL_KEYS, rate, level_dbfs=-31.0), rate) == ALL_KEYS
    assert symbols(exchange.dtmf(ALL_KEYS, rate, level_dbfs=-40.0), rate) == ""


@pytest.mark.parametrize("rate", RATES)
def test_digits_survive_noise(rate: int) -> None:
    signal = exchange.dtmf(ALL_KEYS, rate, level_dbfs=-20.0, twist_db=4.0)
    noise = np.random.default_rng(7).normal(0, 32767 * 10 ** (-40 / 20), len(signal))
    assert symbols(signal + noise, rate) == ALL_KEYS


@pytest.mark.parametrize("voice", ["en", "nl"])
@pytest.mark.parametrize("rate", RATES)
def test_no_digit_in_speech(speech: dict[tuple[str, int], np.ndarray], voice: str,
                            rate: int) -> None:
    for gain in (0.3, 1.0, 1.5):
        assert symbols(speech[voice, rate] * gain, rate) == ""


# ---- caller id ----------------------------------------------------------------------


def clip_of(signal: np.ndarray, rate: int) -> list[CallerId]:
    parser = DtmfClipParser(rate)
    return [c for d in digits_in(signal, rate) if (c := parser.feed(d)) is not None]


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("form", ["A", "D", "#"])
def test_dtmf_clip_forms(rate: int, form: str) -> None:
    signal = np.concatenate((silence(rate, 0.2), exchange.dtmf_clip("0201234567", rate,
                                                                      form=form)))
    found = clip_of(signal, rate)
    assert len(found) == 1
    assert found[0].number == "0201234567"
    assert (found[0].name, found[0].absence, found[0].source) == (None, None, "dtmf")
    # It ends with the last digit's tone; digits are 70 ms on and 70 ms off.
    keys = len("0201234567") + (1 if form == "#" else 2)
    end = START + rate * (0.2 + (keys - 1) * 0.14 + 0.07)
    assert abs(found[0].position - end) < 0.015 * rate


@pytest.mark.parametrize("rate", RATES)
def test_dtmf_clip_absence(rate: int) -> None:
    for form in ("private", "unavailable"):
        found = clip_of(exchange.dtmf_clip("", rate, form=form), rate)
        assert [(c.number, c.absence) for c in found] == [(None, form)]


def test_dtmf_clip_starts_over_after_a_pause() -> None:
    parser = DtmfClipParser(8000)
    second = 8000

    def feed(symbols: str, at: int) -> CallerId | None:
        result = None
        for index, symbol in enumerate(symbols):
            start = at + index * 1120
            result = parser.feed(Digit(symbol, start, start + 560))
        return result

    assert feed("A0612", 0) is None
    # 1.5 s later the rest arrives: what came before is not part of it.
    assert feed("345C", 6 * second) is None
    assert feed("A0612345678C", 10 * second) == CallerId("0612345678", None, None, "dtmf",
                                                         10 * second + 11 * 1120 + 560)
    assert feed("*A12C", 20 * second) == CallerId("12", None, None, "dtmf",
                                                  20 * second + 4 * 1120 + 560)


WHEN = datetime(2024, 3, 5, 14, 7)


def fsk_on_line(rate: int, *, number: str | None, name: str | None = None,
                when: datetime | None = None, absence: str | None = None,
                level_dbfs: float = -15.0, frequency_error: float = 0.0) -> np.ndarray:
    """A caller id burst between stretches of idle line."""
    burst = exchange.fsk_caller_id(rate, number=number, name=name, when=when, absence=absence,
                                   level_dbfs=level_dbfs, frequency_error=frequency_error)
    return np.concatenate((silence(rate, 0.3), burst, silence(rate, 0.3)))


@pytest.mark.parametrize("rate", RATES)
def test_fsk_number_name_and_date(rate: int) -> None:
    signal = fsk_on_line(rate, number="+31201234567", name="Jansen", when=WHEN)
    found = {chunk: caller_ids(signal, rate, chunk) for chunk in CHUNKS}
    assert found[32] == found[160] == found[4096]
    caller, = found[160]
    assert caller.number == "+31201234567"
    assert caller.name == "Jansen"
    assert caller.date_time == "03051407"
    assert (caller.absence, caller.source) == (None, "fsk")
    # The message ends 4 mark bits before the burst does.
    burst_end = START + len(signal) - round(0.3 * rate)
    assert abs(caller.position - (burst_end - 4 * rate / 1200)) <= 2


@pytest.mark.parametrize("rate", RATES)
def test_fsk_withheld_number(rate: int) -> None:
    caller, = caller_ids(fsk_on_line(rate, number=None, absence="P", when=WHEN), rate)
    assert (caller.number, caller.absence, caller.name) == (None, "private", None)
    caller, = caller_ids(fsk_on_line(rate, number=None, absence="unavailable"), rate)
    assert caller.absence == "unavailable"


@pytest.mark.parametrize("rate", RATES)
def test_fsk_levels_noise_frequency_error_and_no_dc(rate: int) -> None:
    rng = np.random.default_rng(rate)
    for level in (-40.0, -20.0, -5.0):
        for error in (-0.015, 0.015):
            signal = fsk_on_line(rate, number="0612345678", name="Pietersen", when=WHEN,
                                 level_dbfs=level, frequency_error=error)
            # White noise 20 dB below the carrier's power.
            sigma = 32767 * 10 ** (level / 20) / np.sqrt(2) * 10 ** (-20 / 20)
            signal = dc_free(signal + rng.normal(0, sigma, len(signal)), rate)
            found = caller_ids(signal, rate)
            assert [(c.number, c.name) for c in found] == [("0612345678", "Pietersen")], \
                (level, error)


@pytest.mark.parametrize("rate", RATES)
def test_fsk_bad_checksum_is_rejected(rate: int) -> None:
    message = bytearray(exchange.callerid_message(number="0612345678", when=WHEN))
    message[-1] ^= 0x01
    signal = np.concatenate((silence(rate, 0.3), exchange.v23_fsk(bytes(message), rate),
                             silence(rate, 0.3)))
    assert caller_ids(signal, rate) == []
    # The same message with its checksum intact does come through.
    message[-1] ^= 0x01
    good = np.concatenate((exchange.v23_fsk(bytes(message), rate), silence(rate, 0.1)))
    assert [c.number for c in caller_ids(good, rate)] == ["0612345678"]


def test_fsk_single_data_message_format() -> None:
    body = b"03051407" + b"0201234567"
    message = bytes([0x04, len(body)]) + body
    message += bytes([-sum(message) & 0xFF])
    burst = exchange.v23_fsk(message, 8000, mark_bits=80)
    caller, = caller_ids(np.concatenate((burst, silence(8000, 0.1))), 8000)
    assert (caller.number, caller.date_time) == ("0201234567", "03051407")


@pytest.mark.parametrize("voice", ["en", "nl"])
def test_no_caller_id_in_speech(speech: dict[tuple[str, int], np.ndarray], voice: str) -> None:
    assert caller_ids(speech[voice, 8000], 8000) == []


# ---- call progress ------------------------------------------------------------------

Observation = tuple[int, bool, int | None, int | None]


def progress_of(signal: np.ndarray, rate: int, chunk: int = 160
                ) -> tuple[CallProgress, list[Observation]]:
    """The detector after all of ``signal``, and after each chunk: (position fed up to,
    tone_active, speech_since(), busy_since())."""
    progress = CallProgress(rate)
    seen = []
    data = int16(signal)
    for offset in range(0, len(data), chunk):
        progress.feed(data[offset : offset + chunk], START + offset)
        seen.append((START + offset + chunk, progress.tone_active, progress.speech_since(),
                     progress.busy_since()))
    return progress, seen


@pytest.mark.parametrize("rate", RATES)
def test_ringback_bursts_are_counted(rate: int) -> None:
    progress, seen = progress_of(exchange.progress_tone("ringback", 12.0, rate), rate)
    assert progress.ringback_bursts == 3
    assert progress.last_tone_end is not None
    assert abs(progress.last_tone_end - (START + 11 * rate)) <= 0.07 * rate
    assert not progress.tone_active
    assert all(speech is None and busy is None for _, _, speech, busy in seen)
    assert any(active for _, active, _, _ in seen)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("kind", ["busy", "congestion"])
def test_busy_and_congestion_are_found(rate: int, kind: str) -> None:
    quiet = silence(rate, 1.0)
    for frequency in (425.0, 450.0):
        tone = exchange.progress_tone(kind, 4.0, rate, frequency=frequency)
        progress, seen = progress_of(np.concatenate((quiet, tone, quiet, quiet)), rate)
        busy = [(at, since) for at, _, _, since in seen if since is not None]
        on = exchange.PROGRESS_CADENCES[kind][0]
        # Found once the third burst has begun, from the first burst's start ...
        assert busy[0][0] - START <= (1.0 + 4 * on + 0.1) * rate
        assert all(abs(since - (START + rate)) <= 0.07 * rate for _, since in busy)
        # ... and until a second after the tone stopped.
        tone_end = START + len(quiet) + int(np.flatnonzero(tone)[-1])
        assert abs(busy[-1][0] - (tone_end + rate)) <= 0.1 * rate
        assert progress.ringback_bursts == 0
        assert progress.busy_since() is None


@pytest.mark.parametrize("rate", RATES)
def test_ringback_and_dial_tone_are_not_busy(rate: int) -> None:
    for kind in ("ringback", "dial"):
        progress, seen = progress_of(exchange.progress_tone(kind, 8.0, rate), rate)
        assert all(busy is None for _, _, _, busy in seen), kind
    assert progress.tone_active


@pytest.mark.parametrize("rate", RATES)
def test_answer_shows_as_speech_after_ringback(speech: dict[tuple[str, int], np.ndarray],
                                               rate: int) -> None:
    ringback = exchange.progress_tone("ringback", 7.0, rate)
    voice = speech["nl", rate]
    results = {}
    for chunk in CHUNKS:
        progress, seen = progress_of(np.concatenate((ringback, voice)), rate, chunk)
        answered = [(at, since) for at, _, since, _ in seen if since is not None]
        results[chunk] = answered[0][1], progress.ringback_bursts
    assert results[32] == results[160] == results[4096]
    first_speech = START + len(ringback) + int(np.flatnonzero(np.abs(voice) > 300)[0])
    since, bursts = results[160]
    assert bursts == 2
    assert abs(since - first_speech) <= 0.1 * rate


@pytest.mark.parametrize("rate", RATES)
def test_speech_is_found_in_speech_alone(speech: dict[tuple[str, int], np.ndarray],
                                         rate: int) -> None:
    for voice in ("en", "nl"):
        _, seen = progress_of(speech[voice, rate], rate)
        assert not any(active for _, active, _, _ in seen)
        assert any(since is not None for _, _, since, _ in seen)


@pytest.mark.parametrize("rate", RATES)
def test_dtmf_is_not_speech(rate: int) -> None:
    signals: list[Callable[[], np.ndarray]] = [
        lambda: exchange.dtmf(ALL_KEYS * 2, rate, on_ms=40, off_ms=40),
        lambda: exchange.dtmf(ALL_KEYS * 2, rate, on_ms=70, off_ms=70),
        lambda: exchange.dtmf(ALL_KEYS, rate, on_ms=150, off_ms=20, twist_db=5.0),
        lambda: exchange.dtmf_clip("0612345678", rate),
    ]
    for make in signals:
        _, seen = progress_of(make(), rate)
        assert all(since is None for _, _, since, _ in seen)
