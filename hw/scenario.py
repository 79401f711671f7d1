"""Scenario files for the simulated HAT: what happens on which line, and when."""

from __future__ import annotations

import bisect
import math
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linerec.audio.pcm import AudioFileError, load_line_audio
from linerec.hw import exchange

MAX_DURATION_S = 8 * 3600.0
"""A working day of line time: the soak's 2000 calls on four lines need a little over four
hours. The simulation keeps no per-sample array of that length unless its files are kept."""
RING_ON_S = 1.0
RING_OFF_S = 4.0
"""Dutch ring cadence: 1 s on, 4 s off."""

PULSE_BREAK_S = 0.060
PULSE_MAKE_S = 0.040
PULSE_DIGIT_PAUSE_S = 0.700
"""Pulse dialling at 10 pulses per second, 60 ms break / 40 ms make, digits 700 ms apart."""
BOUNCE_TOGGLE_MS = (0.3, 3.0)
"""Contact bounce: the level flips every 0.3-3 ms until it settles (a hook switch or a ring
detector's optocoupler)."""
GPIO_INPUTS = ("hook", "ring")
MAX_CHATTER_EDGES = 200_000
"""Most level changes one chatter step may make (a 4-hour scenario must not become
millions of GPIO changes)."""
MAX_CLOCK_STEP_S = 366 * 86400.0
"""Largest wall-clock step (seconds): a Pi without a clock battery may boot months behind."""

STEP_KEYS: dict[str, dict[str, bool]] = {
    # do -> {key: required}
    "ring": {"until": False, "bounce_ms": False, "seed": False},
    "offhook": {"bounce_ms": False, "seed": False},
    "onhook": {"bounce_ms": False, "seed": False},
    "audio": {"file": True, "gain_db": False},
    "callerid": {"number": False, "name": False, "format": False, "form": False,
                 "absence": False},
    "dtmf": {"digits": True, "on_ms": False, "off_ms": False},
    "tone": {"kind": True, "until": False, "frequency": False, "gain_db": False},
    "pulse": {"digits": True},
    "flash": {"ms": False},
    "answer": {},
    "overrun": {"frames": True},
    "unplug": {"seconds": True},
    "stall": {"seconds": True},
    "chatter": {"input": False, "until": True, "glitch_ms": False, "gap_ms": False,
                "seed": False},
    "clock_step": {"seconds": True},
}
LINELESS = ("clock_step",)
"""Steps of the whole appliance, not of a line: ``line`` is optional."""
TONE_KINDS = ("dial", "ringback", "busy", "congestion")
CALLER_ID_FORMATS = ("dtmf", "fsk")
DTMF_CLIP_FORMS = ("A", "D", "#")
ABSENCE = ("private", "unavailable")
DIGITS = "0123456789*#ABCD"
MAX_DIGITS = 64
"""Longest digit string of one dtmf or pulse step."""
MAX_CALLER_NAME = 50
MAX_CALLER_NUMBER = 20
"""ETSI EN 300 659-3's longest calling line identity."""
GAIN_DB = (-100.0, 40.0)
"""Lowest and highest gain of a step's audio or tone (decibels)."""


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
    """"hook", "ring" or "polarity"."""
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
        """Every hook, ring and polarity level change, in sample order: the scripted ones
        with their contact bounce, and the chatter laid over them."""
        changes: list[GpioChange] = []
        end = round(self.duration * rate)
        for step in self.steps:
            at = round(step.at * rate)
            edge = _Bouncer(step, rate)
            if step.do in ("offhook", "onhook"):
                changes += edge(at, step.line, "hook", step.do == "offhook")
                if step.do == "onhook":
                    # The exchange puts the polarity back when the call is cleared.
                    changes.append(GpioChange(at, step.line, "polarity", False))
            elif step.do == "answer":
                changes.append(GpioChange(at, step.line, "polarity", True))
            elif step.do in ("pulse", "flash"):
                for opened, closed in self._loop_breaks(step):
                    changes.append(GpioChange(round(opened * rate), step.line, "hook", False))
                    changes.append(GpioChange(round(closed * rate), step.line, "hook", True))
            elif step.do == "ring":
                stop = round(float(step.params.get("until", self.duration)) * rate)
                answered = [round(s.at * rate) for s in self.steps
                            if s.line == step.line and s.do == "offhook" and s.at >= step.at]
                stop = min([stop, end, *answered])
                cycle = round((RING_ON_S + RING_OFF_S) * rate)
                for burst in range(at, stop, cycle):
                    changes += edge(burst, step.line, "ring", True)
                    changes += edge(min(burst + round(RING_ON_S * rate), stop),
                                    step.line, "ring", False)
        changes.sort(key=lambda c: c.sample)
        chatter = [change for step in self.steps if step.do == "chatter"
                   for change in self._chatter(step, rate, changes)]
        return sorted(changes + chatter, key=lambda c: c.sample)

    def clock_steps(self, rate: int) -> list[tuple[int, float]]:
        """(sample, seconds) of each ``clock_step``: where the wall clock jumps, and by how
        much (positive: forward)."""
        return [(round(step.at * rate), float(step.params["seconds"]))
                for step in self.steps if step.do == "clock_step"]

    @staticmethod
    def _chatter(step: Step, rate: int, scripted: list[GpioChange]) -> list[GpioChange]:
        """A chattering input: from ``at`` to ``until`` the level flips away from what the
        script holds it at, for 1 sample to ``glitch_ms``, at gaps of 1 sample to
        ``gap_ms`` (uniformly random, from ``seed``). A glitch that would cover a scripted
        change is left out, so the script's own edges stay where they are."""
        params = step.params
        name = str(params.get("input", "hook"))
        edges = [c for c in scripted if c.line == step.line and c.input == name]
        samples = [c.sample for c in edges]
        rng = np.random.default_rng([int(params.get("seed", 0)), step.index])
        glitch_max = max(1, round(float(params.get("glitch_ms", 10)) * rate / 1000))
        gap_max = max(1, round(float(params.get("gap_ms", 500)) * rate / 1000))
        at, until = round(step.at * rate), round(float(params["until"]) * rate)
        out: list[GpioChange] = []
        while True:
            at += int(rng.integers(1, gap_max + 1))
            length = int(rng.integers(1, glitch_max + 1))
            if at + length >= until:
                return out
            first = bisect.bisect_left(samples, at)
            if first == len(samples) or samples[first] > at + length:
                level = edges[first - 1].active if first else False
                out.append(GpioChange(at, step.line, name, not level))
                out.append(GpioChange(at + length, step.line, name, level))
            at += length

    @staticmethod
    def _loop_breaks(step: Step) -> list[tuple[float, float]]:
        """(opened, closed) times of the loop breaks of a pulse or flash step."""
        if step.do == "flash":
            return [(step.at, step.at + float(step.params.get("ms", 100)) / 1000)]
        breaks = []
        at = step.at
        for digit in str(step.params["digits"]):
            for _ in range(int(digit) or 10):
                breaks.append((at, at + PULSE_BREAK_S))
                at += PULSE_BREAK_S + PULSE_MAKE_S
            at += PULSE_DIGIT_PAUSE_S - PULSE_MAKE_S
        return breaks

    def far_end_sources(self, line: str, rate: int) -> list[tuple[int, np.ndarray]]:
        """What the far end puts on the line: (start sample, float32 samples) per audio
        step, every file decoded now, so that a bad one is reported before anything starts.
        A file used by several steps is decoded once."""
        sources = []
        for step in self.steps:
            if step.line != line:
                continue
            if step.do in ("callerid", "dtmf", "tone"):
                sources.append((round(step.at * rate), self._exchange_signal(step, rate)))
                continue
            if step.do != "audio":
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


    def _exchange_signal(self, step: Step, rate: int) -> np.ndarray:
        """The tones and data the simulated exchange (or phone) puts on the line."""
        params = step.params
        if step.do == "dtmf":
            return exchange.dtmf(str(params["digits"]), rate, on_ms=int(params.get("on_ms", 70)),
                                 off_ms=int(params.get("off_ms", 70)))
        if step.do == "tone":
            until = float(params.get("until", self.duration))
            signal = exchange.progress_tone(str(params["kind"]), until - step.at, rate,
                                            frequency=float(params.get("frequency", 425.0)))
            return signal * np.float32(10 ** (float(params.get("gain_db", 0.0)) / 20))
        absence = params.get("absence")
        if params.get("format", "dtmf") == "fsk":
            return exchange.fsk_caller_id(rate, number=params.get("number"),
                                          name=params.get("name"), absence=absence,
                                          when=None)
        return exchange.dtmf_clip(str(params.get("number", "")), rate,
                                  form=absence or str(params.get("form", "A")))


class _Bouncer:
    """A step's scripted edges, each with its contact bounce (``bounce_ms``): after the
    edge the level flips back and forth at random (from ``seed``) until it settles."""

    def __init__(self, step: Step, rate: int) -> None:
        self._rate = rate
        self._bounce = round(float(step.params.get("bounce_ms", 0)) * rate / 1000)
        self._rng = np.random.default_rng([int(step.params.get("seed", 0)), step.index])

    def __call__(self, at: int, line: str, name: str, active: bool) -> list[GpioChange]:
        out = [GpioChange(at, line, name, active)]
        if not self._bounce:
            return out
        level, moment = active, at
        lo, hi = (ms * self._rate / 1000 for ms in BOUNCE_TOGGLE_MS)
        while (moment := moment + max(1, round(self._rng.uniform(lo, hi)))) < at + self._bounce:
            level = not level
            out.append(GpioChange(moment, line, name, level))
        if level != active:
            out.append(GpioChange(at + self._bounce, line, name, active))
        return out


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
    except RecursionError:
        # tomllib recurses once per nesting level of an array or inline table.
        raise ScenarioError(f"{path}: not valid TOML: nested too deeply") from None

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
        if not isinstance(do, str) or do not in STEP_KEYS:
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
        if do in LINELESS and "line" not in raw:
            line = ""  # the appliance's, not a line's
        elif line not in known_lines:
            raise fail(f"{where}.line", f"{line!r} is not a line of the config; "
                       f"lines: {', '.join(known_lines)}")
        params = {k: v for k, v in raw.items() if k not in ("at", "line", "do")}
        if "until" in params:
            until = params["until"]
            if isinstance(until, bool) or not isinstance(until, int | float) \
                    or not at < until <= duration:
                raise fail(f"{where}.until", "expected seconds from the start, after 'at' "
                           f"and at most the duration ({duration})")
        if "frames" in params and (isinstance(params["frames"], bool)
                                   or not isinstance(params["frames"], int)
                                   or not 0 < params["frames"] <= 10 * 48000):
            raise fail(f"{where}.frames", "expected a whole number of frames lost, 1 to 480000")
        if do == "clock_step":
            seconds = params["seconds"]
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
                    or not 0 < abs(seconds) <= MAX_CLOCK_STEP_S:
                raise fail(f"{where}.seconds", "expected seconds the wall clock jumps (negative: "
                           f"back), not 0, at most {MAX_CLOCK_STEP_S:.0f} either way")
        elif "seconds" in params and (isinstance(params["seconds"], bool)
                                      or not isinstance(params["seconds"], int | float)
                                      or not 0 < params["seconds"] <= 60):
            raise fail(f"{where}.seconds", "expected seconds the device stays away, up to 60")
        if "seed" in params and (isinstance(params["seed"], bool)
                                 or not isinstance(params["seed"], int)
                                 or not 0 <= params["seed"] < 2**32):
            raise fail(f"{where}.seed", "expected a whole number from 0 to 4294967295")
        if "gain_db" in params and (isinstance(params["gain_db"], bool)
                                    or not isinstance(params["gain_db"], int | float)
                                    or not GAIN_DB[0] <= params["gain_db"] <= GAIN_DB[1]):
            raise fail(f"{where}.gain_db", f"expected a number of decibels, {GAIN_DB[0]:g} "
                       f"to {GAIN_DB[1]:g}")
        _check_signal_params(params, do, f"{where}", fail)
        if do == "chatter":
            # Each glitch and the gap before it average half their longest.
            mean_ms = (float(params.get("glitch_ms", 10)) + float(params.get("gap_ms", 500))) / 2
            if 2 * (params["until"] - at) * 1000 / mean_ms > MAX_CHATTER_EDGES:
                raise fail(f"{where}.gap_ms", f"this chatter would make more than "
                           f"{MAX_CHATTER_EDGES} level changes; use longer gaps or a shorter "
                           "stretch")
        if "file" in params:
            if not isinstance(params["file"], str):
                raise fail(f"{where}.file", "expected a file name in quotes")
            if not (path.parent / params["file"]).is_file():
                raise fail(f"{where}.file", f"{path.parent / params['file']} does not exist "
                           "(file names are relative to the scenario)")
        steps.append(Step(index, float(at), line, do, params))
    steps.sort(key=lambda s: (s.at, s.index))
    return Scenario(path, float(duration), tuple(steps))


def _check_signal_params(params: dict[str, Any], do: str, where: str,
                         fail: Callable[[str, str], ScenarioError]) -> None:
    """The keys of the exchange's signals: digits, tones, caller ids, loop breaks."""
    def choice(key: str, allowed: tuple[str, ...]) -> None:
        if key in params and params[key] not in allowed:
            raise fail(f"{where}.{key}", f"{params[key]!r} is not one of {', '.join(allowed)}")

    def number(key: str, lo: float, hi: float) -> None:
        value = params.get(key)
        if key in params and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not lo <= value <= hi):
            raise fail(f"{where}.{key}", f"expected a number from {lo:g} to {hi:g}")

    if "digits" in params:
        digits = params["digits"]
        allowed = "0123456789" if do == "pulse" else DIGITS
        if not isinstance(digits, str) or not 0 < len(digits) <= MAX_DIGITS \
                or any(d not in allowed for d in digits):
            raise fail(f"{where}.digits", f"expected 1 to {MAX_DIGITS} of the digits {allowed}")
    for key in ("number", "name"):
        if key in params and not isinstance(params[key], str):
            raise fail(f"{where}.{key}", "expected a string in quotes")
    if "name" in params:
        name = params["name"]
        if not name or len(name) > MAX_CALLER_NAME or not name.isprintable() \
                or not all(ord(c) < 256 for c in name):
            raise fail(f"{where}.name", f"expected 1 to {MAX_CALLER_NAME} printable Latin-1 "
                       "characters (what an FSK caller id carries)")
    if do == "callerid" and "number" in params and (
            not 0 < len(params["number"]) <= MAX_CALLER_NUMBER
            or not all(c in "+0123456789" for c in params["number"])):
        raise fail(f"{where}.number", f"expected 1 to {MAX_CALLER_NUMBER} digits, with an "
                   "optional leading +")
    if do == "callerid" and params.get("format", "dtmf") == "dtmf" \
            and "+" in params.get("number", ""):
        raise fail(f"{where}.number", "DTMF CLIP has no +: give the national number, or use "
                   'format = "fsk"')
    if do == "callerid" and "number" not in params and "absence" not in params:
        raise fail(f"{where}.number", "required unless absence says why no number is sent")
    choice("kind", TONE_KINDS)
    choice("format", CALLER_ID_FORMATS)
    choice("form", DTMF_CLIP_FORMS)
    choice("absence", ABSENCE)
    choice("input", GPIO_INPUTS)
    number("bounce_ms", 1, 100)
    number("glitch_ms", 0.1, 1000)
    number("gap_ms", 1, 60000)
    number("on_ms", 20, 1000)
    number("off_ms", 20, 1000)
    number("ms", 20, 2000)
    number("frequency", 300, 3400)
