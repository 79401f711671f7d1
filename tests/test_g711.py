"""G.711 tables against sox, an independent implementation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from linerec.audio import g711

SOX_ENCODING = {"A_LAW": "a-law", "MU_LAW": "u-law"}


@pytest.mark.parametrize("law", ["A_LAW", "MU_LAW"])
def test_every_code_decodes_as_sox_decodes_it(tmp_path: Path, law: str) -> None:
    codes = np.arange(256, dtype=np.uint8)
    (tmp_path / "in.raw").write_bytes(codes.tobytes())
    subprocess.run(["sox", "-t", "raw", "-e", SOX_ENCODING[law], "-b", "8", "-r", "8000",
                    "-c", "1", str(tmp_path / "in.raw"), "-t", "raw", "-e", "signed", "-b",
                    "16", "-L", str(tmp_path / "out.raw")], check=True)
    expected = np.frombuffer((tmp_path / "out.raw").read_bytes(), dtype="<i2")
    np.testing.assert_array_equal(g711.decode(codes, law), expected)


@pytest.mark.parametrize("law", ["A_LAW", "MU_LAW"])
def test_encoding_round_trips_within_a_quantisation_step(law: str) -> None:
    samples = np.arange(-32768, 32768, dtype=np.int16)
    back = g711.decode(g711.encode(samples, law), law).astype(np.int32)
    error = np.abs(back - samples)
    # The step grows with the segment: 1/16 of the magnitude, plus the smallest step.
    assert np.all(error <= np.abs(samples.astype(np.int32)) // 16 + 16)
    assert g711.decode(g711.encode(np.zeros(1, np.int16), law), law)[0] in (-8, 0, 8)
