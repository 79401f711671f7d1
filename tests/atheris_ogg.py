"""Coverage-guided fuzzing of the Ogg page reader, the repair of cut-off recordings and the
Ogg Opus decoder, run by hand (not part of `make test`):

    .venv/bin/pip install atheris
    .venv/bin/python tests/atheris_ogg.py -max_total_time=120 build/ogg-corpus

The corpus folder is seeded with a real recording. Mutated inputs get their pages' CRCs made
right again before they are tried (a custom mutator), so that the fuzzer looks past the CRC
check into the lacing, the headers and the repair. Any exception other than the documented
ones (RepairError, ValueError from the decoder) is a finding: libFuzzer stops and writes the
input to crash-<sha1>.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["linerec"]):
    from linerec.audio.ogg import MAX_PAGE_BYTES, RepairError, ogg_crc, repair_stream
    from linerec.audio.opus import decode_ogg_opus

# After the instrumented imports: the test module imports linerec too.
from test_fuzz import check_pages, make_recording

WORK = Path(tempfile.mkdtemp(prefix="atheris-ogg-"))
PART = WORK / "input.opus.part"


def with_right_crcs(data: bytes) -> bytes:
    """Every page-shaped run in ``data`` with its CRC computed afresh."""
    out = bytearray(data)
    at = out.find(b"OggS")
    while at >= 0 and at + 27 <= len(out):
        count = out[at + 26]
        end = at + 27 + count + sum(out[at + 27 : at + 27 + count])
        if at + 27 + count <= len(out) and end <= len(out) and end - at <= MAX_PAGE_BYTES:
            out[at + 22 : at + 26] = b"\0\0\0\0"
            struct.pack_into("<I", out, at + 22, ogg_crc(bytes(out[at:end])))
        at = out.find(b"OggS", at + 4)
    return bytes(out)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    return with_right_crcs(atheris.Mutate(data, max_size))


def one_input(data: bytes) -> None:
    check_pages(data)
    PART.write_bytes(data)
    try:
        stream = repair_stream(PART)
    except RepairError:
        assert PART.read_bytes() == data, "a refused stream was changed"
    else:
        assert stream.bytes == PART.stat().st_size
    with contextlib.suppress(ValueError):
        decode_ogg_opus(data, 8000)


def seed(corpus: Path) -> None:
    """A one-second recording as the daemon writes it, pages every 0.2 s."""
    if not any(corpus.iterdir()):
        (corpus / "recording.opus").write_bytes(make_recording(WORK / "seed.opus", 1.0))


def main() -> None:
    folders = [Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        seed(folder)
    atheris.Setup(sys.argv, one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
