"""Commands over MQTT: ``<prefix>/<device_id>/cmd/<name>`` in, ``.../reply`` out.

A request is a JSON object ``{"request_id": "...", "args": {...}}``; every request gets
exactly one reply ``{"request_id": ..., "command": ..., "ok": true, "result": ...}`` or
``{"request_id": ..., "command": ..., "ok": false, "error": {"key": ..., "problem": ...}}``.
A request that fails changes nothing. Call ids are checked against their exact form and
looked up, never joined into paths, so nothing from MQTT reaches outside the storage.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from linerec.audio.pcm import AudioFileError
from linerec.daemon import archive
from linerec.daemon.config import NAME_PATTERN, Config, ConfigError
from linerec.daemon.reconfigure import changes, patched_config, write_config

logger = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_PAYLOAD = 64 * 1024
MAX_CALL_IDS = 1000


TestDisclosure = Callable[[str, str, Path | None], dict[str, Any]]
"""(line, direction, render to this file or None to play) -> what played or was rendered."""


class BadRequest(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class Configurator:
    """``config/set`` and ``reload``: checked like the file, written atomically, applied
    between calls (docs/MQTT.md)."""

    def __init__(self, path: Path | None, running: Config,
                 apply: Callable[[Config], None]) -> None:
        self._path = path
        self._running = running
        """What the devices were opened with: changes to them wait for a restart."""
        self._current = running
        self._apply = apply
        self.restart_pending = False
        """A saved change waits for a restart: the daemon restarts once every line is free."""

    def set(self, args: dict[str, Any]) -> Any:
        _only(args, {"config": True})
        patch = args["config"]
        if not isinstance(patch, dict):
            raise BadRequest("args.config", "expected a JSON object: the keys to change, as in "
                             "the config file (null removes a key)")
        return self._take(patch, write=True)

    def reload(self, args: dict[str, Any]) -> Any:
        _only(args, {})
        return self._take({}, write=False)

    def _take(self, patch: dict[str, Any], *, write: bool) -> Any:
        if self._path is None:
            raise BadRequest("(config)", "this daemon runs on a built-in config: there is no "
                             "config file to change")
        try:
            new, data, before = patched_config(self._path, patch)
        except ConfigError as exc:
            raise BadRequest(f"config.{exc.key}", exc.problem) from None
        live, _ = changes(self._current, new)
        _, restart = changes(self._running, new)
        if write and data != before:
            write_config(self._path, data)  # an OSError here: nothing written, nothing applied
        self._current = new
        self._apply(new)
        self.restart_pending = bool(restart)
        return {"applied": live, "restart_required": restart}


class CommandHandler:
    """Turns one request into its reply; the MQTT side only carries bytes."""

    def __init__(self, storage: Path, status: Callable[[], dict[str, Any]],
                 country_code: str = "31", configurator: Configurator | None = None,
                 test_disclosure: TestDisclosure | None = None) -> None:
        self._storage = storage
        self._status = status
        self._country_code = country_code
        self._test_disclosure = test_disclosure
        self._commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": self._cmd_status,
            "find": self._cmd_find,
            "export-list": self._cmd_export_list,
            "delete": self._cmd_delete,
            "hold": self._cmd_hold,
            "release": self._cmd_release,
        }
        if test_disclosure is not None:
            self._commands["test-disclosure"] = self._cmd_test_disclosure
        if configurator is not None:
            self._commands["config/set"] = configurator.set
            self._commands["reload"] = configurator.reload

    @property
    def names(self) -> list[str]:
        return list(self._commands)

    def handle(self, name: str, payload: bytes) -> dict[str, Any]:
        request_id = None
        try:
            request = _load(payload)
            request_id = _request_id(request)
            args = _args(request)
            command = self._commands.get(name)
            if command is None:
                raise BadRequest("(topic)", f"no command {name!r}; commands: "
                                 f"{', '.join(self._commands)}")
            result = command(args)
        except BadRequest as exc:
            return _reply(request_id, name, error={"key": exc.key, "problem": exc.problem})
        except archive.ArchiveError as exc:
            return _reply(request_id, name, error={"key": "args", "problem": str(exc)})
        except OSError as exc:
            logger.error("command %s failed: %s", name, exc)
            return _reply(request_id, name, error={"key": "(storage)",
                                                   "problem": f"the storage failed: {exc}"})
        return _reply(request_id, name, result=result)

    # ---- the commands --------------------------------------------------------------------

    def _cmd_status(self, args: dict[str, Any]) -> Any:
        _only(args, {})
        return self._status()

    def _cmd_test_disclosure(self, args: dict[str, Any]) -> Any:
        """Play a line's disclosure into it (off-hook, no call), or render it to a file in
        the storage (``render``: true), for an installer to hear what callers hear."""
        _only(args, {"line": True, "direction": False, "render": False})
        line = _text(args, "line")
        if not NAME_PATTERN.fullmatch(line):
            raise BadRequest("args.line", "not a line name")
        direction = args.get("direction", "inbound")
        if direction not in ("inbound", "outbound"):
            raise BadRequest("args.direction", "inbound or outbound")
        render = args.get("render", False)
        if not isinstance(render, bool):
            raise BadRequest("args.render", "true or false")
        name = f"test-disclosure-{line}.wav"
        assert self._test_disclosure is not None
        try:
            result = self._test_disclosure(line, direction,
                                           self._storage / name if render else None)
        except (ValueError, AudioFileError) as exc:
            raise BadRequest("args.line", str(exc)) from None
        return {**result, "played": not render, "file": name if render else None}

    def _cmd_find(self, args: dict[str, Any]) -> Any:
        selection = self._selection(args, {})
        holds = archive.current_holds(self._storage)
        return [archive.call_summary(call, call.call_id in holds, relative_to=self._storage)
                for call in archive.find_calls(self._storage, selection)]

    def _cmd_export_list(self, args: dict[str, Any]) -> Any:
        """What an export would hold (for a data subject request): each call's files,
        relative to the storage, with their sha256 from the receipt."""
        if "call_ids" in args:
            _only(args, {"call_ids": True})
            calls = archive.resolve_calls(self._storage, _call_ids(args))
        else:
            calls = archive.find_calls(self._storage, self._selection(args, {}))
        listed = []
        for call in calls:
            recording = archive.section(call.receipt, "recording")
            file = call.recording_file
            listed.append({
                "call_id": call.call_id,
                "receipt": str(call.receipt_path.relative_to(self._storage)),
                "recording": str(file.relative_to(self._storage)) if file else None,
                "recording_sha256": recording.get("sha256") if file else None,
            })
        return listed

    def _cmd_delete(self, args: dict[str, Any]) -> Any:
        _only(args, {"call_ids": True, "reason": True})
        done = archive.delete_calls(self._storage, _call_ids(args), _text(args, "reason"))
        return [{"call_id": d.call_id, "files": d.files} for d in done]

    def _cmd_hold(self, args: dict[str, Any]) -> Any:
        _only(args, {"call_ids": True, "reason": True})
        return archive.hold_calls(self._storage, _call_ids(args), _text(args, "reason"))

    def _cmd_release(self, args: dict[str, Any]) -> Any:
        _only(args, {"call_ids": True, "reason": False})
        reason = _text(args, "reason") if "reason" in args else None
        return archive.release_calls(self._storage, _call_ids(args), reason)

    def _selection(self, args: dict[str, Any], extra: dict[str, bool]) -> archive.CallFilter:
        _only(args, {"number": False, "from": False, "to": False, "line": False, **extra})
        try:
            return archive.CallFilter(
                number=_text(args, "number") if "number" in args else None,
                date_from=_date(args, "from"), date_to=_date(args, "to"),
                line=_text(args, "line") if "line" in args else None,
                country_code=self._country_code)
        except ValueError as exc:
            key = "args.number" if "number" in str(exc) else "args.from"
            raise BadRequest(key, str(exc)) from None


def _reply(request_id: str | None, command: str, *, result: Any = None,
           error: dict[str, str] | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"request_id": request_id, "command": command, "ok": error is None}
    if error is None:
        reply["result"] = result
    else:
        reply["error"] = error
    return reply


def _load(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise BadRequest("(payload)", f"larger than {MAX_PAYLOAD} bytes")
    try:
        request = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest("(payload)", f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest("(payload)", 'expected a JSON object: {"request_id": "...", '
                         '"args": {...}}')
    try:
        # JSON may escape half a surrogate pair (\ud800): no file, log or reply can hold it.
        json.dumps(request, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("(payload)", "a string in it is not valid Unicode (a lone "
                         "surrogate escape)") from None
    return request


def _request_id(request: dict[str, Any]) -> str:
    request_id = request.get("request_id")
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise BadRequest("request_id", "required: 1-64 letters, digits, '_', '.', ':' or '-'")
    return request_id


def _args(request: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(request) - {"request_id", "args"})
    if unknown:
        raise BadRequest(str(unknown[0]), "unknown key; a request has request_id and args")
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise BadRequest("args", "expected a JSON object")
    return args


def _only(args: dict[str, Any], allowed: dict[str, bool]) -> None:
    """``allowed``: key -> required."""
    for key in sorted(args):
        if key not in allowed:
            raise BadRequest(f"args.{key}", f"unknown; allowed: {', '.join(allowed) or 'none'}")
    for key, required in allowed.items():
        if required and key not in args:
            raise BadRequest(f"args.{key}", "required")


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value.strip() or len(value) > 500:
        raise BadRequest(f"args.{key}", "expected a non-empty string of at most 500 characters")
    return value


def _date(args: dict[str, Any], key: str) -> date | None:
    if key not in args:
        return None
    value = args[key]
    try:
        if not isinstance(value, str):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"args.{key}", "expected a date as YYYY-MM-DD") from None


def _call_ids(args: dict[str, Any]) -> list[str]:
    value = args.get("call_ids")
    if not isinstance(value, list) or not value or len(value) > MAX_CALL_IDS \
            or not all(isinstance(v, str) for v in value):
        raise BadRequest("args.call_ids", f"expected a list of 1 to {MAX_CALL_IDS} call ids")
    return value
