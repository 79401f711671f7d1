"""Ogg pages (RFC 3533) laid out as an Ogg Opus stream (RFC 7845)."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import BinaryIO

OPUS_GRANULE_RATE = 48000
"""Ogg Opus granule positions count 48 kHz samples whatever the input rate."""

MAX_LACING = 255
HEADER_BOS = 0x02
HEADER_EOS = 0x04
HEADER_CONTINUED = 0x01


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def ogg_crc(data: bytes) -> int:
    """CRC-32 of an Ogg page: polynomial 0x04C11DB7, init 0, not reflected, no final xor."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) ^ byte) & 0xFF]
    return crc


def lacing(packet_len: int) -> list[int]:
    """Segment table values of one packet that ends on this page."""
    return [255] * (packet_len // 255) + [packet_len % 255]


def build_page(
    packets: list[bytes], *, granule: int, serial: int, sequence: int, header_type: int = 0
) -> bytes:
    """One Ogg page holding whole packets; the caller keeps the lacing within 255 values."""
    segments: list[int] = []
    for packet in packets:
        segments.extend(lacing(len(packet)))
    if len(segments) > MAX_LACING:
        raise ValueError(f"{len(segments)} lacing values do not fit one page")
    header = struct.pack(
        "<4sBBqIIIB",
        b"OggS",
        0,
        header_type,
        granule,
        serial,
        sequence,
        0,
        len(segments),
    )
    page = bytearray(header + bytes(segments) + b"".join(packets))
    struct.pack_into("<I", page, 22, ogg_crc(bytes(page)))
    return bytes(page)


def opus_head(*, channels: int, pre_skip: int, input_rate: int) -> bytes:
    """The 19-byte identification header for channel mapping family 0."""
    return struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, pre_skip, input_rate, 0, 0)


def opus_tags(vendor: str, tags: Mapping[str, str]) -> bytes:
    """The comment header: vendor string and KEY=value user comments."""
    out = bytearray(b"OpusTags")
    vendor_bytes = vendor.encode()
    out += struct.pack("<I", len(vendor_bytes)) + vendor_bytes
    out += struct.pack("<I", len(tags))
    for key, value in tags.items():
        entry = f"{key.upper()}={value}".encode()
        out += struct.pack("<I", len(entry)) + entry
    return bytes(out)


class OggOpusWriter:
    """Writes one mono Ogg Opus stream: header pages, audio pages, an EOS page that trims.

    Packets never span pages (an Opus packet is at most 1275 bytes), so a crash loses at
    most the packets of the page not yet written.
    """

    def __init__(
        self,
        out: BinaryIO,
        *,
        input_rate: int,
        pre_skip: int,
        vendor: str,
        tags: Mapping[str, str],
        serial: int,
        packets_per_page: int,
    ) -> None:
        if OPUS_GRANULE_RATE % input_rate:
            raise ValueError(f"input rate {input_rate} does not divide 48000")
        self._out = out
        self._serial = serial
        self._sequence = 0
        self._scale = OPUS_GRANULE_RATE // input_rate
        self.pre_skip = pre_skip
        self._packets_per_page = packets_per_page
        self._pending: list[bytes] = []
        self._pending_lacing = 0
        self._decoded = 0
        """48 kHz samples decoded from all packets added so far."""
        self.bytes_written = 0
        self._write_page([opus_head(channels=1, pre_skip=pre_skip, input_rate=input_rate)],
                         0, HEADER_BOS)
        tags_packet = opus_tags(vendor, tags)
        if len(lacing(len(tags_packet))) > MAX_LACING:
            raise ValueError("the OpusTags header is too large for one page")
        self._write_page([tags_packet], 0, 0)

    def add_packet(self, packet: bytes, samples: int) -> None:
        """Queue one encoded packet that decodes to ``samples`` input-rate samples.

        A full page is written before the packet that does not fit, so the last packet of
        the stream is always still pending when finish() writes the EOS page.
        """
        needed = len(lacing(len(packet)))
        if self._pending and (
            len(self._pending) >= self._packets_per_page
            or self._pending_lacing + needed > MAX_LACING
        ):
            self.flush()
        self._pending.append(packet)
        self._pending_lacing += needed
        self._decoded += samples * self._scale

    def flush(self) -> None:
        """Write the pending packets as one page, granule at its last packet."""
        if self._pending:
            # RFC 7845 granules count every decoded sample, the pre-skip included.
            self._write_page(self._pending, self._decoded, 0)
            self._pending = []
            self._pending_lacing = 0

    def finish(self, total_samples: int) -> None:
        """Write the EOS page; its granule trims the decoded audio to ``total_samples``."""
        granule = self.pre_skip + total_samples * self._scale
        if granule > self._decoded:
            raise ValueError("cannot trim to more samples than were encoded")
        self._write_page(self._pending, granule, HEADER_EOS)
        self._pending = []
        self._pending_lacing = 0

    def _write_page(self, packets: list[bytes], granule: int, header_type: int) -> None:
        page = build_page(
            packets,
            granule=granule,
            serial=self._serial,
            sequence=self._sequence,
            header_type=header_type,
        )
        self._out.write(page)
        self._sequence += 1
        self.bytes_written += len(page)
