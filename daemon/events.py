"""The one event schema of linerec and the sinks that carry events out (log, stdout, MQTT)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, TextIO

logger = logging.getLogger(__name__)


class EventKind(StrEnum):
    CALL_STARTED = "call_started"
    RINGING = "ringing"
    RINGING_STOPPED = "ringing_stopped"
    CALLER_ID = "caller_id"
    CALL_ANSWERED = "call_answered"
    DISCLOSURE_STARTED = "disclosure_started"
    DISCLOSURE_COMPLETED = "disclosure_completed"
    DISCLOSURE_FAILED = "disclosure_failed"
    RECORDING_STARTED = "recording_started"
    RECORDING_STOPPED = "recording_stopped"
    CALL_ENDED = "call_ended"
    RECORDING_RECOVERED = "recording_recovered"
    RECORDING_DELETED = "recording_deleted"
    LINE_FAULT = "line_fault"
    LINE_RECOVERED = "line_recovered"
    STORAGE_LOW = "storage_low"
    STORAGE_FULL = "storage_full"
    STORAGE_OK = "storage_ok"
    CHECK_FAILED = "check_failed"
    ERROR = "error"


def iso_ms(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. 2026-11-29T12:00:00.000Z."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(
    kind: EventKind, *, line: str | None, call_id: str | None, ts: datetime, **fields: Any
) -> dict[str, Any]:
    """Every event has event, line, call_id and ts; the rest depends on the kind."""
    return {"event": str(kind), "line": line, "call_id": call_id, "ts": iso_ms(ts), **fields}


class EventSink(Protocol):
    def publish(self, event: dict[str, Any]) -> None: ...


class EventBus:
    """Hands each event to every sink in turn; a failing sink never stops the others."""

    def __init__(self, sinks: Iterable[EventSink] = ()) -> None:
        self._sinks = list(sinks)
        self._lock = threading.Lock()

    def add(self, sink: EventSink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def emit(self, event: dict[str, Any]) -> None:
        # Lines on different capture devices emit from different engine threads; the lock
        # keeps each sink's view in order.
        with self._lock:
            for sink in self._sinks:
                try:
                    sink.publish(event)
                except Exception:
                    logger.exception("event sink %r failed on %s", sink, event.get("event"))


# Key events get a journald MESSAGE_ID so that `journalctl MESSAGE_ID=...` finds them.
MESSAGE_IDS = {
    EventKind.CALL_STARTED: "6f1c2d0e8a5b4c7e9d3f2a1b0c4d5e6f",
    EventKind.DISCLOSURE_FAILED: "0b7e4f2a9c1d4e8fa6b3c5d7e9f1a2b4",
    EventKind.RECORDING_STOPPED: "3a5c7e9f1b2d4f6a8c0e2a4c6e8fab1d",
    EventKind.LINE_FAULT: "81df127031f14e39a4b8a4b21ca924b6",
    EventKind.RECORDING_DELETED: "c3a3e97070ce4416b0e32d049a75fab4",
    EventKind.STORAGE_LOW: "81c6c68809824184959f5ccc5e60f137",
    EventKind.STORAGE_FULL: "10fcb177149b4e03ad963ffbb22f9f1e",
    EventKind.CHECK_FAILED: "d90ec43c43ad4752b3587fd9a797669a",
}


def journal_fields(*, line: str | None = None, call_id: str | None = None,
                   message_id: str | None = None) -> dict[str, str]:
    """A log record's journald fields (``extra=``): LINE and CALL_ID where known, and
    MESSAGE_ID for the key events, so that `journalctl LINE=line1` or `journalctl
    MESSAGE_ID=...` finds them (docs/EVENTS.md lists the ids)."""
    fields = {"LINE": line, "CALL_ID": call_id, "MESSAGE_ID": message_id}
    return {key: value for key, value in fields.items() if value}


WARNINGS = {EventKind.DISCLOSURE_FAILED, EventKind.ERROR, EventKind.LINE_FAULT,
            EventKind.STORAGE_LOW, EventKind.STORAGE_FULL, EventKind.CHECK_FAILED}


class LogSink:
    """Every event is logged, broker or no broker."""

    def __init__(self) -> None:
        self._log = logging.getLogger("linerec.events")

    def publish(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        details = {k: v for k, v in event.items() if k not in ("event", "line", "call_id", "ts")}
        extra = journal_fields(line=event.get("line"), call_id=event.get("call_id"),
                               message_id=MESSAGE_IDS.get(EventKind(kind)))
        level = (logging.WARNING if kind in WARNINGS else logging.INFO)
        self._log.log(level, "%s line=%s call=%s %s", kind, event.get("line"),
                      event.get("call_id"), json.dumps(details, sort_keys=True), extra=extra)


class JsonLinesSink:
    """One JSON object per line on a stream (the simulator's stdout)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def publish(self, event: dict[str, Any]) -> None:
        self._stream.write(json.dumps(event) + "\n")
        self._stream.flush()
