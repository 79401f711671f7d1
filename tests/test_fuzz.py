"""Bad input, fuzzed: the line signal decoders, Ogg pages and Opus files, recovery of cut-off
recordings, scenario files, MQTT command payloads, call ids that try to leave the storage, and
a damaged MQTT outbox. Whatever comes in: a clean result or the module's own documented
error, never a crash, and nothing changed that should not be.

Bounded (``max_examples``) and derandomized: the same examples on every run, so that CI and a
developer see the same thing. tests/atheris_ogg.py fuzzes the Ogg page reader by hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import struct
import tempfile
import wave
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from simhelpers import linerec, sim_config
from test_archive import store_call

from linerec.audio.callerid import (
    ABSENCE_REASONS,
    DTMF_ABSENCE_CODES,
    MAX_DTMF_DIGITS,
    DtmfClipParser,
    FskCallerIdDecoder,
)
from linerec.audio.dtmf import RATES, Digit, DtmfDetector
from linerec.audio.ogg import (
    HEADER_EOS,
    OggOpusWriter,
    RepairedStream,
    RepairError,
    build_page,
    ogg_packets,
    read_pages,
    repair_stream,
)
from linerec.audio.opus import decode_ogg_opus
from linerec.audio.pcm import AudioFileError, read_audio
from linerec.audio.recording import PART_SUFFIX, RecordingFile
from linerec.daemon import archive
from linerec.daemon.commands import CommandHandler, Configurator
from linerec.daemon.config import load_config
from linerec.daemon.events import EventBus
from linerec.daemon.outbox import ACKED_NAME, OUTBOX_NAME, Outbox
from linerec.daemon.paths import CALL_ID_PATTERN, call_folder, new_call_id, receipt_path
from linerec.daemon.receipt import write_receipt
from linerec.daemon.recovery import UNREADABLE_SUFFIX, recover_interrupted
from linerec.hw import exchange
from linerec.hw.scenario import STEP_KEYS, ScenarioError, load_scenario

ROOT = Path(__file__).resolve().parent.parent
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
"""Bounded and the same on every run: CI sees the examples a developer saw."""


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


RARELY = st.integers(0, 30).map(lambda n: n == 17)
"""True one time in thirty or so (not 0: Hypothesis draws the ends of a range often)."""


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten or so (Hypothesis draws each branch of ``a | b`` alike, and
    ``bad`` has many): most of an input is plausible, so that the checks after the first
    are reached too."""
    return st.integers(0, 30).flatmap(lambda n: bad if n == 0 else good)


KEYS = "0123456789*#ABCD"
LINES = ("line1", "line2")


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Any]:
    """A fresh folder per hypothesis example (the function's tmp_path is shared by all)."""
    def folder() -> Path:
        return Path(tempfile.mkdtemp(dir=tmp_path))

    yield folder


# ---------------------------------------------------------------------------------------
# Line signals: DTMF and FSK decoders, DTMF CLIP parser


@st.composite
def fsk_message(draw: st.DrawFn) -> bytes:
    """A caller id message with a right checksum: parameters of any kind and content, their
    lengths mostly right."""
    body = b""
    for _ in range(draw(st.integers(0, 4))):
        value = draw(st.binary(max_size=24) | st.text("0123456789+ ", max_size=12).map(
            str.encode))
        size = draw(mostly(st.just(len(value)), st.integers(0, 255)))
        body += bytes([draw(mostly(st.sampled_from([2, 7, 1, 4, 8]), st.integers(0, 255))),
                       size])
        body += value
    message = bytes([draw(mostly(st.sampled_from([0x80, 0x04]), st.integers(0, 255))),
                     len(body)])
    message += body
    return message + bytes([-sum(message) & 0xFF])


@st.composite
def line_audio(draw: st.DrawFn, rate: int) -> np.ndarray:
    """What a line may carry: noise, silence, steady tones, DTMF and FSK caller id bursts
    (with random message bytes), at any level, one after another, clipped to int16."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["bytes", "silence", "tone", "dtmf", "fsk"]))
        if kind == "bytes":
            raw = draw(st.binary(max_size=4000))
            parts.append(np.frombuffer(raw[: len(raw) // 2 * 2], "<i2").astype(np.float64))
        elif kind == "silence":
            parts.append(np.zeros(draw(st.integers(0, 2000))))
        elif kind == "tone":
            hz = draw(st.floats(50, rate / 2 - 1))
            n = draw(st.integers(1, 2000))
            parts.append(20000 * np.sin(2 * np.pi * hz * np.arange(n) / rate))
        elif kind == "dtmf":
            digits = draw(st.text(KEYS, min_size=1, max_size=6))
            parts.append(exchange.dtmf(digits, rate, on_ms=draw(st.integers(10, 120)),
                                       off_ms=draw(st.integers(10, 120)),
                                       level_dbfs=draw(st.floats(-45, 0)),
                                       twist_db=draw(st.floats(-10, 10))).astype(np.float64))
        else:
            parts.append(exchange.v23_fsk(draw(fsk_message()), rate,
                                          level_dbfs=draw(st.floats(-45, 0)),
                                          mark_bits=draw(st.integers(20, 200) | st.integers(0, 19))
                                          ).astype(np.float64))
    signal = np.concatenate(parts) * draw(st.sampled_from([1.0, 1.0, 0.1, 3.0]))
    noise = draw(st.sampled_from([0, 0, 30, 300, 3000]))
    if noise:
        signal += np.random.default_rng(len(signal)).normal(0, noise, len(signal))
    return np.clip(np.round(signal), -32768, 32767).astype(np.int16)


@st.composite
def fed_in_chunks(draw: st.DrawFn) -> tuple[int, np.ndarray, int, list[int]]:
    """(rate, audio, first position, cut points)."""
    rate = draw(st.sampled_from(RATES))
    audio = draw(line_audio(rate))
    cuts = sorted(draw(st.lists(st.integers(0, len(audio)), max_size=12)))
    return rate, audio, draw(st.integers(-(1 << 40), 1 << 40)), cuts


def feed(decoder: Any, audio: np.ndarray, position: int, cuts: list[int]) -> list[Any]:
    found: list[Any] = []
    for chunk in np.split(audio, cuts):
        found += decoder.feed(chunk, position)
        position += len(chunk)
    return found


@fuzz(120)
@given(fed_in_chunks())
def test_dtmf_detector_takes_any_audio_in_any_chunks(case: tuple[int, np.ndarray, int, list[int]]
                                                     ) -> None:
    rate, audio, position, cuts = case
    digits = feed(DtmfDetector(rate), audio, position, cuts)
    event(f"digits found: {min(len(digits), 3)}{'+' if len(digits) > 3 else ''}")
    for digit in digits:
        assert digit.symbol in KEYS and len(digit.symbol) == 1
        assert position <= digit.start < digit.end <= position + len(audio)
    assert [d.start for d in digits] == sorted(d.start for d in digits)
    # Streaming: how the audio was cut into periods changes nothing.
    assert feed(DtmfDetector(rate), audio, position, []) == digits


@fuzz(120)
@given(fed_in_chunks())
def test_fsk_decoder_takes_any_audio_and_gives_printable_caller_ids(
        case: tuple[int, np.ndarray, int, list[int]]) -> None:
    rate, audio, position, cuts = case
    found = feed(FskCallerIdDecoder(rate), audio, position, cuts)
    event(f"caller ids found: {len(found)}")
    for caller in found:
        assert caller.source == "fsk"
        for text in (caller.number, caller.name, caller.date_time):
            assert text is None or (text and text.isprintable()), caller
        assert caller.absence in (None, *ABSENCE_REASONS.values())
        assert position <= caller.position <= position + len(audio) + rate
    assert feed(FskCallerIdDecoder(rate), audio, position, []) == found


@fuzz(150)
@given(rate=st.sampled_from(RATES), jumps=st.lists(
    st.tuples(st.binary(min_size=0, max_size=600), st.integers(-(1 << 33), 1 << 33)),
    max_size=8))
def test_decoders_take_capture_gaps_anywhere(rate: int, jumps: list[tuple[bytes, int]]) -> None:
    """Positions that jump (a capture gap), go back or repeat: reset, never raise."""
    dtmf, fsk = DtmfDetector(rate), FskCallerIdDecoder(rate)
    for raw, position in jumps:
        samples = np.frombuffer(raw[: len(raw) // 2 * 2], "<i2")
        for digit in dtmf.feed(samples, position):
            assert digit.symbol in KEYS and digit.start < digit.end
        for caller in fsk.feed(samples, position):
            assert caller.number is None or caller.number.isprintable()


@fuzz(100)
@given(rate=st.sampled_from(RATES), message=fsk_message(), noise=st.sampled_from([0, 100, 1000]),
       cut=st.integers(0, 400))
def test_fsk_messages_of_any_content_give_well_formed_caller_ids(
        rate: int, message: bytes, noise: int, cut: int) -> None:
    """Messages with a right checksum and anything in them (any parameter, any bytes, lengths
    that do not add up), on a line with some noise, cut short or not."""
    burst = np.concatenate((np.zeros(rate // 10), exchange.v23_fsk(message, rate),
                            np.zeros(rate // 10)))
    burst = burst[: len(burst) - cut * rate // 1000]
    burst += np.random.default_rng(cut).normal(0, noise, len(burst)) if noise else 0
    found = FskCallerIdDecoder(rate).feed(burst.astype(np.int16), 0)
    event(f"caller ids found: {len(found)}")
    for caller in found:
        for text in (caller.number, caller.name, caller.date_time):
            assert text is None or (text and text.isprintable()), caller
        assert caller.absence in (None, *ABSENCE_REASONS.values())


def test_fsk_caller_id_at_negative_positions() -> None:
    """Found here: the decoder took a start bit at a negative position for its 'message
    given up' signal (-1) and looped for ever on it. The daemon's positions start at 0, so
    it could not hang there; a position is any int all the same."""
    burst = np.concatenate((np.zeros(800), exchange.fsk_caller_id(8000, number="0201234567"),
                            np.zeros(800))).astype(np.int16)
    (caller,) = FskCallerIdDecoder(8000).feed(burst, -len(burst))
    assert caller.number == "0201234567" and caller.position < 0


def test_decoders_refuse_rates_they_do_not_know() -> None:
    for rate in (0, -8000, 11025, 44100):
        for make in (DtmfDetector, FskCallerIdDecoder, DtmfClipParser):
            with pytest.raises(ValueError, match="sample rate"):
                make(rate)


@fuzz(300)
@given(rate=st.sampled_from(RATES), digits=st.lists(st.tuples(
    st.sampled_from(KEYS), st.integers(-(1 << 40), 1 << 40), st.integers(-100, 20000)),
    max_size=40))
def test_dtmf_clip_parser_takes_any_digits(rate: int, digits: list[tuple[str, int, int]]
                                           ) -> None:
    """Any order, any timing (overlapping, backwards): caller ids of digits only."""
    parser = DtmfClipParser(rate)
    for symbol, start, length in digits:
        caller = parser.feed(Digit(symbol, start, start + length))
        if caller is None:
            continue
        assert caller.source == "dtmf" and caller.name is None
        if caller.number is None:
            assert caller.absence in DTMF_ABSENCE_CODES.values()
        else:
            assert caller.number.isdigit() and len(caller.number) <= MAX_DTMF_DIGITS
            assert caller.absence is None


def test_an_fsk_number_with_control_characters_comes_out_printable() -> None:
    """Found here: a message with a right checksum whose number held ESC [ 2 J went into
    receipts, Ogg tags and the log as it was."""
    body = bytes([0x02, 7]) + b"\x1b[2J020" + bytes([0x07, 4]) + b"Jo\x00n"
    message = bytes([0x80, len(body)]) + body
    message += bytes([-sum(message) & 0xFF])
    burst = np.concatenate((np.zeros(800), exchange.v23_fsk(message, 8000), np.zeros(800)))
    (caller,) = FskCallerIdDecoder(8000).feed(burst.astype(np.int16), 0)
    assert (caller.number, caller.name) == ("[2J020", "Jon")


# ---------------------------------------------------------------------------------------
# Ogg pages, Opus files, the muxer's inputs


def make_recording(path: Path, seconds: float, page_interval_s: float = 0.2) -> bytes:
    """A real recording's bytes, as the daemon writes them (a 300 Hz tone)."""
    recording = RecordingFile(path, rate=8000, bitrate=12000, complexity=5,
                              page_interval_s=page_interval_s, fsync_interval_s=1.0,
                              vendor="linerec test", tags={"LINE": "line1", "CALL_ID": "x"})
    t = np.arange(round(seconds * 8000)) / 8000
    recording.write((6000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16))
    recording.close()
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_recording(tmp_path_factory.mktemp("ogg") / "call.opus", 1.0)


def mangled(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` cut short, with bits flipped and bytes changed."""
    out = bytearray(data[: draw(st.integers(0, len(data)), label="cut")])
    for _ in range(draw(st.integers(0, 3), label="flips")):
        if out:
            at = draw(st.integers(0, len(out) - 1), label="at")
            out[at] ^= 1 << draw(st.integers(0, 7), label="bit")
    return bytes(out)


def restructured(draw: st.DrawFn, data: bytes) -> bytes:
    """``data``'s pages with their packets and header fields changed and their CRCs made
    right again: what a CRC check lets through."""
    pages = read_pages(data)
    out = b""
    for index, page in enumerate(pages):
        packets = list(page.packets)
        if draw(st.booleans(), label="change this page"):
            which = draw(st.integers(0, max(0, len(packets) - 1)), label="packet")
            if packets:
                packet = bytearray(packets[which])
                cut = draw(st.integers(0, len(packet)), label="cut packet")
                packet = packet[:cut] + draw(st.binary(max_size=8), label="tail")
                packets[which] = bytes(packet)
            granule = draw(st.sampled_from([page.granule, 0, -1, 1 << 62, page.granule * 3]),
                           label="granule")
            kind = draw(st.sampled_from([page.header_type, 0, 1, 2, 4, 7]), label="type")
        else:
            granule, kind = page.granule, page.header_type
        out += build_page(packets, granule=granule, serial=1, sequence=index, header_type=kind)
    return out


def check_pages(data: bytes) -> None:
    """The pages read are laid end to end from the start, and their packets fit in them."""
    offset = 0
    for page in read_pages(data):
        assert page.offset == offset and page.length >= 27
        offset += page.length
    assert offset <= len(data)
    packets, _ = ogg_packets(data)
    assert sum(map(len, packets)) <= len(data)


@fuzz(150)
@given(data=st.data())
def test_ogg_page_reader_takes_any_bytes(recording: bytes, data: st.DataObject) -> None:
    blob = data.draw(st.binary(max_size=300) | st.builds(
        lambda a, b: a + b, st.just(b"OggS"), st.binary(max_size=300)))
    for candidate in (blob, mangled(data.draw, recording), recording[:27] + blob):
        check_pages(candidate)


def test_every_cut_of_a_recording_is_repaired_or_refused(recording: bytes,
                                                         tmp_path: Path) -> None:
    """A recording cut at every byte offset: made playable up to its last whole page,
    reported empty when no audio page is whole, or refused; never anything else."""
    path = tmp_path / "cut.opus.part"
    whole = read_pages(recording)
    for cut in range(len(recording) + 1):
        path.write_bytes(recording[:cut])
        kept = [p for p in whole if p.offset + p.length <= cut]
        try:
            stream = repair_stream(path)
        except RepairError:
            assert len(kept) < 2, cut  # the headers are not whole
            assert path.read_bytes() == recording[:cut]
            continue
        if stream.empty:
            assert len(kept) <= 2
            continue
        pages = read_pages(path.read_bytes())
        assert [p.granule for p in pages] == [p.granule for p in kept], cut
        assert pages[-1].header_type & HEADER_EOS and stream.bytes == path.stat().st_size


@fuzz(150)
@given(data=st.data())
def test_damaged_recordings_are_repaired_or_refused_and_decoded_or_refused(
        recording: bytes, scratch: Any, data: st.DataObject) -> None:
    """Cut, bit flips, and changes that keep the CRCs right: repair_stream gives a stream or
    a RepairError (the file then untouched); decode_ogg_opus gives samples or a
    ValueError; read_audio gives audio or an AudioFileError."""
    blob = data.draw(st.sampled_from(["mangled", "restructured"]))
    candidate = mangled(data.draw, recording) if blob == "mangled" else \
        restructured(data.draw, recording)
    path = scratch() / "call.opus.part"
    path.write_bytes(candidate)
    try:
        stream = repair_stream(path)
    except RepairError:
        event(f"{blob}: refused")
        assert path.read_bytes() == candidate
    else:
        event(f"{blob}: {'empty' if stream.empty else 'repaired'}")
        assert isinstance(stream, RepairedStream) and stream.duration_s >= 0
        if not stream.empty:
            assert read_pages(path.read_bytes())[-1].header_type & HEADER_EOS
    for rate in (8000, 48000):
        try:
            samples = decode_ogg_opus(candidate, rate)
        except ValueError:
            continue
        assert samples.dtype == np.int16
    with contextlib.suppress(AudioFileError):
        read_audio(path, candidate)


@fuzz(200)
@given(data=st.data(), channels=st.integers(1, 3), width=st.integers(1, 4))
def test_damaged_wav_files_are_an_audio_file_error(data: st.DataObject, channels: int,
                                                   width: int) -> None:
    """A disclosure or scenario WAV cut short, or with its header's bytes changed: audio,
    or an AudioFileError naming the file. Found here: a chunk size pointing past the end
    was a RuntimeError from the wave module, a data chunk cut inside a frame a ValueError
    from numpy; both came out of load_config and load_scenario."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(8000)
        wav.writeframes(bytes(range(256)) * 3)
    blob = bytearray(out.getvalue()[: data.draw(st.integers(0, len(out.getvalue())))])
    for _ in range(data.draw(st.integers(0, 3))):
        if blob:
            blob[data.draw(st.integers(0, min(len(blob), 48) - 1))] = data.draw(
                st.integers(0, 255))
    try:
        samples, rate = read_audio(Path("disclosure.wav"), bytes(blob))
    except AudioFileError as exc:
        assert str(exc).startswith("disclosure.wav: ")
    else:
        assert len(samples) and rate > 0 and np.isfinite(samples).all()


def test_a_stream_damaged_before_whole_pages_is_kept_not_cut(recording: bytes,
                                                             tmp_path: Path) -> None:
    """Found here: a damaged page in the middle cut the recording back to it, and every
    whole page after it was thrown away (a damaged first page removed the whole file as
    'empty'). Now it is refused and the file left as it is."""
    pages = read_pages(recording)
    for page in (pages[0], pages[3]):
        damaged = bytearray(recording)
        damaged[page.offset + page.length - 1] ^= 0xFF
        path = tmp_path / "damaged.opus.part"
        path.write_bytes(damaged)
        with pytest.raises(RepairError, match="whole pages after it"):
            repair_stream(path)
        assert path.read_bytes() == damaged


def test_headers_too_short_are_a_repair_error(tmp_path: Path) -> None:
    """Found here: a short OpusHead, or an OpusTags whose lengths point past its end, were
    a struct.error out of repair_stream, which start-up recovery does not catch."""
    audio = build_page([b"\xf8\xff\xfe"], granule=960, serial=1, sequence=2)
    for head, tags in ((b"OpusHead\x01\x01", b"OpusTags" + bytes(8)),
                       (b"OpusHead" + bytes(11), b"OpusTags\xff\xff\xff\xff"),
                       (b"OpusHead" + bytes(11), b"OpusTags" + struct.pack("<III", 0, 1, 99))):
        path = tmp_path / "short.opus.part"
        path.write_bytes(build_page([head], granule=0, serial=1, sequence=0, header_type=2)
                         + build_page([tags], granule=0, serial=1, sequence=1) + audio)
        with pytest.raises(RepairError):
            repair_stream(path)


@fuzz(150)
@given(packets=st.lists(st.tuples(st.binary(max_size=1300), st.integers(1, 960)), max_size=30),
       per_page=st.integers(1, 60), rate=st.sampled_from([8000, 16000, 48000]),
       pre_skip=st.integers(0, 4000), end=st.floats(0, 1.2),
       tags=st.dictionaries(st.text(max_size=8), st.text(max_size=30), max_size=3))
def test_the_muxer_writes_readable_pages_for_any_packets(
        packets: list[tuple[bytes, int]], per_page: int, rate: int, pre_skip: int,
        end: float, tags: dict[str, str], scratch: Any) -> None:
    """Whatever the packets (empty, larger than a lacing run) and wherever the stream is
    ended: whole CRC-checked pages whose last one trims to the end, or a ValueError from
    finish when the end lies outside what was encoded or kept."""
    path = scratch() / "mux.opus"
    with path.open("w+b") as out:
        writer = OggOpusWriter(out, input_rate=rate, pre_skip=pre_skip, vendor="fuzz",
                               tags=tags, serial=7, packets_per_page=per_page)
        for packet, samples in packets:
            writer.add_packet(packet, samples)
        total = round(sum(s for _, s in packets) * end)
        try:
            writer.finish(total)
        except ValueError:
            finished = False
        else:
            finished = True
    data = path.read_bytes()
    pages = read_pages(data)
    assert sum(p.length for p in pages) == len(data)
    assert [p.sequence for p in pages] == list(range(len(pages)))
    if finished:
        assert pages[-1].header_type & HEADER_EOS
        assert pages[-1].granule == pre_skip + total * (48000 // rate)


# ---------------------------------------------------------------------------------------
# Start-up recovery of a cut-off or damaged recording: reported, kept, never a crash


class Collect:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)


STARTED = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@fuzz(40)
@given(data=st.data())
def test_recovery_of_any_damaged_part_is_reported_and_loses_nothing(
        recording: bytes, scratch: Any, data: st.DataObject) -> None:
    storage = scratch()
    call_id = new_call_id("line1", STARTED)
    folder = call_folder(storage, STARTED)
    folder.mkdir(parents=True)
    blob = data.draw(st.sampled_from(["mangled", "restructured"]))
    part_bytes = mangled(data.draw, recording) if blob == "mangled" else \
        restructured(data.draw, recording)
    part = folder / f"{call_id}.opus{PART_SUFFIX}"
    part.write_bytes(part_bytes)
    write_receipt(folder / f"{call_id}.json", {
        "call_id": call_id, "state": "open", "line": "line1",
        "recording": {"file": f"{call_id}.opus", "status": "recording", "first_sample": 0}})
    collect = Collect()
    assert recover_interrupted(storage, EventBus([collect])) == 1
    (published,) = collect.events
    event(f"{blob}: {published['event']}")
    receipt = json.loads((folder / f"{call_id}.json").read_text())
    assert receipt["state"] == "interrupted" and not part.exists()
    kept = folder / f"{call_id}.opus{PART_SUFFIX}{UNREADABLE_SUFFIX}"
    final = folder / f"{call_id}.opus"
    if published["event"] == "error":
        assert kept.read_bytes() == part_bytes  # every byte kept for a person to look at
        assert receipt["recording"]["status"] == "unrecoverable"
    else:
        assert published["event"] == "recording_recovered"
        if receipt["recording"]["file"] is None:  # only headers: nothing to keep
            assert len([p for p in read_pages(part_bytes)
                        if p.granule > 0 and p.offset > 0]) <= 1
        else:
            pages = read_pages(final.read_bytes())
            assert pages[-1].header_type & HEADER_EOS
            assert part_bytes.startswith(final.read_bytes()[: pages[-1].offset])


def test_a_truncated_finished_recording_is_reported_by_verify(tmp_path: Path) -> None:
    """A finished .opus cut in half: verify names it; the command says so and exits 1."""
    storage = tmp_path / "recordings"
    receipt = store_call(storage, seconds=1.0)
    opus = receipt.with_suffix(".opus")
    opus.write_bytes(opus.read_bytes()[: opus.stat().st_size // 2])
    (found,) = archive.verify(storage).breaks
    assert found.where == opus and "differs" in found.problem
    result = linerec("verify", str(storage))
    assert result.returncode == 1 and str(opus) in result.stdout
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------
# Scenario files

SCENARIO_VALUES = (st.integers(-5, 100_000) | st.floats(allow_nan=True, allow_infinity=True)
                   | st.booleans() | st.text(max_size=30)
                   | st.sampled_from(["line1", "0201234567", "busy", "fsk", "A", "private",
                                      "\x00", "1" * 300, "../speech.wav", "12*#"])
                   | st.lists(st.integers(), max_size=3) | st.just({"a": 1}))
"""Any TOML value."""
PARAM_KEYS = sorted({key for keys in STEP_KEYS.values() for key in keys})
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "until": st.floats(0, 40), "file": st.sampled_from(["speech.wav", "junk.wav", "nope.wav"]),
    "gain_db": st.floats(-130, 60), "number": st.sampled_from(["0201234567", "+31201234567",
                                                               "", "12a", "1" * 21]),
    "name": st.text(max_size=60), "format": st.sampled_from(["dtmf", "fsk", "v23"]),
    "form": st.sampled_from(["A", "D", "#", "B"]),
    "absence": st.sampled_from(["private", "unavailable", "P"]),
    "digits": st.text(KEYS, max_size=12), "on_ms": st.integers(0, 1200),
    "off_ms": st.integers(0, 1200), "kind": st.sampled_from(["dial", "busy", "ringback",
                                                             "congestion", "howler"]),
    "frequency": st.floats(0, 5000), "ms": st.integers(0, 3000),
    "frames": st.integers(-1, 500_000), "seconds": st.floats(-1, 70),
    "input": st.sampled_from(["hook", "ring", "polarity"]), "seed": st.integers(-1, 2**33),
    "glitch_ms": st.floats(0, 1200), "gap_ms": st.floats(0, 70_000),
    "bounce_ms": st.floats(0, 120),
}


@st.composite
def scenario_documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = {"duration": draw(mostly(st.floats(5, 30), SCENARIO_VALUES))}
    steps = []
    for _ in range(draw(st.integers(0, 5))):
        do = draw(mostly(st.sampled_from(list(STEP_KEYS)), SCENARIO_VALUES))
        step: dict[str, Any] = {"do": do, "at": draw(mostly(st.floats(0, 12), SCENARIO_VALUES)),
                                "line": draw(mostly(st.sampled_from(LINES), SCENARIO_VALUES))}
        allowed = STEP_KEYS.get(do, {}) if isinstance(do, str) else {}
        for key, required in allowed.items():
            if required or draw(st.booleans()):
                step[key] = draw(mostly(PLAUSIBLE[key], SCENARIO_VALUES))
        for key in ("do", "at", "line"):
            if draw(RARELY):
                del step[key]
        if draw(RARELY):
            step[draw(st.sampled_from([*PARAM_KEYS, "colour"]))] = draw(SCENARIO_VALUES)
        steps.append(step)
    document["step"] = steps
    if draw(RARELY):
        document["step"] = draw(SCENARIO_VALUES)
    if draw(RARELY):
        document["colour"] = 1
    return document


def check_scenario(path: Path) -> None:
    """Load it; a scenario that loads must also play: its GPIO changes and the far end's
    audio come out on both rates without an error, or with a ScenarioError."""
    try:
        scenario = load_scenario(path, LINES)
    except ScenarioError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and message.count("\n") == 0, message
        event("ScenarioError: " + re.sub(r"\[\d+\]", "[i]", message.split(": ")[1]))
        return
    event("loaded")
    for rate in RATES:
        scenario.gpio_changes(rate)
        for line in LINES:
            try:
                scenario.far_end_sources(line, rate)
            except ScenarioError as exc:
                assert str(exc).startswith(f"{path}: step[")


@pytest.fixture
def scenario_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "scenario"
    folder.mkdir()
    speech = exchange.dtmf("1", 8000, on_ms=50, off_ms=10)
    with wave.open(str(folder / "speech.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(speech.astype("<i2").tobytes())
    (folder / "junk.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt ")
    return folder


@fuzz(200)
@given(document=scenario_documents())
def test_any_scenario_document_loads_and_plays_or_is_a_scenario_error(
        scenario_folder: Path, document: dict[str, Any]) -> None:
    path = scenario_folder / "scenario.toml"
    path.write_text(tomli_w.dumps(document))
    check_scenario(path)


SCENARIO = """duration = 20.0
[[step]]
at = 0.5
line = "line1"
do = "callerid"
number = "0201234567"
format = "fsk"
name = "Jansen"
[[step]]
at = 1.0
line = "line1"
do = "ring"
until = 6.0
[[step]]
at = 6.5
line = "line1"
do = "offhook"
[[step]]
at = 7.0
line = "line1"
do = "audio"
file = "speech.wav"
gain_db = -6.0
[[step]]
at = 1.0
line = "line2"
do = "offhook"
[[step]]
at = 1.5
line = "line2"
do = "dtmf"
digits = "0612345678"
on_ms = 70
[[step]]
at = 3.0
line = "line2"
do = "tone"
kind = "ringback"
until = 8.0
[[step]]
at = 9.0
line = "line2"
do = "pulse"
digits = "12"
[[step]]
at = 12.0
line = "line2"
do = "flash"
ms = 100
[[step]]
at = 15.0
line = "line1"
do = "onhook"
"""
"""Every kind of step with a signal, valid in ``scenario_folder``."""


@fuzz(100)
@given(data=st.data())
def test_mangled_scenario_text_is_a_scenario_error_or_a_scenario(
        scenario_folder: Path, data: st.DataObject) -> None:
    text = bytearray(SCENARIO.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        text[at : at + data.draw(st.integers(0, 4))] = data.draw(mostly(
            st.text(" 0123456789.-+=[]\"\nabcdefghijklmnopqrstuvwxyz", max_size=3).map(
                str.encode), st.binary(max_size=3)
            | st.sampled_from([b"nan", b"inf", b"\xff", b"[[step]]\n"])))
    path = scenario_folder / "scenario.toml"
    path.write_bytes(bytes(text))
    check_scenario(path)


SCENARIO_CRASHES = [
    # Found here; each was another exception (at load or when played) before.
    ('do = ["ring"]', "step[0].do"),                          # unhashable: TypeError
    ('do = "tone"\nkind = "busy"\nuntil = inf', "step[0].until"),   # OverflowError
    ('do = "tone"\nkind = "busy"\nuntil = 1e12', "step[0].until"),  # MemoryError
    ('do = "audio"\nfile = "speech.wav"\ngain_db = nan', "step[0].gain_db"),
    ('do = "callerid"\nformat = "fsk"\nnumber = ""', "step[0].number"),       # ValueError
    ('do = "callerid"\nformat = "fsk"\nnumber = "' + "1" * 300 + '"', "step[0].number"),
    ('do = "dtmf"\ndigits = "' + "1" * 100_000 + '"', "step[0].digits"),
]


@pytest.mark.parametrize(("step", "key"), SCENARIO_CRASHES)
def test_scenario_crashes_found_by_fuzzing_are_scenario_errors(
        scenario_folder: Path, step: str, key: str) -> None:
    path = scenario_folder / "scenario.toml"
    path.write_text(f'duration = 10\n[[step]]\nat = 1\nline = "line1"\n{step}\n')
    with pytest.raises(ScenarioError, match="^" + re.escape(f"{path}: {key}: ")):
        load_scenario(path, LINES)


def test_a_scenario_nested_too_deeply_is_a_scenario_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("duration = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ScenarioError, match="nested too deeply"):
        load_scenario(path, LINES)


# ---------------------------------------------------------------------------------------
# Call ids from outside: path traversal and lookalikes


def lookalikes(call_id: str) -> list[str]:
    """A real call id changed into ids that name no call, or try to leave the storage."""
    stamp, line, tail = call_id[:16], call_id[17:-7], call_id[-6:]
    cyrillic = line.replace("e", "\u0435")
    return [
        "", ".", "..", "../../../../etc/passwd", "/etc/passwd", f"../{call_id}",
        f"{call_id}/../../x", f"/{call_id}", f"{call_id}\0", f"{call_id}\n", f" {call_id}",
        f"{call_id}.json", f"{call_id}*", "*", "?", "[a-z]*", "~", "$HOME", "%2e%2e%2f",
        call_id.upper(), call_id.replace("-", "\u2010"), call_id.replace("2", "\uff12"),
        call_id.replace("1", "\u0661"), f"{stamp}-{cyrillic}-{tail}",
        f"{stamp}-..-{tail}", f"{stamp}-{line}/..-{tail}", f"{stamp}-{line}-{tail}0",
        f"{stamp[:8]}T{stamp[9:15]}Z-{'x' * 33}-{tail}", call_id * 300, "1" * 10_000,
        "20261399T256199Z-line1-abcdef",   # the form, but no such time: was a ValueError
        "20260229T120000Z-line1-abcdef",   # no such day in 2026
        new_call_id("line9", STARTED),     # well formed, no such call
    ]


def call_ids(call_id: str) -> st.SearchStrategy[str]:
    """Ids of the right form (most name no time, none a call) and the lookalikes."""
    return st.from_regex(CALL_ID_PATTERN, fullmatch=True) | st.sampled_from(lookalikes(call_id))


@pytest.fixture
def archive_storage(tmp_path: Path) -> tuple[Path, str]:
    """A storage with one call on hold and one not, a file beside the storage, and one
    folder up: nothing outside the storage may change."""
    storage = tmp_path / "recordings"
    held = store_call(storage, STARTED).stem
    free = store_call(storage, STARTED).stem
    archive.hold_calls(storage, [held], "T-1")
    (tmp_path / "outside.txt").write_text("not the storage's")
    (storage.parent / "passwd").write_text("root:x:0:0")
    return storage, free


def attempts(storage: Path, call_id: str) -> dict[str, Any]:
    return {
        "resolve": lambda ids: archive.resolve_calls(storage, ids),
        "hold": lambda ids: archive.hold_calls(storage, ids, "T-2"),
        "release": lambda ids: archive.release_calls(storage, ids, "T-3"),
        "delete": lambda ids: archive.delete_calls(storage, ids, "DSR-1"),
        "export": lambda ids: archive.export_calls(
            storage, archive.resolve_calls(storage, ids), storage.parent / "export.zip"),
    }


def test_every_archive_function_refuses_ids_that_are_not_calls(
        archive_storage: tuple[Path, str]) -> None:
    storage, call_id = archive_storage
    root = storage.parent
    before = snapshot(root)
    for bad in lookalikes(call_id):
        for name, attempt in attempts(storage, call_id).items():
            # Alone, and behind a good id: the good one is not acted on either.
            for ids in ([bad], [call_id, bad]):
                with pytest.raises(archive.ArchiveError):
                    attempt(ids)
                assert snapshot(root) == before, (name, bad)
        if not CALL_ID_PATTERN.fullmatch(bad):
            with pytest.raises(ValueError):
                receipt_path(storage, bad, STARTED)


@fuzz(200)
@given(bad=st.lists(st.sampled_from(
    ["..", "/", "\\", "\0", ".", "-", "line1", "20261129T120000Z", "abcdef", "T", "Z", "~",
     "*", "\u2010", "\uff10", "\u0430", "\n", "%2f", "json", "opus"]) | st.text(max_size=4),
    max_size=12).map("".join) | st.from_regex(CALL_ID_PATTERN, fullmatch=True))
def test_ids_made_of_traversal_fragments_are_refused(archive_storage: tuple[Path, str],
                                                     bad: str) -> None:
    """Ids put together from the pieces of paths and call ids, and ids of the right form:
    none names a stored call, and every function refuses it without touching a file."""
    storage, call_id = archive_storage
    assume(bad != call_id)
    before = snapshot(storage.parent)
    for attempt in attempts(storage, call_id).values():
        with pytest.raises(archive.ArchiveError):
            attempt([bad])
    assert snapshot(storage.parent) == before


def test_the_recordings_commands_refuse_bad_ids_in_one_line(
        archive_storage: tuple[Path, str]) -> None:
    storage, call_id = archive_storage
    before = snapshot(storage.parent)
    for bad in ("../../etc/passwd", "20261399T256199Z-line1-abcdef", f"{call_id}/"):
        for args in (["delete", bad, "--reason", "DSR-1"], ["hold", bad, "--reason", "T-1"],
                     ["release", bad], ["export", bad, "-o", str(storage.parent / "x.zip")]):
            result = linerec("recordings", *args, "--storage", str(storage))
            assert result.returncode == 2, (args, result)
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert snapshot(storage.parent) == before


# ---------------------------------------------------------------------------------------
# MQTT commands: any topic, any payload, one reply, nothing changed


REPLY_SCHEMA = json.loads((ROOT / "docs" / "mqtt" / "reply.schema.json").read_text())
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)


COMMAND_ARGS = {
    "status": (), "reload": (), "find": ("number", "from", "to", "line"),
    "export-list": ("call_ids", "number", "from", "to", "line"),
    "delete": ("call_ids", "reason"), "hold": ("call_ids", "reason"),
    "release": ("call_ids", "reason"), "config/set": ("config",),
}
"""The args each command takes (docs/MQTT.md); others get one now and then."""
ODD_PAYLOADS = [
    b'{"request_id": "r1", "args": {"reason": NaN}}',
    b'{"request_id": "r1", "args": {"call_ids": ["\\ud800"], "reason": "x"}}',
    b'{"request_id": "r1", "args": {"number": "\\udfff"}}',
    b'{"request_id": "r1\\n"}', b'{"request_id": "r1", "args": ' + b"[" * 100_000,
    b'{"request_id": "r1", "args": {"line": ' + b"9" * 5000 + b"}}",
    b'{"request_id": "r1", "args": {"config": {"audio": {"bitrate": 1e999}}}}',
    b'{"request_id": "r1", "args": {"config": {"mqtt": {"host": "h", "username": "\\ud800"}}}}',
    b"\xef\xbb\xbf{}", b"", b"null", b"[]", b'"x"', b"\xff" * 70_000]
"""JSON that Python's parser takes and a strict one would not (NaN, lone surrogates, deep
nesting, 5000-digit numbers), and what is not a request at all."""


@st.composite
def command_payloads(draw: st.DrawFn, name: str, call_id: str) -> bytes:
    """Mostly requests with the command's own args, their values mostly plausible: call ids
    that try to leave the storage, dates, number patterns, config patches; now and then
    raw bytes, JSON that is not a request, or an odd payload."""
    kind = draw(mostly(st.just("request"), st.sampled_from(["bytes", "json", "odd"])))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "odd":
        return draw(st.sampled_from(ODD_PAYLOADS))
    keys = list(COMMAND_ARGS.get(name, ()))
    args: dict[str, Any] = {}
    for key in keys:
        if draw(mostly(st.just(True), st.just(False))):
            args[key] = draw(mostly(plausible_arg(key, call_id), JSON_VALUES))
    if draw(RARELY):
        args[draw(st.sampled_from(["call_ids", "reason", "config", "direction", "x"]))] = 1
    request: dict[str, Any] = {"request_id": draw(mostly(
        st.sampled_from(["r1", "ok-id.2:3"]), st.sampled_from(["a" * 65, "", "r 1"])
        | JSON_VALUES))}
    if args or draw(st.booleans()):
        request["args"] = args
    if draw(RARELY):
        request["junk"] = 1
    return json.dumps(request).encode()


def plausible_arg(key: str, call_id: str) -> st.SearchStrategy[Any]:
    if key == "call_ids":
        return st.lists(call_ids(call_id), min_size=1, max_size=6)
    if key in ("from", "to"):
        return st.sampled_from(["2026-11-29", "2026-11-01", "2026-02-30", "yesterday", "",
                                "2026-11-29T12:00"])
    if key == "number":
        return st.sampled_from(["+3120*", "020 123 4567", "*", "?", "abc", "+", "1" * 600])
    if key == "line":
        return st.sampled_from(["line1", "line9", "../line1", "line1\n", ""])
    if key == "reason":
        return st.sampled_from(["DSR-1", "", "two\nlines", "x" * 600, "+31 20 123 4567"])
    return st.dictionaries(st.sampled_from(["device_id", "audio", "line", "numbers", "storage",
                                            "colour"]), JSON_VALUES, max_size=2)


@pytest.fixture
def command_handler(tmp_path: Path, archive_storage: tuple[Path, str]
                    ) -> tuple[CommandHandler, Path, Path, str]:
    storage, call_id = archive_storage
    config = sim_config(tmp_path)
    handler = CommandHandler(storage, lambda: {"lines": {}}, configurator=Configurator(
        config, load_config(config), lambda new: None))
    return handler, storage, config, call_id


READ_ONLY = {"status", "find", "export-list", "reload"}


@fuzz(300)
@given(data=st.data())
def test_any_command_payload_gets_one_reply_and_changes_nothing(
        command_handler: tuple[CommandHandler, Path, Path, str], data: st.DataObject) -> None:
    handler, storage, config, call_id = command_handler
    name = data.draw(mostly(st.sampled_from(handler.names), st.sampled_from(
        ["", "../cmd", "find/../delete", "cmd/\0", "test-disclosure", "STATUS"])), label="topic")
    payload = data.draw(command_payloads(name, call_id), label="payload")
    before, config_before = snapshot(storage.parent), config.read_bytes()
    reply = handler.handle(name, payload)
    jsonschema.Draft202012Validator(REPLY_SCHEMA).validate(reply)
    json.dumps(reply, ensure_ascii=False).encode("utf-8")  # it can be published
    assert reply["command"] == name
    event(f"ok: {name}" if reply["ok"] else f"error: {reply['error']['key']}")
    if reply["ok"]:
        assert name in READ_ONLY | {"config/set"}, reply
        if name == "config/set":
            config.write_bytes(config_before)  # a patch that happened to be good
            return
    else:
        assert reply["error"]["key"] and reply["error"]["problem"]
    assert snapshot(storage.parent) == before
    assert config.read_bytes() == config_before


def test_the_command_payloads_found_by_fuzzing(
        command_handler: tuple[CommandHandler, Path, Path, str]) -> None:
    handler, storage, _, _ = command_handler
    before = snapshot(storage.parent)
    # An id of the right form whose time does not exist: was a ValueError out of handle().
    reply = handler.handle("delete", json.dumps({"request_id": "d1", "args": {
        "call_ids": ["20261399T256199Z-line1-abcdef"], "reason": "DSR-1"}}).encode())
    assert reply["error"]["key"] == "args" and "not a time" in reply["error"]["problem"]
    # A request id with a trailing newline passed REQUEST_ID.match.
    reply = handler.handle("status", b'{"request_id": "r1\\n"}')
    assert reply["request_id"] is None and reply["error"]["key"] == "request_id"
    # A lone surrogate reached the config file's UTF-8 encoding half-way through writing.
    reply = handler.handle("config/set", b'{"request_id": "c1", "args": {"config": '
                           b'{"purpose": [{"name": "service", "text": "\\ud800", '
                           b'"lawful_basis": "contract", "retention_days": 90}]}}}')
    assert reply["error"]["key"] == "(payload)"
    assert snapshot(storage.parent) == before


# ---------------------------------------------------------------------------------------
# The MQTT outbox: cut at every byte, garbled lines


def outbox_events(folder: Path, count: int = 6, acked: int = 2) -> bytes:
    """A real outbox: ``count`` events, the first ``acked`` acknowledged."""
    folder.mkdir()
    outbox = Outbox(folder)
    for n in range(count):
        outbox.append(f"linerec/office/line/line{n % 2 + 1}/event",
                      {"event": "call_started", "n": n, "number": "+31 20 123 45 6é",
                       "ts": "2026-11-29T12:00:00.000Z"})
    for seq in range(1, acked + 1):
        outbox.acknowledge(seq)
    outbox.close()
    return (folder / OUTBOX_NAME).read_bytes()


def reopened(folder: Path, data: bytes, acked: bytes | None) -> Outbox:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / OUTBOX_NAME).write_bytes(data)
    if acked is not None:
        (folder / ACKED_NAME).write_bytes(acked)
    return Outbox(folder)


def whole_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines(keepends=True) if line.endswith(b"\n")]


def test_an_outbox_cut_at_every_byte_loads_keeps_whole_events_and_numbers_on(
        tmp_path: Path) -> None:
    data = outbox_events(tmp_path / "made")
    acked = (tmp_path / "made" / ACKED_NAME).read_bytes()
    assert int(acked) == 2
    folder = tmp_path / "cut"
    for cut in range(len(data) + 1):
        outbox = reopened(folder, data[:cut], acked)
        kept = whole_lines(data[:cut])
        assert [e.seq for e in outbox.pending] == [e["seq"] for e in kept if e["seq"] > 2], cut
        # The torn line is gone from the file; the next event follows on.
        assert (folder / OUTBOX_NAME).read_bytes() == data[: data.rfind(b"\n", 0, cut) + 1]
        assert outbox.append("t", {"event": "x"}).seq == max([2, *(e["seq"] for e in kept)]) + 1
        outbox.close()
        assert all(line.endswith(b"\n") for line in
                   (folder / OUTBOX_NAME).read_bytes().splitlines(keepends=True))


GARBAGE = st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"\n", b"") + b"\n") \
    | st.sampled_from([
        b'{"seq": Infinity, "topic": "t", "payload": "{}"}\n',
        b'{"seq": 1e400, "topic": "t", "payload": "{}"}\n',
        b'{"seq": "7", "topic": "t", "payload": "{\\"seq\\": 7}"}\n',
        b'{"seq": 7, "topic": "t", "payload": "{\\"seq\\": 8}"}\n',
        b'{"seq": 7, "topic": ["t"], "payload": "{\\"seq\\": 7}"}\n',
        b'{"seq": -3, "topic": "t", "payload": "{\\"seq\\": -3}"}\n',
        b'{"seq": 7, "topic": "t", "payload": "[' + b"[" * 5000 + b'"}\n',
        b"[" * 100_000 + b"\n", b"null\n", b"[1, 2]\n", b'"seq"\n', b"\n", b"\xff\xfe\n",
        b'{"seq": 7, "topic": "t"}\n'])


@fuzz(150)
@given(data=st.data())
def test_garbled_outbox_lines_go_and_every_whole_event_stays(
        tmp_path: Path, scratch: Any, data: st.DataObject) -> None:
    made = tmp_path / "made"
    if not made.exists():
        outbox_events(made)
    original = (made / OUTBOX_NAME).read_bytes()
    lines = original.splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 4), label="garbage lines")):
        lines.insert(data.draw(st.integers(0, len(lines)), label="where"),
                     data.draw(GARBAGE, label="garbage"))
    tail = data.draw(st.sampled_from([b"", b'{"seq": 9, "to']), label="torn tail")
    acked = data.draw(st.sampled_from([b"2\n", b"", b"x\n", b"-5\n", b"\xff", b"9" * 5000,
                                       None]), label="acked")
    outbox = reopened(scratch(), b"".join(lines) + tail, acked)
    watermark = outbox.acked
    assert watermark in (0, 2)
    assert [e.seq for e in outbox.pending] == [e["seq"] for e in whole_lines(original)
                                               if e["seq"] > watermark]
    assert outbox.append("t", {"event": "x"}).seq == 7
    outbox.close()


def test_an_outbox_line_garbled_in_the_middle_keeps_the_events_after_it(tmp_path: Path
                                                                        ) -> None:
    """Found here: the first bad line was taken for one a power cut tore, and it and every
    event after it were dropped."""
    data = outbox_events(tmp_path / "made", acked=0)
    lines = data.splitlines(keepends=True)
    lines[1] = lines[1][:20] + b"\x00garbled\x00" + lines[1][29:]
    outbox = reopened(tmp_path / "box", b"".join(lines), None)
    assert [e.seq for e in outbox.pending] == [1, 3, 4, 5, 6]
    outbox.close()
    assert (tmp_path / "box" / OUTBOX_NAME).read_bytes() == b"".join(lines[:1] + lines[2:])
