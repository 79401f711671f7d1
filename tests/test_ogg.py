"""The Ogg Opus muxer: CRC, page layout, granule positions, pre-skip, end trimming."""

from __future__ import annotations

import struct
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from linerec.audio.ogg import build_page, ogg_crc, opus_head, opus_tags
from linerec.audio.opus import VoiceEncoder
from linerec.audio.recording import RecordingFile


def crc_bitwise(data: bytes) -> int:
    """Independent CRC: one bit at a time, as RFC 3533 describes it."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def parse_pages(data: bytes) -> list[dict[str, object]]:
    """An Ogg reader of the test's own, with the bitwise CRC: the oracle does not share
    code with the muxer it judges."""
    pages = []
    offset = 0
    while offset < len(data):
        assert data[offset : offset + 4] == b"OggS", f"no capture pattern at {offset}"
        _, _, header_type, granule, serial, sequence, crc, count = struct.unpack_from(
            "<4sBBqIIIB", data, offset)
        lacing = list(data[offset + 27 : offset + 27 + count])
        end = offset + 27 + count + sum(lacing)
        page = bytearray(data[offset:end])
        page[22:26] = b"\0\0\0\0"
        packets, size = [], 0
        body = offset + 27 + count
        for value in lacing:
            size += value
            if value < 255:
                packets.append(data[body : body + size])
                body += size
                size = 0
        pages.append({"type": header_type, "granule": granule, "serial": serial,
                      "sequence": sequence, "crc_ok": crc == crc_bitwise(bytes(page)),
                      "packets": packets})
        offset = end
    return pages


def test_crc_matches_the_bitwise_definition() -> None:
    rng = np.random.default_rng(7)
    for size in (0, 1, 27, 255, 4096):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert ogg_crc(data) == crc_bitwise(data)
    # The catalogued CRC-32/CKSUM check value, 0x765E7680, is this CRC with a final xor.
    assert ogg_crc(b"123456789") ^ 0xFFFFFFFF == 0x765E7680


def test_page_layout_and_lacing() -> None:
    packets = [b"a" * 10, b"b" * 255, b"c" * 600]
    page = build_page(packets, granule=12345, serial=0xCAFE, sequence=3, header_type=4)
    (parsed,) = parse_pages(page)
    assert parsed == {"type": 4, "granule": 12345, "serial": 0xCAFE, "sequence": 3,
                      "crc_ok": True, "packets": packets}
    with pytest.raises(ValueError, match="lacing"):
        build_page([b"x" * 255 * 255], granule=0, serial=1, sequence=0)


def test_opus_headers() -> None:
    head = opus_head(channels=1, pre_skip=312, input_rate=8000)
    assert len(head) == 19
    assert head[:8] == b"OpusHead" and head[8] == 1 and head[9] == 1
    assert struct.unpack_from("<HIhB", head, 10) == (312, 8000, 0, 0)
    tags = opus_tags("linerec test", {"line": "line1", "call_id": "x"})
    assert tags.startswith(b"OpusTags\x0c\x00\x00\x00linerec test\x02\x00\x00\x00")
    assert b"LINE=line1" in tags and b"CALL_ID=x" in tags


@pytest.mark.parametrize("rate", [8000, 16000])
def test_pre_skip_is_the_encoder_lookahead_at_48_khz(rate: int) -> None:
    encoder = VoiceEncoder(rate=rate, bitrate=12000, complexity=9)
    assert encoder.lookahead > 0
    assert encoder.lookahead * 48000 // rate == {8000: 312, 16000: 312}[rate]


def speechlike(samples: int, rate: int) -> np.ndarray:
    t = np.arange(samples) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    tone = np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 660 * t)
    return (8000 * envelope * tone).astype(np.int16)


@pytest.mark.parametrize(("rate", "samples"), [(8000, 1), (8000, 159), (8000, 160),
                                               (8000, 8161), (8000, 80000), (16000, 48321)])
def test_recording_file_granules_and_exact_length(tmp_path: Path, rate: int,
                                                  samples: int) -> None:
    path = tmp_path / "call.opus"
    recording = RecordingFile(path, rate=rate, bitrate=12000, complexity=9, page_interval_s=1.0,
                              fsync_interval_s=1.0, vendor="linerec test",
                              tags={"line": "line1"})
    audio = speechlike(samples, rate)
    for start in range(0, samples, 700):  # odd chunk sizes, as the engine hands them over
        recording.write(audio[start : start + 700])
    size = recording.close()
    assert not recording.part_path.exists() and path.stat().st_size == size

    pages = parse_pages(path.read_bytes())
    assert all(p["crc_ok"] for p in pages)
    assert [p["sequence"] for p in pages] == list(range(len(pages)))
    assert len({p["serial"] for p in pages}) == 1
    assert pages[0]["type"] == 2 and pages[0]["granule"] == 0
    assert pages[0]["packets"][0][:8] == b"OpusHead"
    assert pages[1]["granule"] == 0 and pages[1]["packets"][0][:8] == b"OpusTags"
    assert pages[-1]["type"] == 4 and all(p["type"] == 0 for p in pages[1:-1])
    pre_skip = struct.unpack_from("<H", pages[0]["packets"][0], 10)[0]  # type: ignore[index]
    assert pre_skip == 312
    # Audio granules count decoded 48 kHz samples (pre-skip included); every packet is 20 ms.
    decoded = 0
    for page in pages[2:-1]:
        decoded += 960 * len(page["packets"])  # type: ignore[arg-type]
        assert page["granule"] == decoded
        assert len(page["packets"]) <= 50  # type: ignore[arg-type]
    last = pages[-1]
    decoded += 960 * len(last["packets"])  # type: ignore[arg-type]
    # The EOS page trims the end to the exact input length, by less than one packet.
    assert last["granule"] == pre_skip + samples * 48000 // rate
    assert 0 <= decoded - last["granule"] < 960

    info = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True, check=False)
    assert info.returncode == 0 and "WARNING" not in info.stdout, info.stdout
    out = tmp_path / "decoded.wav"
    subprocess.run(["opusdec", "--quiet", "--rate", str(rate), str(path), str(out)], check=True)
    with wave.open(str(out)) as wav:
        assert wav.getnframes() == samples


@pytest.mark.parametrize("cut_s", [4.99, 4.5, 3.9, 3.0, 2.6])
def test_a_recording_can_be_ended_before_the_audio_already_written(tmp_path: Path,
                                                                   cut_s: float) -> None:
    """An on-hook is confirmed up to 2 s after the loop opened, while the recording runs
    on: closing cuts the stream back to the sample where the loop opened, even when that
    lies in pages already on disk."""
    rate = 8000
    path = tmp_path / "call.opus"
    recording = RecordingFile(path, rate=rate, bitrate=12000, complexity=9,
                              page_interval_s=0.5, fsync_interval_s=1.0,
                              vendor="linerec test", tags={})
    audio = speechlike(5 * rate, rate)
    recording.write(audio)
    end = round(cut_s * rate)
    recording.close(end=end)
    assert recording.samples == end
    pages = parse_pages(path.read_bytes())
    assert all(p["crc_ok"] for p in pages)
    assert [p["sequence"] for p in pages] == list(range(len(pages)))
    assert pages[-1]["type"] == 4 and pages[-1]["granule"] == 312 + end * 6
    assert pages[-2]["granule"] < pages[-1]["granule"]  # nothing after the end survives
    info = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True, check=False)
    assert info.returncode == 0 and "WARNING" not in info.stdout, info.stdout
    out = tmp_path / "decoded.wav"
    subprocess.run(["opusdec", "--quiet", "--rate", str(rate), str(path), str(out)], check=True)
    with wave.open(str(out)) as wav:
        decoded = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(float)
    assert len(decoded) == end
    source = audio[:end].astype(float)
    energy = np.sqrt(np.dot(decoded, decoded) * np.dot(source, source))
    correlation = np.dot(decoded, source) / energy
    assert correlation > 0.9


def test_ending_further_back_than_the_kept_pages_is_refused(tmp_path: Path) -> None:
    recording = RecordingFile(tmp_path / "call.opus", rate=8000, bitrate=12000, complexity=9,
                              page_interval_s=0.5, fsync_interval_s=1.0, vendor="t", tags={})
    recording.write(speechlike(10 * 8000, 8000))
    with pytest.raises(ValueError, match="not in the last pages"):
        recording.close(end=8000)
