"""Bad config input: every key of the config dataclasses with a wrong type, out of its range,
or beside an unknown key; broken, missing and unreadable files. Each is a ConfigError naming
the file and the exact key, `linerec check-config` says it in one line (exit 2), and a bad
`config/set` or `reload` leaves the file and the running config as they were."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import json
import math
import os
import re
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st
from simhelpers import linerec, sim_config
from test_fuzz import fuzz

from linerec.daemon.cli import EXIT_CONFIG, cmd_check_config
from linerec.daemon.commands import CommandHandler, Configurator
from linerec.daemon.config import Config, ConfigError, Secret, load_config
from linerec.daemon.reconfigure import write_config

GUIDANCE = re.compile(r"\b(use|expected|known keys|required|add|pass|give|name|set)\b")
"""A problem says what to do, not only what is wrong."""
BROKER = ("127.0.0.1", 1883)

# ---------------------------------------------------------------------------------------
# The cases, generated from the config dataclasses: a new key gets its cases by itself.


@dataclasses.dataclass(frozen=True)
class Case:
    path: tuple[str | int, ...]
    """Where the bad value goes in the config's data (an int indexes a list of tables)."""
    value: Any
    key: str
    """The key the error must name."""
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.key}={self.value!r}"


def _plain(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(hint) in (Union, types.UnionType):
        return next(a for a in get_args(hint) if a is not type(None))
    return hint


def _table_of(hint: Any) -> type | None:
    """The dataclass a field holds, as one table or a list of them."""
    hint = _plain(hint)
    if get_origin(hint) is tuple:
        hint = get_args(hint)[0]
    return hint if dataclasses.is_dataclass(hint) else None


def _fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("internal"):
            yield f, hints[f.name]


def key_name(path: tuple[str | int, ...]) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def filler(cls: type) -> dict[str, Any]:
    """A table of ``cls`` with its required keys set to values of the right type: enough
    for the loader's type and range checks to reach the key under test."""
    table: dict[str, Any] = {}
    for f, hint in _fields(cls):
        if f.default is not dataclasses.MISSING:
            continue
        table[f.name] = _right_type(f, _plain(hint))
    return table


def _right_type(f: dataclasses.Field[Any], hint: Any) -> Any:
    nested = _table_of(hint)
    if get_origin(hint) is tuple:
        return [filler(nested)] if nested else []
    if nested:
        return filler(nested)
    lo, choices = f.metadata.get("min"), f.metadata.get("choices")
    if choices:
        return choices[0]
    if hint is bool:
        return True
    if hint is int:
        return int(lo or 0)
    if hint is float:
        return float(lo or 0.0)
    return "x"


def wrong_types(hint: Any) -> list[tuple[Any, str]]:
    """(value of another type, what the key named gets appended: an item's index)."""
    hint = _plain(hint)
    if get_origin(hint) is tuple:
        return [("x", ""), ([7], "[0]" if _table_of(hint) else "")]
    if dataclasses.is_dataclass(hint):
        return [(7, ""), ([{}], "")]
    return {
        bool: [("yes", ""), (1, "")],
        int: [("7", ""), (7.5, ""), (True, "")],
        float: [("7.5", ""), (True, "")],
        str: [(7, ""), (["x"], "")],
        Secret: [(7, ""), (["x"], "")],
        Path: [(7, ""), ("", "")],
    }[hint]


def out_of_range(f: dataclasses.Field[Any], hint: Any) -> list[Any]:
    hint = _plain(hint)
    lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
    values: list[Any] = []
    if choices:
        values.append(max(choices) + 1 if hint is int else "bogus")
    if lo is not None:
        values.append(lo - 1 if hint is int else lo - max(0.01, abs(lo) / 2))
        if hint is float:
            values.append(-math.inf)
    if hi is not None:
        values.append(hi + 1 if hint is int else hi * 2 + 1)
        if hint is float:
            values.append(math.inf)
    return values


def cases() -> Iterator[Case]:
    def walk(cls: type, where: tuple[str | int, ...]) -> Iterator[Case]:
        yield Case((*where, "colour"), "red", key_name((*where, "colour")), "unknown")
        for f, hint in _fields(cls):
            path = (*where, f.name)
            for value, suffix in wrong_types(hint):
                yield Case(path, value, key_name(path) + suffix, "type")
            for value in out_of_range(f, hint):
                yield Case(path, value, key_name(path), "range")
            nested = _table_of(hint)
            if nested is not None:
                inner = _plain(hint)
                yield from walk(nested, (*path, 0) if get_origin(inner) is tuple else path)

    yield from walk(Config, ())


CASES = list(cases())


def nan_cases() -> list[Case]:
    """Every float key set to NaN: TOML's `nan` passes the loader's range checks."""
    def walk(cls: type, where: tuple[str | int, ...]) -> Iterator[Case]:
        for f, hint in _fields(cls):
            path = (*where, f.name)
            if _plain(hint) is float:
                yield Case(path, math.nan, key_name(path), "nan")
            nested = _table_of(hint)
            if nested is not None:
                inner = _plain(hint)
                yield from walk(nested, (*path, 0) if get_origin(inner) is tuple else path)

    return list(walk(Config, ()))


def full_data(tmp_path: Path) -> dict[str, Any]:
    """The simulated layout with a broker, and every table it leaves out filled in with
    values of the right type."""
    tmp_path.mkdir(exist_ok=True)
    data = tomllib.loads(sim_config(tmp_path, BROKER).read_text())

    def fill(cls: type, table: dict[str, Any]) -> None:
        for f, hint in _fields(cls):
            nested = _table_of(hint)
            if nested is None:
                continue
            if f.name not in table:
                table[f.name] = _right_type(f, _plain(hint))
            value = table[f.name]
            for item in value if isinstance(value, list) else [value]:
                fill(nested, item)

    fill(Config, data)
    return data


def with_value(data: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(data)
    node: Any = changed
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return changed


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


def assert_names(path: Path, key: str) -> ConfigError:
    """load_config raises a ConfigError naming this file and key, and check-config says so
    in one line with exit status 2."""
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert (error.source, error.key) == (str(path), key), str(error)
    assert str(error).startswith(f"{path}: {key}: ")
    assert GUIDANCE.search(error.problem), f"says nothing about what to do: {error}"
    return error


def check_config_line(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What `linerec check-config PATH` prints: exit 2 and one line on stderr."""
    capsys.readouterr()
    assert cmd_check_config(argparse.Namespace(path=path)) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------------------
# Every key


def test_the_cases_reach_every_key_of_the_config() -> None:
    keys = {case.key.split("[")[0] for case in CASES if case.kind == "type"}
    assert {"storage", "line", "mqtt", "numbers", "audio", "storage_guard", "hat"} <= keys
    named = {case.key for case in CASES}
    for key in ("line[0].hook_pin", "audio.rate", "mqtt.password", "disclosure[0].parts[0].file",
                "purpose[0].lawful_basis", "numbers.never_record", "line[0].colour",
                "storage_guard.low_mb", "colour"):
        assert key in named, key
    assert len(CASES) > 200


@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_bad_key_is_a_config_error_naming_file_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Case) -> None:
    path = write(tmp_path / "bad.toml", with_value(full_data(tmp_path), case.path, case.value))
    assert_names(path, case.key)
    assert check_config_line(path, capsys).startswith(f"linerec: {path}: {case.key}: ")


@pytest.mark.parametrize("case", nan_cases(), ids=str)
def test_nan_is_out_of_range(tmp_path: Path, case: Case) -> None:
    data = tomllib.loads(sim_config(tmp_path).read_text())  # valid but for the NaN
    node: Any = data
    for step in case.path[:-1]:
        node = node.setdefault(step, {}) if isinstance(step, str) else node[step]
    node[case.path[-1]] = math.nan
    assert_names(write(tmp_path / "nan.toml", data), case.key)


# ---------------------------------------------------------------------------------------
# Whole files: broken, missing, unreadable


FILE_PROBLEMS = [
    # (what the file is, key, words)
    ("missing", "(file)", "not found"),
    ("a folder", "(file)", "cannot be read"),
    ("not UTF-8", "(file)", "cannot be read"),
    ("broken TOML", "(syntax)", "not valid TOML"),
    ("empty", "storage", "required"),
    ("a table where the top level is", "storage", "expected a path"),
]


def make_file(path: Path, what: str, valid: str) -> None:
    if what == "a folder":
        path.mkdir()
    elif what == "not UTF-8":
        path.write_bytes(valid.replace("office", "caf\xe9").encode("latin-1"))
    elif what == "broken TOML":
        path.write_text(valid.replace("[[line]]", "[[line]", 1))
    elif what == "empty":
        path.write_text("")
    elif what == "a table where the top level is":
        path.write_text("[storage]\n" + valid)


@pytest.mark.parametrize(("what", "key", "words"), FILE_PROBLEMS)
def test_a_broken_missing_or_unreadable_file_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, key: str,
        words: str) -> None:
    path = tmp_path / "problem.toml"
    make_file(path, what, sim_config(tmp_path).read_text())
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.source, caught.value.key) == (str(path), key), str(caught.value)
    assert words in caught.value.problem
    assert check_config_line(path, capsys).startswith(f"linerec: {path}: {key}: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_file_without_read_permission_is_named(tmp_path: Path) -> None:
    path = sim_config(tmp_path)
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(path)


@fuzz(150)
@given(data=st.data())
def test_mangled_files_are_a_config_error_or_a_config(tmp_path: Path, data: st.DataObject
                                                      ) -> None:
    """The valid file cut short, with bytes changed or inserted: a ConfigError naming the
    file (and a key, or the syntax), or a config; nothing else."""
    valid = (tmp_path / "valid.toml")
    if not valid.exists():
        sim_config(tmp_path, BROKER).rename(valid)
    text = bytearray(valid.read_bytes())
    cut = data.draw(st.integers(0, len(text)), label="cut")
    text = text[:cut] if data.draw(st.booleans(), label="cut it") else text
    for _ in range(data.draw(st.integers(0, 4), label="changes")):
        at = data.draw(st.integers(0, len(text)), label="at")
        new = data.draw(st.binary(min_size=1, max_size=3) | st.sampled_from(
            [b"[", b"]", b"=", b'"', b"\n", b"[[line]]\n", b"0x", b"\xff", b"nan", b"{"]),
            label="bytes")
        text[at : at + data.draw(st.integers(0, 3), label="replace")] = new
    path = tmp_path / "mangled.toml"
    path.write_bytes(bytes(text))
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert exc.source == str(path) and exc.key and exc.problem
        assert str(exc).count("\n") <= 1 or exc.key == "(syntax)"
    else:
        assert config.line


def test_check_config_on_the_command_line_is_one_line_and_exit_2(tmp_path: Path) -> None:
    valid = sim_config(tmp_path).read_text()
    for what, key, _ in FILE_PROBLEMS[:4]:
        path = tmp_path / f"{what.replace(' ', '-')}.toml"
        make_file(path, what, valid)
        result = linerec("check-config", str(path))
        assert result.returncode == 2, result
        assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"linerec: {path}: {key}: ")
        assert "Traceback" not in result.stderr
    path = write(tmp_path / "pin.toml", with_value(full_data(tmp_path), ("line", 1, "hook_pin"),
                                                   "23"))
    result = linerec("check-config", str(path))
    assert (result.returncode, result.stderr) == (
        2, f"linerec: {path}: line[1].hook_pin: expected a whole number, got '23'\n")


# ---------------------------------------------------------------------------------------
# config/set and reload: a bad change changes nothing


class Daemon:
    """The configurator as the daemon runs it, without a broker: what it applied."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = sim_config(tmp_path, BROKER)
        self.original = self.path.read_bytes()
        self.running = load_config(self.path)
        self.applied: list[Config] = []
        self.configurator = Configurator(self.path, self.running, self.applied.append)
        self.handler = CommandHandler(tmp_path, lambda: {}, configurator=self.configurator)

    def request(self, name: str, payload: Any) -> dict[str, Any]:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.handler.handle(name, raw)

    def unchanged(self) -> bool:
        return self.path.read_bytes() == self.original and not self.applied and not list(
            self.path.parent.glob("*.tmp"))


def as_patch(case: Case, data: dict[str, Any]) -> dict[str, Any]:
    """The case as a config/set merge patch: its whole top-level table or list."""
    top = case.path[0]
    assert isinstance(top, str)
    return {top: with_value(data, case.path, case.value)[top]}


def test_every_bad_key_over_config_set_is_refused_naming_it(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    data = full_data(tmp_path / "full")
    for case in CASES:
        reply = daemon.request("config/set", {"request_id": "c1",
                                              "args": {"config": as_patch(case, data)}})
        assert reply["ok"] is False and reply["request_id"] == "c1", (case, reply)
        assert reply["error"]["key"] == f"config.{case.key}", (case, reply)
        assert daemon.unchanged(), case


@fuzz(100)
@given(cases=st.lists(st.sampled_from(CASES), min_size=1, max_size=3),
       extra=st.dictionaries(st.sampled_from(["device_id", "numbers", "audio", "line", "zz"]),
                             st.none() | st.integers() | st.text(max_size=5)
                             | st.lists(st.integers(), max_size=2), max_size=2))
def test_random_bad_patches_change_nothing(tmp_path: Path, cases: list[Case],
                                           extra: dict[str, Any]) -> None:
    """Several bad keys at once, with more changes beside them (some good, some removing a
    table): refused, the file byte for byte as it was, nothing applied."""
    daemon = Daemon(tmp_path)
    data = full_data(tmp_path / "full")
    patch: dict[str, Any] = dict(extra)
    for case in cases:
        patch |= as_patch(case, data)
    reply = daemon.request("config/set", {"request_id": "c1", "args": {"config": patch}})
    assert reply["ok"] is False and reply["error"]["key"].startswith("config."), reply
    assert daemon.unchanged()


def test_strings_that_are_not_unicode_are_refused_before_the_file(tmp_path: Path) -> None:
    """JSON can escape half a surrogate pair; it passed the loader as a purpose's text and
    then failed the file's UTF-8 encoding half-way through writing it."""
    daemon = Daemon(tmp_path)
    purpose = tomllib.loads(daemon.original.decode())["purpose"][0]
    payload = json.dumps({"request_id": "s1", "args": {"config": {"purpose": [
        {**purpose, "text": "PLACEHOLDER"}]}}}).replace("PLACEHOLDER", "\\ud800")
    reply = daemon.request("config/set", payload.encode())
    assert reply["error"]["key"] == "(payload)" and "Unicode" in reply["error"]["problem"]
    assert daemon.unchanged()


def test_reload_of_a_broken_file_keeps_the_running_config(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    good = daemon.original.decode()
    for text, key in (
            (good.replace("[[line]]", "[[line]", 1), "config.(file)"),
            (good.replace("hook_pin = 23", 'hook_pin = "23"'), "config.line[1].hook_pin"),
            ("colour = 1\n" + good, "config.colour"),
            (None, "config.(file)")):
        if text is None:
            daemon.path.unlink()
        else:
            daemon.path.write_text(text)
        reply = daemon.request("reload", {"request_id": "r1"})
        assert reply["ok"] is False and reply["error"]["key"] == key, reply
        assert daemon.applied == []
    # The file put right: the same config as before, nothing to apply or restart for.
    daemon.path.write_bytes(daemon.original)
    reply = daemon.request("reload", {"request_id": "r2"})
    assert reply["result"] == {"applied": [], "restart_required": []}
    assert daemon.applied == [daemon.running]


# ---------------------------------------------------------------------------------------
# Found by fuzzing, fixed in daemon/config.py and daemon/reconfigure.py


def test_a_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    """NAME_PATTERN.match let a trailing newline through ($ matches before it)."""
    path = sim_config(tmp_path)
    path.write_text(path.read_text().replace('name = "line1"', 'name = "line1\\n"'))
    assert_names(path, "line[0].name")


def test_a_hat_profile_with_a_line_named_by_a_list(tmp_path: Path) -> None:
    """A table's name that is a list was hashed before it was checked (TypeError)."""
    path = sim_config(tmp_path)
    path.write_text('hat = "generic-2line"\n' + path.read_text().replace(
        'name = "line1"', "name = [1]"))
    with pytest.raises(ConfigError):
        load_config(path)


def test_a_hat_profile_path_with_a_nul_byte(tmp_path: Path) -> None:
    """pathlib's ValueError came out of load_config."""
    path = sim_config(tmp_path)
    path.write_text('hat = "x\\u0000.toml"\n' + path.read_text())
    assert_names(path, "hat")


def test_toml_nested_too_deeply(tmp_path: Path) -> None:
    """tomllib recurses once per nesting level: a RecursionError came out."""
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_a_disclosure_path_with_a_nul_byte_is_a_config_error(tmp_path: Path) -> None:
    """Found here: pathlib's ValueError came out of load_config (fixed in audio/pcm.py)."""
    path = sim_config(tmp_path, disclosure=Path("/tmp/x.wav"))
    path.write_text(path.read_text().replace("/tmp/x.wav", "/tmp/x\\u0000.wav"))
    assert_names(path, "disclosure[0].parts[0].file")


def test_a_config_write_cut_off_by_a_full_card_keeps_the_old_file_and_leaves_no_tmp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "linerec.toml"
    path.write_text("storage = \"/var/lib/linerec/recordings\"\n")

    def card_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", card_full)
    with pytest.raises(OSError):
        write_config(path, {"storage": "/srv/recordings"})
    assert path.read_text() == "storage = \"/var/lib/linerec/recordings\"\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linerec.toml"]
