"""The per-call receipt: the JSON beside a recording that shows what happened on the call.

A receipt is written ``open`` while its call goes on (``write_receipt``) and sealed when the
call is over (``seal_receipt``): it gets the next place in the appliance's receipt chain,
naming the sha256 of the receipt sealed before it, and the audit log records its sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from linerec.audio.recording import fsync_dir
from linerec.daemon.ledger import Ledger, sha256_hex
from linerec.daemon.paths import check_call_id, make_call_folder

logger = logging.getLogger(__name__)

SEALED_STATES = ("closed", "interrupted")
"""A receipt in one of these states is final and belongs in the chain."""
RECEIPT_TMP_SUFFIX = ".tmp"
"""``<call_id>.json.tmp``: a receipt being written; renamed over the receipt once whole."""
CORRUPT_SUFFIX = ".corrupt"
"""``<call_id>.json.corrupt``: a receipt the start-up found unreadable, moved aside with its
bytes as they were (``linerec verify`` reports it until a person removes it)."""


def encode_receipt(receipt: dict[str, Any]) -> bytes:
    """The exact bytes of a receipt file: its sha256 is taken of these."""
    return (json.dumps(receipt, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_receipt(path: Path, receipt: dict[str, Any]) -> None:
    """Write atomically (temp file, fsync, rename) so a receipt is whole or absent."""
    _write_bytes(path, encode_receipt(receipt))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (recordings run to megabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def seal_receipt(storage: Path, path: Path, receipt: dict[str, Any], *,
                 supersedes: str | None = None) -> str:
    """Write a final receipt as the next link of the chain and record it in the audit log;
    returns the sha256 of the receipt file.

    Under the audit log's lock: ``receipt["chain"]`` is set to the next seq and the sha256
    of the receipt sealed before, the file is written, the log line appended. A crash
    between the two leaves a receipt one past the log's head, which the start-up recovery
    records (once). A receipt that was sealed already (it has a ``chain``: recovery amending
    it) is sealed again as a new link that names the version it supersedes; so is one
    made anew in place of a sealed receipt that could no longer be read (``supersedes``:
    the sha256 the audit log holds for that one).
    """
    if receipt.get("state") not in SEALED_STATES:
        raise ValueError(f"receipt {path} is {receipt.get('state')!r}: only a closed or "
                         "interrupted receipt is sealed")
    call_id = check_call_id(str(receipt.get("call_id")))
    relative = path.resolve().relative_to(storage.resolve()).as_posix()
    if supersedes is None and "chain" in receipt and path.exists():
        supersedes = file_sha256(path)
    try:
        with Ledger(storage).locked() as ledger:
            receipt["chain"] = {"seq": ledger.head.seq + 1,
                                "previous_sha256": ledger.head.sha256}
            data = encode_receipt(receipt)
            sha = sha256_hex(data)
            _write_bytes(path, data)
            ledger.append_receipt(call_id=call_id, path=relative, sha256=sha,
                                  supersedes=supersedes)
    except OSError:
        # The audit log cannot be written (disk full, say). The call's ending is still
        # written, without a chain: a receipt claiming a place in the chain would collide
        # with the next one, and the next start's recovery seals one without.
        receipt.pop("chain", None)
        with contextlib.suppress(OSError):
            write_receipt(path, receipt)
        raise
    return sha


def _write_bytes(path: Path, data: bytes) -> None:
    make_call_folder(path.parent)
    tmp = path.with_name(path.name + RECEIPT_TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError:
        # A disk full half-way: the cut-off copy would only take room (the receipt itself
        # is as it was).
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)
