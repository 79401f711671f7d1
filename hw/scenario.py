"""Scenario files for the simulated HAT: what happens on which line, and when."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linerec.audio.pcm import AudioFileError, load_line_audio

MAX_DURATION_S = 4 * 3600.0
RING_ON_S = 1.0
RING_OFF_S = 4.0
"""Dutch ring cadence: 1 s on, 4 s off."""

STEP_KEYS: dict[str, dict[str, bool]] = {
    # do -> {key: required}
    "ring": {"until": False},
    "offhook": {},
    "onhook": {},
    "audio": {"file": True, "gain_db": False},
    "overrun": {"frames": True},
    "unplug": {"seconds": True},
}
LATER_STEPS = ("answer", "dtmf", "tone", "callerid")
"""Documented step kinds that this version of the simulator does not play yet."""


class ScenarioError(ValueError):
    """A bad scenario; the message names the file, the step and the key."""


@dataclass(frozen=True)
class Step:
    index: int
    at: float
    line: str
    do: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GpioChange:
    sample: int
    line: str
    input: str
    """"hook" or "ring"."""
    active: bool


@dataclass(frozen=True)
class Scenario:
    path: Path
    duration: float
    steps: tuple[Step, ...]
    _decoded: dict[tuple[Path, int], np.ndarray] = field(default_factory=dict, compare=False,
                                                         repr=False)

    def total_samples(self, rate: int, period: int) -> int:
        """The scenario's length in samples, rounded up to whole capture periods."""
        return math.ceil(self.duration * rate / period) * period

    def gpio_changes(self, rate: int) -> list[GpioChange]:
        """Every hook and ring level change, in sample order."""
        changes: list[GpioChange] = []
        end = round(self.duration * rate)
        for step in self.steps:
            at = round(step.at * rate)
            if step.do in ("offhook", "onhook"):
                changes.append(GpioChange(at, step.line, "hook", step.do == "offhook"))
            elif step.do == "ring":
                stop = round(float(step.params.get("until", self.duration)) * rate)
                answered = [round(s.at * rate) for s in self.steps
                            if s.line == step.line and s.do == "offhook" and s.at >= step.at]
                stop = min([stop, end, *answered])
                cycle = round((RING_ON_S + RING_OFF_S) * rate)
                for burst in range(at, stop, cycle):
                    changes.append(GpioChange(burst, step.line, "ring", True))
                    changes.append(GpioChange(min(burst + round(RING_ON_S * rate), stop),
                                              step.line, "ring", False))
        return sorted(changes, key=lambda c: c.sample)

    def far_end_sources(self, line: str, rate: int) -> list[tuple[int, np.ndarray]]:
        """What the far end puts on the line: (start sample, float32 samples) per audio
        step, every file decoded now, so that a bad one is reported before anything starts.
        A file used by several steps is decoded once."""
        sources = []
        for step in self.steps:
            if step.line != line or step.do != "audio":
                continue
            path = self.path.parent / step.params["file"]
            samples = self._decoded.get((path, rate))
            if samples is None:
                try:
                    samples = load_line_audio(path, rate).astype(np.float32)
                except AudioFileError as exc:
                    raise ScenarioError(f"{self.path}: step[{step.index}].file: {exc}") from exc
                self._decoded[(path, rate)] = samples
            gain = float(step.params.get("gain_db", 0.0))
            if gain:
                samples = samples * np.float32(10 ** (gain / 20))
            sources.append((round(step.at * rate), samples))
        return sources


def load_scenario(path: Path, lines: Iterable[str]) -> Scenario:
    """Read and check a scenario against the lines of the config it runs on."""
    known_lines = list(lines)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ScenarioError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc

    def fail(key: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{path}: {key}: {problem}")

    unknown = sorted(set(data) - {"duration", "step"})
    if unknown:
        raise fail(unknown[0], "unknown key; a scenario has 'duration' and [[step]] tables")
    duration = data.get("duration")
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise fail("duration", "required: seconds of line audio, a number")
    if not 0 < duration <= MAX_DURATION_S:
        raise fail("duration",
                   f"{duration} is out of range; use more than 0 up to {MAX_DURATION_S:.0f}")
    raw_steps = data.get("step", [])
    if not isinstance(raw_steps, list):
        raise fail("step", "expected [[step]] tables")
    steps = []
    for index, raw in enumerate(raw_steps):
        where = f"step[{index}]"
        if not isinstance(raw, dict):
            raise fail(where, "expected a table")
        do = raw.get("do")
        if do in LATER_STEPS:
            raise fail(f"{where}.do", f"{do!r} is not supported by this version of the simulator; "
                       f"use one of {', '.join(STEP_KEYS)}")
        if do not in STEP_KEYS:
            raise fail(f"{where}.do", f"required: one of {', '.join(STEP_KEYS)}")
        allowed = STEP_KEYS[do]
        for key in raw:
            if key not in ("at", "line", "do") and key not in allowed:
                raise fail(f"{where}.{key}", f"unknown key for do = {do!r}; allowed: "
                           f"{', '.join(['at', 'line', 'do', *allowed]) }")
        for key, required in allowed.items():
            if required and key not in raw:
                raise fail(f"{where}.{key}", f"required for do = {do!r}")
        at = raw.get("at")
        if isinstance(at, bool) or not isinstance(at, int | float) or not 0 <= at <= duration:
            raise fail(f"{where}.at", f"required: seconds from the start, 0 to {duration}")
        line = raw.get("line")
        if line not in known_lines:
            raise fail(f"{where}.line", f"{line!r} is not a line of the config; "
                       f"lines: {', '.join(known_lines)}")
        params = {k: v for k, v in raw.items() if k not in ("at", "line", "do")}
        if "until" in params:
            until = params["until"]
            if isinstance(until, bool) or not isinstance(until, int | float) or until <= at:
                raise fail(f"{where}.until", "expected seconds from the start, after 'at'")
        if "frames" in params and (isinstance(params["frames"], bool)
                                   or not isinstance(params["frames"], int)
                                   or not 0 < params["frames"] <= 10 * 48000):
            raise fail(f"{where}.frames", "expected a whole number of frames lost, 1 to 480000")
        if "seconds" in params and (isinstance(params["seconds"], bool)
                                    or not isinstance(params["seconds"], int | float)
                                    or not 0 < params["seconds"] <= 60):
            raise fail(f"{where}.seconds", "expected seconds the device stays away, up to 60")
        if "gain_db" in params and (isinstance(params["gain_db"], bool)
                                    or not isinstance(params["gain_db"], int | float)):
            raise fail(f"{where}.gain_db", "expected a number of decibels")
        if "file" in params:
            if not isinstance(params["file"], str):
                raise fail(f"{where}.file", "expected a file name in quotes")
            if not (path.parent / params["file"]).is_file():
                raise fail(f"{where}.file", f"{path.parent / params['file']} does not exist "
                           "(file names are relative to the scenario)")
        steps.append(Step(index, float(at), line, do, params))
    steps.sort(key=lambda s: (s.at, s.index))
    return Scenario(path, float(duration), tuple(steps))
