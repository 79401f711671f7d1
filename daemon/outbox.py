"""The MQTT outbox: events on disk until the broker has acknowledged them.

Events are appended, one JSON line each, to ``<storage>/mqtt-outbox.jsonl`` and synced to
disk before they are published; ``<storage>/mqtt-outbox.acked`` holds the highest sequence
number up to which the broker acknowledged every event. What lies beyond it is published
again after a restart (in order). Each event carries its sequence number (``seq``, per
device, rising across restarts), so a consumer drops the duplicates a crash between an
acknowledgement and its note on disk can cause.

Only the outbox's own thread (``MqttEventSink``'s publisher) touches these files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from linerec.audio.recording import fsync_dir

logger = logging.getLogger(__name__)

OUTBOX_NAME = "mqtt-outbox.jsonl"
ACKED_NAME = "mqtt-outbox.acked"
COMPACT_BYTES = 1 << 20
"""Once everything is acknowledged and the file has grown past this, it starts over."""


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    topic: str
    payload: str
    """The event as JSON, ``seq`` included."""


class Outbox:
    def __init__(self, folder: Path) -> None:
        self._path = folder / OUTBOX_NAME
        self._acked_path = folder / ACKED_NAME
        self.acked = self._read_acked()
        """Every event up to this sequence number reached the broker."""
        self._pending: dict[int, OutboxEntry] = {}
        self._done: set[int] = set()
        self.last_seq = self.acked
        self._load()
        self._file = open(self._path, "ab")  # noqa: SIM115 - held open for appends

    @property
    def pending(self) -> list[OutboxEntry]:
        """Events not yet acknowledged, oldest first."""
        return [self._pending[seq] for seq in sorted(self._pending)]

    @property
    def count(self) -> int:
        """How many events wait for the broker."""
        return len(self._pending)

    def oldest(self) -> OutboxEntry | None:
        """The event to publish next. Cheap with thousands waiting (a long outage): the
        dictionary keeps its entries in ``seq`` order, as ``append`` and ``_load`` add them."""
        return next(iter(self._pending.values()), None)

    def append(self, topic: str, event: dict[str, Any]) -> OutboxEntry:
        """Number the event and put it on disk (synced) before anything publishes it."""
        seq = self.last_seq + 1
        payload = json.dumps({**event, "seq": seq})
        line = json.dumps({"seq": seq, "topic": topic, "payload": payload}) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        os.fdatasync(self._file.fileno())
        self.last_seq = seq
        entry = OutboxEntry(seq, topic, payload)
        self._pending[seq] = entry
        return entry

    def acknowledge(self, seq: int) -> None:
        """The broker has this event; note on disk how far everything before it has got."""
        if seq not in self._pending:
            return
        del self._pending[seq]
        self._done.add(seq)
        acked = self.acked
        while acked + 1 in self._done:
            acked += 1
            self._done.discard(acked)
        if acked != self.acked:
            self.acked = acked
            self._write_acked()
            if not self._pending and self._file.tell() > COMPACT_BYTES:
                self._compact()

    def close(self) -> None:
        self._file.close()

    # ---- on disk -------------------------------------------------------------------------

    def _read_acked(self) -> int:
        try:
            return max(0, int(self._acked_path.read_text(encoding="ascii").strip() or 0))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            # Sending too much again is safe (consumers drop seq they have seen); losing is not.
            logger.warning("%s is unreadable (%s); every event in the outbox is sent again",
                           self._acked_path, exc)
            return 0

    def _load(self) -> None:
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return
        kept: list[bytes] = []
        dropped: list[tuple[int, int]] = []
        at = 0
        for raw in data.splitlines(keepends=True):
            entry = _parse_line(raw)
            if entry is None:
                dropped.append((at, len(raw)))
            else:
                kept.append(raw)
                self.last_seq = max(self.last_seq, entry.seq)
                if entry.seq > self.acked:
                    self._pending[entry.seq] = entry
            at += len(raw)
        # In seq order whatever the file's order, for ``oldest``.
        self._pending = dict(sorted(self._pending.items()))
        if dropped:
            # A power cut cuts off the last line; a damaged card garbles one anywhere. Only
            # those go: the events after a garbled line are still sent. Their bytes are not
            # kept elsewhere (events carry phone numbers, and no retention would reach them).
            logger.warning("%s: dropping %d damaged line(s) (at byte(s) %s; %d bytes); the "
                           "%d whole line(s) are kept", self._path, len(dropped),
                           ", ".join(str(offset) for offset, _ in dropped[:10]),
                           sum(size for _, size in dropped), len(kept))
            self._rewrite(b"".join(kept))

    def _rewrite(self, data: bytes) -> None:
        """Replace the outbox file whole: the old one or the new one, never half of each."""
        tmp = self._path.with_name(OUTBOX_NAME + ".tmp")
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        fsync_dir(self._path.parent)

    def _write_acked(self) -> None:
        tmp = self._acked_path.with_name(ACKED_NAME + ".tmp")
        with open(tmp, "w", encoding="ascii") as out:
            out.write(f"{self.acked}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._acked_path)

    def _compact(self) -> None:
        # Everything in the file is acknowledged and the watermark says so: start it over.
        self._file.close()
        with open(self._path, "wb") as fresh:
            os.fsync(fresh.fileno())
        fsync_dir(self._path.parent)
        self._file = open(self._path, "ab")  # noqa: SIM115


def _parse_line(raw: bytes) -> OutboxEntry | None:
    """One outbox line as ``append`` writes it, or None for a line cut off or garbled: the
    ``seq`` outside and inside the event must agree."""
    if not raw.endswith(b"\n"):
        return None
    try:
        item = json.loads(raw)
        seq, topic, payload = item["seq"], item["topic"], item["payload"]
        event = json.loads(payload)
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if type(seq) is not int or seq < 1 or not isinstance(topic, str) \
            or not isinstance(event, dict) or event.get("seq") != seq:
        return None
    return OutboxEntry(seq, topic, payload)
