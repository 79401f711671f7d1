"""The one place that names files: storage layout, call ids, recordings and receipts."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

CALL_ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[a-z0-9][a-z0-9_-]{0,31}-[0-9a-f]{6}$")
RECORDING_SUFFIX = ".opus"
RECEIPT_SUFFIX = ".json"
SEALED_SUFFIX = ".age"
"""A recording sealed to the installer's public keys (``[encryption]``) is
``<call_id>.opus.age``: the Ogg Opus file inside an age file."""


def new_call_id(line: str, started: datetime) -> str:
    """``<UTC start>-<line>-<6 hex>``: sortable by time, safe as a file name, unique."""
    stamp = started.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    call_id = f"{stamp}-{line}-{secrets.token_hex(3)}"
    return check_call_id(call_id)


def check_call_id(value: str) -> str:
    """Call ids come back from outside (MQTT, receipts): accept only the exact form."""
    if not CALL_ID_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a linerec call id (like 20261129T120000Z-line1-0a1b2c)")
    return value


def call_folder(storage: Path, started: datetime) -> Path:
    """``<storage>/<YYYY>/<MM>/<DD>`` of the call's UTC start."""
    day = started.astimezone(UTC)
    return storage / f"{day.year:04d}" / f"{day.month:02d}" / f"{day.day:02d}"


def recording_path(storage: Path, call_id: str, started: datetime) -> Path:
    return call_folder(storage, started) / (check_call_id(call_id) + RECORDING_SUFFIX)


def receipt_path(storage: Path, call_id: str, started: datetime) -> Path:
    return call_folder(storage, started) / (check_call_id(call_id) + RECEIPT_SUFFIX)
