"""Changing the config of a running recorder (``config/set`` and ``reload`` over MQTT).

A change is checked by the same loader as the file, written to the file atomically, and
applied without dropping calls: what a line does on a call (its disclosures, number rules,
timeouts) changes when that line has no call; what the devices are (ALSA, GPIO pins, audio,
storage, broker, encryption) is saved and applies at the next restart, and the reply says which.
"""

from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from linerec.audio.recording import fsync_dir
from linerec.daemon.config import Config, ConfigError, config_from_dict

LIVE = ("purpose", "disclosure", "numbers")
"""Top-level tables a running recorder takes on at once (between calls)."""
LINE_WIRING = ("capture", "channel", "playback", "playback_channel", "hook_pin", "ring_pin",
               "led_pin", "polarity_pin", "hook_active_high", "ring_active_high",
               "polarity_active_high")
"""A line's keys that name hardware: opened at start-up, so they change at a restart."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: tables merge key by key, null removes a key, anything else
    (lists included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def read_config_data(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(str(path), "(file)", f"cannot be read: {exc}") from exc


def patched_config(path: Path, patch: dict[str, Any]
                   ) -> tuple[Config, dict[str, Any], dict[str, Any]]:
    """The config file with ``patch`` merged in, checked; raises ConfigError naming the key.
    Nothing is written. Returns the config, its data and the file's data before."""
    before = read_config_data(path)
    data = merge_patch(before, patch)
    return config_from_dict(data, source=str(path), base=path.parent), data, before


def write_config(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync, rename, fsync the folder: the file is the old one or the new one."""
    text = ("# Written by linerec (config/set over MQTT); the keys are those of "
            "docs/CONFIG.md.\n" + tomli_w.dumps(data))
    tmp = path.with_name(path.name + ".tmp")
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o640
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full card or an I/O error half-way: the old file stands, and no stray .tmp
        # is left for the next write (or an installer) to trip over.
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(keys applied between calls, keys that wait for a restart)."""
    live: list[str] = []
    restart: list[str] = []
    for name in ("storage", "device_id", "audio", "capture", "playback", "mqtt", "hat",
                 "service_led_pin", "storage_guard", "encryption"):
        if getattr(old, name) != getattr(new, name):
            restart.append(name)
    for name in LIVE:
        if getattr(old, name) != getattr(new, name):
            live.append(name)
    old_lines = {line.name: line for line in old.line}
    new_lines = {line.name: line for line in new.line}
    for name in sorted(set(old_lines) ^ set(new_lines)):
        restart.append(f"line.{name}")
    for name in sorted(set(old_lines) & set(new_lines)):
        before, after = old_lines[name], new_lines[name]
        for key in before.__dataclass_fields__:
            if getattr(before, key) != getattr(after, key):
                (restart if key in LINE_WIRING else live).append(f"line.{name}.{key}")
    return live, restart
