"""The per-call receipt: the JSON beside a recording that shows what happened on the call."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from linerec.audio.recording import fsync_dir


def write_receipt(path: Path, receipt: dict[str, Any]) -> None:
    """Write atomically (temp file, fsync, rename) so a receipt is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(receipt, out, indent=2, sort_keys=True)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
