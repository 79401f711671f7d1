"""The capture ring: wrap-around, and overwrites detected rather than read as audio."""

from __future__ import annotations

import numpy as np
import pytest

from linerec.audio.ring import RingOverrun, SampleRing


def test_capacity_is_a_power_of_two() -> None:
    assert SampleRing(1000).capacity == 1024
    assert SampleRing(1024).capacity == 1024


def test_reads_across_the_wrap() -> None:
    ring = SampleRing(16)
    data = np.arange(40, dtype=np.int16)
    for start in range(0, 40, 5):
        ring.write(data[start : start + 5])
    np.testing.assert_array_equal(ring.read(28, 12), data[28:40])
    np.testing.assert_array_equal(ring.read(30, 3), data[30:33])


def test_overwritten_and_future_samples_are_refused() -> None:
    ring = SampleRing(16)
    ring.write(np.arange(20, dtype=np.int16))
    with pytest.raises(RingOverrun) as caught:
        ring.read(2, 4)
    assert (caught.value.start, caught.value.oldest) == (2, 4)
    with pytest.raises(ValueError, match="not captured"):
        ring.read(18, 4)


def test_an_overwrite_under_way_is_detected() -> None:
    """The producer announces a write before it copies: a reader that copies meanwhile must
    not take the half-overwritten samples for old audio."""
    ring = SampleRing(16)
    ring.write(np.arange(16, dtype=np.int16))
    ring._writing = ring.written + 4  # the capture thread is about to overwrite 0..3
    with pytest.raises(RingOverrun):
        ring.read(0, 8)
    np.testing.assert_array_equal(ring.read(4, 8), np.arange(4, 12))
