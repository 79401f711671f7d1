"""Encryption at rest: closed recordings sealed to the installer's age public keys.

The only importer of pyrage. A recording is written in plain Ogg Opus while its call
records (pages synced as they come, so a crash loses under a second) and sealed when it is
closed: encrypted to ``<call_id>.opus.age`` under a temporary name, synced, renamed, and
only then is the plaintext removed. The private key never comes onto the appliance:
``linerec decrypt`` opens a sealed recording elsewhere. Sealing runs in its own thread
(``RecordingSealer``), never in an engine: an engine that stalls starves the line outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pyrage
from pyrage import x25519

from linerec.audio.recording import fsync_dir
from linerec.daemon.paths import RECEIPT_SUFFIX, RECORDING_SUFFIX, SEALED_SUFFIX

logger = logging.getLogger(__name__)

AGE_FORMAT = "age"
TMP_SUFFIX = ".tmp"
"""A sealed recording is written as ``<call_id>.opus.age.tmp`` and renamed when synced."""
RECIPIENT_PREFIX = "age1"
SECRET_KEY_PREFIX = "AGE-SECRET-KEY-"  # noqa: S105 - the form of a key, to refuse one

T = TypeVar("T")


def check_recipient(value: str) -> None:
    """An age X25519 public key (``age1...``); raises ValueError saying what is wrong."""
    if value.strip().upper().startswith(SECRET_KEY_PREFIX):
        raise ValueError("this is a private key (AGE-SECRET-KEY-...); put only the public key "
                         "(age1..., the `# public key:` line of the key file, or "
                         "`age-keygen -y KEYFILE`) here, and keep the private key off the "
                         "appliance")
    if not value.startswith(RECIPIENT_PREFIX):
        raise ValueError(f"{value!r} is not an age public key; give the age1... line that "
                         "`age-keygen` printed as the public key")
    try:
        x25519.Recipient.from_str(value)
    except pyrage.RecipientError as exc:
        raise ValueError(f"{value!r} is not a valid age public key ({exc}); copy it again "
                         "from `age-keygen -y KEYFILE`") from None


def describe(recipients: Sequence[str]) -> dict[str, Any]:
    """What a receipt says of a sealed recording: ``recording.encrypted``."""
    return {"format": AGE_FORMAT, "recipients": list(recipients)}


def sealed_path(plain: Path) -> Path:
    """``<call_id>.opus`` -> ``<call_id>.opus.age``."""
    return plain.with_name(plain.name + SEALED_SUFFIX)


@dataclass(frozen=True)
class Sealed:
    path: Path
    sha256: str
    """Of the sealed file's bytes: what the receipt keeps and `linerec verify` checks."""
    bytes: int


class _HashingWriter:
    """Hashes what is written on its way to the file, so the sealed file is not read back."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


def seal_recording(plain: Path, recipients: Sequence[str]) -> Sealed:
    """Encrypt the closed recording ``plain`` to ``<name>.age`` for every recipient, make
    it durable, then remove the plaintext. A crash at any point leaves the plaintext (the
    start-up recovery seals it again) or the complete sealed file, never neither."""
    keys = [x25519.Recipient.from_str(value) for value in recipients]
    sealed = sealed_path(plain)
    tmp = sealed.with_name(sealed.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, plain.open("rb") as source:
            writer = _HashingWriter(out)
            pyrage.encrypt_io(source, writer, keys)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, sealed)
    fsync_dir(sealed.parent)
    # The sealed file and its name are on the disk: the plaintext may go.
    plain.unlink()
    fsync_dir(plain.parent)
    return Sealed(sealed, writer.digest.hexdigest(), writer.size)


def read_identities(path: Path) -> list[Any]:
    """The age X25519 identities of a key file as ``age-keygen`` writes it (``#`` comments,
    one ``AGE-SECRET-KEY-1...`` a line); raises ValueError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read: {exc}") from None
    identities = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise ValueError(f"{path}: line {number} is not an age private key "
                             "(AGE-SECRET-KEY-1...); give the key file `age-keygen` "
                             "wrote") from None
    if not identities:
        raise ValueError(f"{path}: holds no age private key (AGE-SECRET-KEY-1...)")
    return identities


class DecryptError(ValueError):
    """A sealed file that the identities cannot open, or that is damaged."""


def open_sealed(sealed: Path, out: Path, identities: Sequence[Any]) -> int:
    """Decrypt ``sealed`` to the new file ``out`` (never over an existing one); returns
    its size. Nothing is left at ``out`` when decryption fails."""
    tmp = out.with_name(f".{out.name}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as target, sealed.open("rb") as source:
            pyrage.decrypt_io(source, target, list(identities))
            size = target.tell()
            target.flush()
            os.fsync(target.fileno())
        os.link(tmp, out)  # fails rather than replace a file made meanwhile
    except pyrage.DecryptError as exc:
        raise DecryptError(f"cannot be decrypted with this key ({exc}): it was sealed to "
                           "another key, or it is damaged") from None
    finally:
        tmp.unlink(missing_ok=True)
    return size


class RecordingSealer:
    """The ``recording-seal`` thread: seals closed recordings and then seals their calls'
    receipts, in the order they were asked for (one thread, first in first out), so a
    receipt queued after its recording's seal finds the sealed file's hash."""

    def __init__(self, recipients: Sequence[str]) -> None:
        self.recipients = tuple(recipients)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recording-seal")

    @property
    def description(self) -> dict[str, Any]:
        return describe(self.recipients)

    def seal(self, plain: Path) -> Future[Sealed]:
        """Queue the sealing of a closed recording."""
        return self._pool.submit(seal_recording, plain, self.recipients)

    def then(self, work: Callable[[], T]) -> Future[T]:
        """Queue work that must come after every seal queued so far; nobody waits for its
        result, so what it raises is logged here."""
        return self._pool.submit(_logged, work)

    def close(self) -> None:
        """Finish what is queued (the service stops after its calls are closed)."""
        self._pool.shutdown(wait=True)


def sealed_recordings(source: Path) -> list[Path]:
    """``source`` itself (a sealed file), or every sealed recording below the folder
    ``source`` (an export, a copy of the storage); raises ValueError saying what to give."""
    if source.is_file():
        if not source.name.endswith(SEALED_SUFFIX):
            raise ValueError(f"{source} is not a sealed recording (<call_id>.opus.age)")
        return [source]
    if not source.is_dir():
        raise ValueError(f"{source} does not exist; give a .opus.age file or a folder of them "
                         "(unzip a .zip export first)")
    found = sorted(p for p in source.rglob(f"*{RECORDING_SUFFIX}{SEALED_SUFFIX}") if p.is_file())
    if not found:
        raise ValueError(f"{source}: no sealed recording (*.opus.age) below this folder")
    return found


def hash_in_receipt(sealed: Path) -> str | None:
    """The sha256 that the receipt beside ``sealed`` keeps for it, or None when there is no
    such receipt (a recording copied out alone). Raises ValueError when the receipt is
    there but unreadable or names another file."""
    call_id = sealed.name.split(".", 1)[0]
    receipt_file = sealed.with_name(call_id + RECEIPT_SUFFIX)
    if not receipt_file.is_file():
        return None
    try:
        receipt = json.loads(receipt_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"its receipt {receipt_file} cannot be read ({exc})") from None
    recording = receipt.get("recording") if isinstance(receipt, dict) else None
    if not isinstance(recording, dict) or recording.get("file") != sealed.name \
            or not isinstance(recording.get("sha256"), str):
        raise ValueError(f"its receipt {receipt_file} names no sha256 for {sealed.name}")
    return str(recording["sha256"])


def _logged(work: Callable[[], T]) -> T:
    try:
        return work()
    except Exception:
        logger.exception("work queued after the sealing of recordings failed")
        raise
