"""Ogg pages (RFC 3533) laid out as an Ogg Opus stream (RFC 7845)."""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

OPUS_GRANULE_RATE = 48000
"""Ogg Opus granule positions count 48 kHz samples whatever the input rate."""

MAX_LACING = 255
HEADER_BOS = 0x02
HEADER_EOS = 0x04
HEADER_CONTINUED = 0x01


_REVERSED_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def ogg_crc(data: bytes) -> int:
    """CRC-32 of an Ogg page: polynomial 0x04C11DB7, init 0, not reflected, no final xor.

    zlib computes the reflected form of the same polynomial in C. Fed the bytes with their
    bits reversed, started so that its register starts at 0 and not inverted at the end,
    it gives the Ogg CRC with its 32 bits reversed.
    """
    reflected = ~zlib.crc32(data.translate(_REVERSED_BITS), 0xFFFFFFFF) & 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


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


OPUS_HEAD_SIZE = 19
"""Bytes of an OpusHead packet of channel mapping family 0."""


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


@dataclass(frozen=True)
class _AudioPage:
    offset: int
    sequence: int
    packets: tuple[tuple[bytes, int], ...]
    """(packet, 48 kHz samples it decodes to)."""
    granule_before: int
    granule: int


class OggOpusWriter:
    """Writes one mono Ogg Opus stream: header pages, audio pages, an EOS page that trims.

    Packets never span pages (an Opus packet is at most 1275 bytes), so a crash loses at
    most the packets of the page not yet written. The last ``keep_pages`` audio pages are
    remembered, so that ``finish`` can end the stream inside one of them: the file is cut
    back to that page, which is written again as the EOS page.
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
        keep_pages: int = 8,
    ) -> None:
        if OPUS_GRANULE_RATE % input_rate:
            raise ValueError(f"input rate {input_rate} does not divide 48000")
        self._out = out
        self._serial = serial
        self._sequence = 0
        self._scale = OPUS_GRANULE_RATE // input_rate
        self.pre_skip = pre_skip
        self._packets_per_page = packets_per_page
        self._pending: list[tuple[bytes, int]] = []
        self._pending_lacing = 0
        self._decoded = 0
        """48 kHz samples decoded from all packets added so far."""
        self._paged = 0
        """48 kHz samples decoded from the packets already on written pages."""
        self._recent: deque[_AudioPage] = deque(maxlen=keep_pages)
        self.bytes_written = 0
        self.pages_written = 0
        self._write_page([opus_head(channels=1, pre_skip=pre_skip, input_rate=input_rate)],
                         0, HEADER_BOS)
        tags_packet = opus_tags(vendor, tags)
        if len(lacing(len(tags_packet))) > MAX_LACING:
            raise ValueError("the OpusTags header is too large for one page")
        self._write_page([tags_packet], 0, 0)

    @property
    def decoded(self) -> int:
        """48 kHz samples the packets added so far decode to (pre-skip included)."""
        return self._decoded

    def add_packet(self, packet: bytes, samples: int) -> None:
        """Queue one encoded packet that decodes to ``samples`` input-rate samples.

        A full page is written before the packet that does not fit, so the last packet of
        the stream is always still pending when finish() writes the EOS page.
        """
        needed = len(packet) // 255 + 1  # its lacing values
        if self._pending and (
            len(self._pending) >= self._packets_per_page
            or self._pending_lacing + needed > MAX_LACING
        ):
            self.flush()
        self._pending.append((packet, samples * self._scale))
        self._pending_lacing += needed
        self._decoded += samples * self._scale

    def flush(self) -> None:
        """Write the pending packets as one page, granule at its last packet."""
        if self._pending:
            # RFC 7845 granules count every decoded sample, the pre-skip included.
            self._recent.append(_AudioPage(self.bytes_written, self._sequence,
                                           tuple(self._pending), self._paged, self._decoded))
            self._write_page([p for p, _ in self._pending], self._decoded, 0)
            self._paged = self._decoded
            self._pending = []
            self._pending_lacing = 0

    def finish(self, total_samples: int) -> None:
        """Write the EOS page; its granule trims the decoded audio to ``total_samples``.

        The end may lie before audio already on disk (an on-hook confirmed after the
        recording ran on): the stream is then cut back to the page that holds the end.
        """
        granule = self.pre_skip + total_samples * self._scale
        if granule > self._decoded:
            raise ValueError("cannot trim to more samples than were encoded")
        if self._pending and granule > self._paged:
            packets, before = self._pending, self._paged
        else:
            page = next((p for p in reversed(self._recent)
                         if p.granule_before < granule <= p.granule), None)
            if page is None:
                raise ValueError(f"the end at granule {granule} is not in the last pages")
            self._out.seek(page.offset)
            self._out.truncate()
            self.bytes_written = page.offset
            self._sequence = page.sequence
            packets, before = list(page.packets), page.granule_before
        kept = []
        for packet, duration in packets:
            kept.append(packet)
            before += duration
            if before >= granule:
                break
        self._write_page(kept, granule, HEADER_EOS)
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
        self.pages_written += 1


class RepairError(ValueError):
    """A stream that cannot be made playable; the message says why."""


@dataclass(frozen=True)
class PageInfo:
    offset: int
    length: int
    header_type: int
    granule: int
    sequence: int
    packets: tuple[bytes, ...]


def read_pages(data: bytes) -> list[PageInfo]:
    """The whole, CRC-checked pages at the start of ``data``; reading stops at the first
    page that is cut off or damaged (what a crash leaves at the end of a file)."""
    pages: list[PageInfo] = []
    offset = 0
    while offset + 27 <= len(data):
        if data[offset : offset + 4] != b"OggS":
            break
        header_type, granule, _, sequence, crc, count = struct.unpack_from(
            "<BqIIIB", data, offset + 5)
        body = offset + 27 + count
        if body > len(data):
            break
        segments = data[offset + 27 : body]
        end = body + sum(segments)
        if end > len(data):
            break
        page = bytearray(data[offset:end])
        page[22:26] = b"\0\0\0\0"
        if ogg_crc(bytes(page)) != crc:
            break
        packets, size, at = [], 0, body
        for value in segments:
            size += value
            if value < 255:
                packets.append(data[at : at + size])
                at += size
                size = 0
        pages.append(PageInfo(offset, end - offset, header_type, granule, sequence,
                              tuple(packets)))
        offset = end
    return pages


MAX_PAGE_BYTES = 27 + MAX_LACING + MAX_LACING * 255


def _next_whole_page(data: bytes, start: int) -> int | None:
    """Where the first whole, CRC-checked page at or after ``start`` begins, if any."""
    at = data.find(b"OggS", start)
    while at >= 0:
        if read_pages(data[at : at + MAX_PAGE_BYTES]):
            return at
        at = data.find(b"OggS", at + 1)
    return None


def ogg_packets(data: bytes) -> tuple[list[bytes], int]:
    """Every packet of a single-stream Ogg file, joined across pages where one continues
    on the next, and the last page's granule position."""
    packets: list[bytes] = []
    pending = b""
    granule = 0
    for page in read_pages(data):
        count = data[page.offset + 26]
        lacing_values = data[page.offset + 27 : page.offset + 27 + count]
        at = page.offset + 27 + count
        for value in lacing_values:
            pending += data[at : at + value]
            at += value
            if value < 255:
                packets.append(pending)
                pending = b""
        granule = page.granule
    return packets, granule


def parse_opus_tags(packet: bytes) -> dict[str, str]:
    """The user comments of an OpusTags packet, keys upper-case; RepairError when a length
    in it points past its end."""
    if not packet.startswith(b"OpusTags"):
        raise RepairError("the second page is not OpusTags")
    try:
        (vendor_len,) = struct.unpack_from("<I", packet, 8)
        at = 12 + vendor_len
        (count,) = struct.unpack_from("<I", packet, at)
        at += 4
        tags = {}
        for _ in range(count):
            (length,) = struct.unpack_from("<I", packet, at)
            if at + 4 + length > len(packet):
                raise struct.error
            entry = packet[at + 4 : at + 4 + length].decode("utf-8", "replace")
            key, _, value = entry.partition("=")
            tags[key.upper()] = value
            at += 4 + length
    except struct.error:
        raise RepairError("the OpusTags header is damaged: a length in it points past its "
                          "end") from None
    return tags


@dataclass(frozen=True)
class RepairedStream:
    input_rate: int
    pre_skip: int
    granule: int
    tags: dict[str, str]
    bytes: int

    @property
    def duration_s(self) -> float:
        return max(0, self.granule - self.pre_skip) / OPUS_GRANULE_RATE

    @property
    def empty(self) -> bool:
        """No audio page survived: the headers were all there was."""
        return self.granule <= self.pre_skip


def repair_stream(path: Path) -> RepairedStream:
    """Make a stream cut off by a crash playable, in place: cut it after its last whole page
    and mark that page as the end of the stream (EOS), with a fresh CRC. A stream with no
    whole audio page is left as it is and reported ``empty``."""
    data = path.read_bytes()
    pages = read_pages(data)
    end = pages[-1].offset + pages[-1].length if pages else 0
    damaged = _next_whole_page(data, end + 1)
    if damaged is not None:
        # Not a stream cut off at its end: whole pages follow a damaged one. Cutting there
        # would throw them away; the file is left for a person to look at.
        raise RepairError(f"{path}: damaged at byte {end}, with whole pages after it (from "
                          f"byte {damaged}); not cut off by a crash, so not cut back")
    if not pages and data[:4] == b"OggS"[: len(data[:4])]:
        # Nothing whole reached the disk (a power cut right after the file was made).
        return RepairedStream(0, 0, 0, {}, len(data))
    if len(pages) < 2 or not pages[0].packets or len(pages[0].packets[0]) < OPUS_HEAD_SIZE \
            or not pages[0].packets[0].startswith(b"OpusHead"):
        raise RepairError(f"{path}: no complete Ogg Opus header; nothing to recover")
    head = pages[0].packets[0]
    pre_skip, input_rate = struct.unpack_from("<HI", head, 10)
    try:
        tags = parse_opus_tags(pages[1].packets[0]) if pages[1].packets else {}
    except RepairError as exc:
        raise RepairError(f"{path}: {exc}") from None
    last = pages[-1]
    was_complete = bool(last.header_type & HEADER_EOS)
    if len(pages) == 2:
        return RepairedStream(input_rate, pre_skip, pre_skip, tags, len(data))
    with path.open("r+b") as out:
        out.truncate(last.offset + last.length)
        if not was_complete:
            page = bytearray(data[last.offset : last.offset + last.length])
            page[5] |= HEADER_EOS
            page[22:26] = b"\0\0\0\0"
            struct.pack_into("<I", page, 22, ogg_crc(bytes(page)))
            out.seek(last.offset)
            out.write(page)
        granule = last.granule
        out.flush()
        os.fsync(out.fileno())
        size = out.seek(0, os.SEEK_END)
    return RepairedStream(input_rate, pre_skip, granule, tags, size)
