"""The one place that names files: storage layout, call ids, recordings and receipts."""

from __future__ import annotations

import contextlib
import errno
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
RESERVE_NAME = ".linerec-reserve"
"""Space set aside on the storage for closing recordings and writing receipts once the
storage is full (``storage_guard.StorageState``). At the storage's top, where no call's
files are looked for."""


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


def make_call_folder(folder: Path) -> None:
    """Make a call's ``<YYYY>/<MM>/<DD>`` folder (``call_folder``), one level at a time and
    never the storage above it: a storage folder that was removed, or a card whose mount
    point is left bare, is not made again by a write. A recording there would go where
    nobody looks for it, next to a new audit log that forks the receipt chain; the write
    fails instead, and the storage guard says why."""
    if folder.is_dir():
        return
    top = folder.parents[2]
    if not top.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"the storage {top} is gone (unmounted, or "
                                "the folder removed); it is not made again by a write",
                                str(top))
    for level in (folder.parents[1], folder.parents[0], folder):
        with contextlib.suppress(FileExistsError):
            level.mkdir(mode=0o700)  # no parents=True: the storage must be there already


def recording_path(storage: Path, call_id: str, started: datetime) -> Path:
    return call_folder(storage, started) / (check_call_id(call_id) + RECORDING_SUFFIX)


def receipt_path(storage: Path, call_id: str, started: datetime) -> Path:
    return call_folder(storage, started) / (check_call_id(call_id) + RECEIPT_SUFFIX)


def reserve_path(storage: Path) -> Path:
    return storage / RESERVE_NAME
