"""linerec soak: thousands of simulated calls at random times, then calls paced to the clock.

`make soak` runs the full size: 2000 answered calls over four lines, unpaced (faster than
real time), then 3600 s of calls paced to the wall clock on two lines; it takes well over an
hour. Each part is one `linerec simulate` process: the real daemon on the simulated HAT,
driven by a generated scenario with random timing per line. Every call is checked against
its script (its events, its recording and its sealed receipt), `linerec verify` runs on the
storage afterwards, and the daemon process's RSS, open file descriptors and threads are
sampled from /proc all along. The figures go to a results JSON and to the section
"## Load and soak" of docs/RELIABILITY.md; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from linerec.audio.pcm import audio_seconds, load_line_audio
from linerec.daemon.config import packaged_disclosure
from linerec.hw import exchange
from linerec.hw.scenario import MAX_DURATION_S

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from simhelpers import NotifySocket  # noqa: E402  (the tests' sd_notify listener)

RATE = 8000
SECTION = "## Load and soak"
TITLE = "# Reliability: faults, load, bad input and security, measured"

FULL_CALLS, FULL_LINES, FULL_PACED_S, FULL_PACED_LINES = 2000, 4, 3600.0, 2
WATCHDOG_S = 20.0
"""The unit's WatchdogSec: the paced part runs under it."""
RSS_BOUND_MB = 5.0
"""The issue's target: RSS growth over the soak, first 10 % of it against the last 10 %."""

CALLER_TEXT = [
    "Good morning. I would like to change the delivery address of my order.",
    "I am calling about the invoice we received last week. The amount does not match "
    "the order we placed in September.",
    "Could you tell me when the engineer will come? We have been without heating since "
    "Monday.",
    "Yes, that is right. The number is four five seven one two.",
    "Thank you, that is all. Have a nice day.",
    "Hello, this is Bakker and Zonen in Amersfoort. Two boxes were charged twice, and we "
    "would like a corrected invoice please.",
]
HELLO_TEXT = "Hello, good morning."
"""What the far end says when it picks up an outbound call (the answer a line without a
polarity input hears)."""

# The daemon's timing a script has to respect (docs/ARCHITECTURE.md).
ANSWER_CHECK_S = 0.7
"""An inbound off-hook listens this long for dial tone before the disclosure starts."""
AFTER_DISCLOSURE_S = 1.6
"""From the disclosure's last sample to the far end speaking: the output latency (about
0.4 s) and the 0.75 s the line listens for a busy tone before it arms, with a margin."""
ONHOOK_CONFIRM_S = 0.8
RING_WINDOW_S = 6.0
DIAL_S = 1.0
"""Off-hook to the first dialled digit."""
RINGBACK_AFTER_DIGITS_S = 0.6
IDLE_S = 8.0
"""The idle stretches before and after the main calls, where every line is on-hook."""
STALL_S = 3.0
"""Unpaced: the capture devices hang this long (a `stall` step) in each idle stretch, so
that the daemon holds still, idle, while its descriptors and threads are counted, and a
device that ran ahead waits there for the others."""
SETTLE_S = 0.2
"""After a call's last event, the moment its receipt's seal takes."""
MISSED_EVERY = 20
"""One missed call (rings, nobody answers) after every this many answered calls."""


# ---- the layout and the script ---------------------------------------------------------

@dataclass(frozen=True)
class LineLayout:
    name: str
    capture: str
    channel: int
    playback: str
    hook_pin: int
    ring_pin: int
    led_pin: int
    polarity_pin: int | None
    """Every second line has one: outbound calls are answered by polarity reversal there,
    by ringback then speech on the others."""


def layout(lines: int) -> list[LineLayout]:
    """Lines in pairs on two-channel capture devices (one per pair, like stacked HATs), each
    pair's disclosures played through its own two-channel line output."""
    return [LineLayout(name=f"line{i + 1}", capture=f"tap{i // 2}", channel=i % 2,
                       playback=f"out{i // 2}", hook_pin=4 * i + 4, ring_pin=4 * i + 5,
                       led_pin=4 * i + 6, polarity_pin=4 * i + 7 if i % 2 else None)
            for i in range(lines)]


def write_config(path: Path, storage: Path, lines: list[LineLayout]) -> Path:
    devices = sorted({line.capture for line in lines})
    config = {
        "device_id": "soak",
        "storage": str(storage),
        "purpose": [{"name": "service", "text": "To handle the caller's request.",
                     "lawful_basis": "contract", "retention_days": 90}],
        "disclosure": [{"name": "welcome", "purpose": "service",
                        "parts": [{"language": "en", "file": str(packaged_disclosure("en"))}]}],
        "capture": [{"name": d, "device": "simulated", "channels": 2} for d in devices],
        "playback": [{"name": d.replace("tap", "out"), "device": "simulated", "channels": 2}
                     for d in devices],
        "line": [{"name": line.name, "capture": line.capture, "channel": line.channel,
                  "playback": line.playback, "playback_channel": line.channel,
                  "hook_pin": line.hook_pin, "ring_pin": line.ring_pin,
                  "led_pin": line.led_pin, "disclosure": "welcome",
                  **({"polarity_pin": line.polarity_pin} if line.polarity_pin else {})}
                 for line in lines],
    }
    path.write_text(tomli_w.dumps(config))
    return path


@dataclass
class Call:
    """One scripted call and what the daemon must make of it."""

    line: str
    kind: str
    """"inbound", "outbound" or "missed"."""
    start: float
    """Its first step (seconds)."""
    end: float
    """When the line is free for the next call."""
    offhook: float | None = None
    onhook: float | None = None
    number: str | None = None
    number_source: str | None = None
    answered_by: str | None = None
    speech: tuple[float, float] | None = None
    """When the far end speaks: (start, end), seconds; the recording must hold it."""
    steps: list[dict[str, Any]] = field(default_factory=list)

    def step(self, at: float, do: str, **params: Any) -> None:
        self.steps.append({"at": round(at, 3), "line": self.line, "do": do, **params})


@dataclass(frozen=True)
class Voices:
    """The far end's speech files and the disclosure's length, all in seconds."""

    caller: list[tuple[Path, float]]
    hello: tuple[Path, float]
    disclosure_s: float


def make_voices(folder: Path) -> Voices:
    def say(text: str, name: str) -> tuple[Path, float]:
        path = folder / name
        subprocess.run(["espeak-ng", "-v", "en", "-w", str(path), text], check=True)
        return path, audio_seconds(path)

    return Voices([say(text, f"caller-{i}.wav") for i, text in enumerate(CALLER_TEXT)],
                  say(HELLO_TEXT, "hello.wav"), audio_seconds(packaged_disclosure("en")))


class Script:
    """Random calls per line: inbound (no caller id, DTMF CLIP or FSK caller id), outbound
    (dialled in DTMF, ringback, answered by polarity reversal or by the far end speaking),
    and now and then a missed call. Each line's calls follow one another with random gaps;
    the lines are independent, so calls overlap across lines at random."""

    def __init__(self, lines: list[LineLayout], voices: Voices, rng: random.Random) -> None:
        self.lines = lines
        self.voices = voices
        self.rng = rng
        self.calls: list[Call] = []
        self.extra_steps: list[dict[str, Any]] = []
        self.cursor = {line.name: 1.0 for line in lines}
        self.answered = 0
        self.missed = 0
        self._before = (0.0, 0)
        self.signal_samples = 0
        """The exchange's signals (tones, digits, caller ids) the simulator computes before
        it starts, each as float32 samples: memory the daemon process holds from READY=1."""

    def number(self) -> str:
        return f"0{self.rng.randrange(10**8, 10**9)}"

    def add(self, line: LineLayout) -> Call:
        """The line's next call, at a random gap after its last one."""
        rng = self.rng
        signals = self.signal_samples
        start = self.cursor[line.name] + rng.uniform(1.5, 5.0)
        if self.missed < self.answered // MISSED_EVERY:
            call = self._missed(line, start)
            self.missed += 1
        elif rng.random() < 0.5:
            call = self._inbound(line, start)
        else:
            call = self._outbound(line, start)
        if call.kind != "missed":
            self.answered += 1
        self.calls.append(call)
        self._before = (self.cursor[line.name], signals)
        self.cursor[line.name] = call.end
        return call

    def take_back(self) -> None:
        """Forget the call added last (it ran past the end)."""
        call = self.calls.pop()
        self.cursor[call.line], self.signal_samples = self._before
        if call.kind == "missed":
            self.missed -= 1
        else:
            self.answered -= 1

    def _missed(self, line: LineLayout, start: float) -> Call:
        until = start + self.rng.uniform(6.0, 16.0)
        call = Call(line.name, "missed", start, end=until + RING_WINDOW_S + 4.0)
        call.step(start, "ring", until=round(until, 3))
        return call

    def _inbound(self, line: LineLayout, start: float) -> Call:
        rng = self.rng
        call = Call(line.name, "inbound", start, end=0.0)
        variant = rng.choice(["none", "clip_dtmf", "clip_fsk"])
        ring = start
        if variant == "clip_dtmf":
            call.number, call.number_source = self.number(), "clip_dtmf"
            call.step(start, "callerid", number=call.number)
            clip = len(exchange.dtmf_clip(call.number, RATE))
            self.signal_samples += clip
            ring = start + clip / RATE + 0.3
        call.step(ring, "ring")
        earliest = ring + 0.5
        if variant == "clip_fsk":
            # Between the first and the second ring, as the exchange sends it.
            call.number, call.number_source = self.number(), "clip_fsk"
            call.step(ring + 1.5, "callerid", number=call.number, format="fsk")
            self.signal_samples += len(exchange.fsk_caller_id(RATE, number=call.number))
            earliest = ring + 5.5
        call.offhook = earliest + rng.uniform(0.0, 8.0)
        call.step(call.offhook, "offhook")
        return self._conversation(call, call.offhook + ANSWER_CHECK_S)

    def _outbound(self, line: LineLayout, start: float) -> Call:
        rng = self.rng
        number = self.number()
        call = Call(line.name, "outbound", start, end=0.0, offhook=start, number=number,
                    number_source="dialled_dtmf")
        call.step(start, "offhook")
        call.step(start + DIAL_S, "dtmf", digits=number)
        digits = len(exchange.dtmf(number, RATE))
        ringback = start + DIAL_S + digits / RATE + RINGBACK_AFTER_DIGITS_S
        # 1 s bursts 5 s apart: the far end picks up in a pause, after 1 to 3 bursts.
        answer = ringback + 5.0 * rng.randrange(3) + rng.uniform(1.3, 4.5)
        self.signal_samples += digits + round((answer - ringback) * RATE)
        call.step(ringback, "tone", kind="ringback", until=round(answer, 3))
        if line.polarity_pin is not None:
            call.answered_by = "polarity_reversal"
            call.step(answer, "answer")
            disclosure_at = answer
        else:
            call.answered_by = "ringback_then_speech"
            hello, _ = self.voices.hello
            spoken = answer + rng.uniform(0.2, 0.8)
            call.step(spoken, "audio", file=str(hello))
            # The answer is taken about 200 ms into the speech; the hello may still run on
            # under the start of the disclosure, as it does on a real line.
            disclosure_at = spoken + 0.5
        return self._conversation(call, disclosure_at)

    def _conversation(self, call: Call, disclosure_at: float) -> Call:
        """The far end speaks once the disclosure has played, then the office hangs up."""
        rng = self.rng
        file, seconds = rng.choice(self.voices.caller)
        speech_at = disclosure_at + self.voices.disclosure_s + AFTER_DISCLOSURE_S
        call.speech = (speech_at, speech_at + seconds)
        call.step(speech_at, "audio", file=str(file))
        call.onhook = speech_at + seconds + rng.uniform(0.3, 2.5)
        call.step(call.onhook, "onhook")
        call.end = call.onhook + ONHOOK_CONFIRM_S
        return call

    def idle_stretch(self, stall: bool) -> tuple[float, float]:
        """Every line on-hook from here for IDLE_S; unpaced, each capture device hangs for
        STALL_S in the middle of it. Returns the stretch (start, end)."""
        start = max(self.cursor.values()) + 1.0
        if stall:
            for capture in sorted({line.capture for line in self.lines}):
                first = next(line for line in self.lines if line.capture == capture)
                self.extra_steps.append({"at": round(start + IDLE_S / 2, 3),
                                         "line": first.name, "do": "stall",
                                         "seconds": STALL_S})
        for name in self.cursor:
            self.cursor[name] = start + IDLE_S
        return start, start + IDLE_S

    def write(self, path: Path, duration: float) -> Path:
        steps = [s for call in self.calls for s in call.steps] + self.extra_steps
        path.write_text(tomli_w.dumps({"duration": round(duration, 3),
                                       "step": sorted(steps, key=lambda s: s["at"])}))
        return path


def plan_unpaced(script: Script, calls: int) -> tuple[float, tuple[float, float],
                                                      tuple[float, float]]:
    """``calls`` answered calls over the script's lines, a first call on each line before
    the first idle stretch (the daemon's one-time set-up is done by then)."""
    for line in script.lines:
        script.add(line)
    first_idle = script.idle_stretch(stall=True)
    while script.answered < calls:
        line = min(script.lines, key=lambda ln: script.cursor[ln.name])
        script.add(line)
    last_idle = script.idle_stretch(stall=True)
    return last_idle[1] + 1.0, first_idle, last_idle


def plan_paced(script: Script, seconds: float) -> tuple[float, tuple[float, float],
                                                        tuple[float, float]]:
    """Calls on the script's lines for ``seconds`` of wall-clock time."""
    for line in script.lines:
        script.add(line)
    first_idle = script.idle_stretch(stall=False)
    end = seconds - IDLE_S - 2.0
    while True:
        line = min(script.lines, key=lambda ln: script.cursor[ln.name])
        if script.add(line).end > end:
            script.take_back()
            break
    last_idle = script.idle_stretch(stall=False)
    return max(seconds, last_idle[1] + 1.0), first_idle, last_idle


# ---- running the daemon and watching it ----------------------------------------------------

@dataclass(frozen=True)
class Sample:
    at: float
    """Monotonic time."""
    rss_kb: int
    fds: int
    threads: int
    cpu_ticks: int


def sample_process(pid: int) -> Sample | None:
    """RSS, open descriptors, threads and CPU time of a process, from /proc."""
    proc = Path(f"/proc/{pid}")
    try:
        rss = re.search(r"^VmRSS:\s+(\d+)", (proc / "status").read_text(), re.M)
        fds = len(os.listdir(proc / "fd"))
        threads = len(os.listdir(proc / "task"))
        stat = (proc / "stat").read_text()
    except OSError:
        return None  # the process is gone
    if rss is None:
        return None  # a zombie: it has no memory any more
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return Sample(time.monotonic(), int(rss[1]), fds, threads, cpu)


@dataclass
class Run:
    """What one `linerec simulate` did, as seen from outside."""

    returncode: int
    wall_s: float
    events: list[tuple[float, dict[str, Any]]]
    samples: list[Sample]
    notify: list[tuple[float, str]]
    stderr: str


def run_daemon(work: Path, scenario: Path, config: Path, *, realtime: bool,
               interval: float, watchdog_s: float | None) -> Run:
    """`linerec simulate` as systemd runs the daemon (NOTIFY_SOCKET, and WATCHDOG_USEC when
    ``watchdog_s``), sampling its /proc entry every ``interval`` seconds."""
    notify = NotifySocket(work / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    for name in ("JOURNAL_STREAM", "WATCHDOG_PID", "WATCHDOG_USEC"):
        env.pop(name, None)
    if watchdog_s:
        env["WATCHDOG_USEC"] = str(int(watchdog_s * 1_000_000))
    command = [sys.executable, "-m", "linerec.daemon.cli", "simulate", "--scenario",
               str(scenario), "--config", str(config), *(["--realtime"] if realtime else [])]
    events: list[tuple[float, dict[str, Any]]] = []
    samples: list[Sample] = []
    stderr_path = work / "stderr.log"
    started = time.monotonic()
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                text=True)

        def read_events() -> None:
            assert proc.stdout is not None
            for text in proc.stdout:
                events.append((time.monotonic(), json.loads(text)))

        reader = threading.Thread(target=read_events, daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                sample = sample_process(proc.pid)
                if sample is not None:
                    samples.append(sample)
                time.sleep(interval)
            reader.join()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            notify.close()
    return Run(proc.returncode, time.monotonic() - started, events, samples,
               list(notify.messages), stderr_path.read_text())


# ---- checking every call ------------------------------------------------------------------

INBOUND_EVENTS = ["call_started", "disclosure_started", "disclosure_completed",
                  "recording_started", "recording_stopped", "call_ended"]
OUTBOUND_EVENTS = [INBOUND_EVENTS[0], "call_answered", *INBOUND_EVENTS[1:]]
DATED_TO_S = 0.15
"""How far a call's start or end may be dated from its scripted off-hook or on-hook: the
hook debounce (40 ms) and a period, with a margin."""


def check_calls(calls: list[Call], run: Run,
                storage: Path) -> tuple[dict[str, Any], list[str]]:
    """Every scripted call against the daemon's events, recordings and receipts; every
    recording read through by opusinfo."""
    failures: list[str] = []
    by_call: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_line: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, event in run.events:
        if event.get("call_id"):
            by_call[event["call_id"]].append(event)
        if event.get("line"):
            by_line[event["line"]].append(event)
    started = {line: [e for e in events if e["event"] == "call_started"]
               for line, events in by_line.items()}
    matched: dict[str, Call] = {}
    for call in calls:
        if call.kind == "missed":
            continue
        assert call.offhook is not None
        found = [e for e in started.get(call.line, [])
                 if abs(e["sample"] / RATE - call.offhook) <= DATED_TO_S]
        if len(found) != 1:
            failures.append(f"{call.line} off-hook at {call.offhook:.2f} s: {len(found)} "
                            "call_started events, expected 1")
            continue
        matched[found[0]["call_id"]] = call
    unexpected = sorted(set(by_call) - set(matched))
    if unexpected:
        failures.append(f"{len(unexpected)} calls nobody scripted: {unexpected[:5]}")
    missed = [c for c in calls if c.kind == "missed"]
    rang = sum(1 for c in calls if any(s["do"] == "ring" for s in c.steps))
    for kind, expected in (("ringing", rang), ("ringing_stopped", len(missed))):
        count = sum(1 for _, e in run.events if e["event"] == kind)
        if count != expected:
            failures.append(f"{count} {kind} events, expected {expected}")
    bad = [e for _, e in run.events
           if e["event"] in ("error", "disclosure_failed", "line_fault", "storage_full")]
    failures += [f"{e['event']} on {e['line']}: {e}" for e in bad[:10]]

    receipts = {p.stem: p for p in storage.glob("*/*/*/*.json")}
    opus = {p.name.removesuffix(".opus"): p for p in storage.glob("*/*/*/*.opus")}
    parts = list(storage.rglob("*.part*"))
    if parts:
        failures.append(f"{len(parts)} .part files left: {parts[:3]}")
    if set(receipts) != set(matched):
        failures.append(f"receipts for {len(receipts)} calls, answered calls "
                        f"{len(matched)}; extra {sorted(set(receipts) - set(matched))[:3]}, "
                        f"missing {sorted(set(matched) - set(receipts))[:3]}")
    if set(opus) != set(matched):
        failures.append(f"{len(opus)} recordings for {len(matched)} answered calls")
    durations: list[float] = []
    gaps = lost = clean = 0
    for call_id, call in sorted(matched.items()):
        problems = _check_call(call_id, call, by_call[call_id], receipts.get(call_id))
        failures += [f"{call_id}: {p}" for p in problems]
        clean += not problems
        receipt = receipts.get(call_id)
        recording = json.loads(receipt.read_text())["recording"] if receipt else None
        if recording:
            durations.append(recording["duration_s"])
            gaps += len(recording["capture_gaps"])
            lost += recording["lost_samples"]
    for path in sorted(opus.values()):
        info = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True,
                              check=False)
        text = info.stdout + info.stderr
        if info.returncode != 0 or "WARNING" in text or "ERROR" in text:
            failures.append(f"opusinfo {path.name}: {text.strip()[-300:]}")
    figures = {
        "answered_calls": len([c for c in calls if c.kind != "missed"]),
        "missed_calls": len(missed),
        "inbound": sum(1 for c in calls if c.kind == "inbound"),
        "outbound": sum(1 for c in calls if c.kind == "outbound"),
        "calls_matched": len(matched),
        "calls_clean": clean,
        "recordings": len(opus),
        "receipts": len(receipts),
        "recorded_s": round(sum(durations), 1),
        "opusinfo_checked": len(opus),
        "speech_checked": _check_speech(sorted(opus.values()), failures),
        "part_files": len(parts),
        "capture_gaps": gaps,
        "lost_samples": lost,
    }
    return figures, failures


def _check_call(call_id: str, call: Call, events: list[dict[str, Any]],
                receipt_path: Path | None) -> list[str]:
    """One answered call: its events in order, exactly once each, and its sealed receipt,
    whose recording holds all the far end said."""
    problems = []
    expected = INBOUND_EVENTS if call.kind == "inbound" else OUTBOUND_EVENTS
    kinds = [e["event"] for e in events]
    if kinds != expected:
        problems.append(f"events {kinds}, expected {expected}")
    ended = next((e for e in events if e["event"] == "call_ended"), None)
    if ended is not None:
        if (ended["reason"], ended["recorded"], ended["rule"]) != ("onhook", True, None):
            problems.append(f"call_ended {ended}")
        assert call.onhook is not None
        if abs(ended["sample"] / RATE - call.onhook) > DATED_TO_S:
            problems.append(f"ended at {ended['sample'] / RATE:.2f} s, on-hook was at "
                            f"{call.onhook:.2f} s")
    answered = next((e for e in events if e["event"] == "call_answered"), None)
    if answered is not None and answered["answered_by"] != call.answered_by:
        problems.append(f"answered by {answered['answered_by']}, scripted {call.answered_by}")
    if receipt_path is None:
        return [*problems, "no receipt"]
    receipt = json.loads(receipt_path.read_text())
    recording = receipt.get("recording") or {}
    number = receipt.get("number") or {}
    checks = {
        "state": (receipt.get("state"), "closed"),
        "direction": (receipt.get("direction"), call.kind),
        "end_reason": (receipt.get("end_reason"), "onhook"),
        "sealed": ("chain" in receipt, True),
        "number": (number.get("value"), call.number),
        "number source": (number.get("source"), call.number_source),
        "recording status": (recording.get("status"), "complete"),
        "lost samples": (recording.get("lost_samples"), 0),
        "capture gaps": (recording.get("capture_gaps"), []),
    }
    problems += [f"receipt {name} {got!r}, expected {want!r}"
                 for name, (got, want) in checks.items() if got != want]
    assert call.speech is not None
    first, end = recording.get("first_sample"), recording.get("end_sample")
    if not isinstance(first, int) or not isinstance(end, int) \
            or first / RATE > call.speech[0] or end / RATE < call.speech[1]:
        problems.append(f"recording [{first}, {end}) does not hold the speech at "
                        f"{call.speech[0]:.2f}-{call.speech[1]:.2f} s")
    return problems


def _check_speech(recordings: list[Path], failures: list[str], count: int = 8) -> int:
    """A few recordings decoded: each holds the far end's speech, not silence."""
    chosen = recordings[:: max(1, len(recordings) // count)][:count]
    for path in chosen:
        with tempfile.TemporaryDirectory() as folder:
            wav = Path(folder) / "decoded.wav"
            subprocess.run(["opusdec", "--quiet", "--rate", str(RATE), str(path), str(wav)],
                           check=True, capture_output=True)
            samples = load_line_audio(wav, RATE).astype(np.float64)
        if samples.size == 0 or np.sqrt(np.mean(samples ** 2)) < 300:
            failures.append(f"{path.name}: no speech in the recording")
    return len(chosen)


def verify(storage: Path) -> tuple[bool, str]:
    result = subprocess.run([sys.executable, "-m", "linerec.daemon.cli", "verify",
                             str(storage)], capture_output=True, text=True, check=False)
    return result.returncode == 0, (result.stdout + result.stderr).strip().splitlines()[-1]


# ---- resources, pace, overruns -----------------------------------------------------------

def ready_and_stopping(run: Run) -> tuple[float, float]:
    ready = next((at for at, m in run.notify if "READY=1" in m), None)
    stopping = next((at for at, m in run.notify if "STOPPING=1" in m), None)
    if ready is None or stopping is None:
        raise RuntimeError("the daemon never said READY=1 and STOPPING=1: "
                           + run.stderr[-2000:])
    return ready, stopping


def idle_samples(run: Run, window: tuple[float, float]) -> list[Sample]:
    """The samples taken while every line sat in the idle stretch ``window`` (scenario
    seconds): after the last event of a call before it reached the harness, before the
    first event of a call after it (or STOPPING=1). Each capture device runs at its own
    pace, so this is where the events say, not where the clock would."""
    ready, stopping = ready_and_stopping(run)
    dated = [(at, event["sample"] / RATE) for at, event in run.events if "sample" in event]
    lo = max((at for at, position in dated if position < window[0]), default=ready)
    hi = min((at for at, position in dated if position >= window[1]), default=stopping)
    # The call's last event goes out as its receipt is sealed; give that a moment.
    return [s for s in run.samples if lo + SETTLE_S < s.at < hi]


def resources(run: Run, first_idle: list[Sample], last_idle: list[Sample]) -> dict[str, Any]:
    """RSS, descriptors and threads: the first 10 % of the calls against the last 10 %
    (medians), and idle against idle, where nothing but leaks can differ."""
    if not first_idle or not last_idle:
        return {"error": "no sample while every line was idle (the capture devices drifted "
                         "further apart than an idle stretch)"}
    between = [s for s in run.samples if first_idle[-1].at < s.at < last_idle[0].at]
    if len(between) < 10:
        return {"error": f"{len(between)} samples between the idle stretches: too short a run"}
    tenth = len(between) // 10
    head, tail = between[:tenth], between[-tenth:]

    def median(values: list[int]) -> float:
        return float(statistics.median(values))

    tenths = [between[len(between) * i // 10 : len(between) * (i + 1) // 10]
              for i in range(10)]
    rss_start = median([s.rss_kb for s in head]) / 1024
    rss_end = median([s.rss_kb for s in tail]) / 1024
    return {
        "samples": len(between),
        "window_samples": tenth,
        "rss_mb_first_window": round(rss_start, 2),
        "rss_mb_last_window": round(rss_end, 2),
        "rss_growth_mb": round(rss_end - rss_start, 2),
        "rss_mb_peak": round(max(s.rss_kb for s in run.samples) / 1024, 2),
        "rss_mb_by_tenth": [round(median([s.rss_kb for s in t]) / 1024, 2) for t in tenths],
        "rss_mb_idle_first": round(median([s.rss_kb for s in first_idle]) / 1024, 2),
        "rss_mb_idle_last": round(median([s.rss_kb for s in last_idle]) / 1024, 2),
        # The most seen in each stretch: a leak only adds. (At the very end a capture device
        # that ran ahead reaches the scenario's end, and its simulated line's thread ends.)
        "fds_idle_first": max(s.fds for s in first_idle),
        "fds_idle_last": max(s.fds for s in last_idle),
        "fds_max_first_window": max(s.fds for s in head),
        "fds_max_last_window": max(s.fds for s in tail),
        "threads_idle_first": max(s.threads for s in first_idle),
        "threads_idle_last": max(s.threads for s in last_idle),
        "threads_max_first_window": max(s.threads for s in head),
        "threads_max_last_window": max(s.threads for s in tail),
    }


def resource_failures(figures: dict[str, Any], rss_bound_mb: float) -> list[str]:
    if "error" in figures:
        return [figures["error"]]
    failures = []
    if figures["rss_growth_mb"] > rss_bound_mb:
        failures.append(f"RSS grew {figures['rss_growth_mb']} MB over the calls "
                        f"(bound {rss_bound_mb} MB)")
    for what in ("fds", "threads"):
        if figures[f"{what}_idle_last"] != figures[f"{what}_idle_first"]:
            failures.append(f"{what} idle at the end {figures[f'{what}_idle_last']}, idle "
                            f"after the first calls {figures[f'{what}_idle_first']}")
    return failures


def overruns(run: Run) -> int:
    """The highest overrun count STATUS= reported, summed over the capture devices."""
    worst = 0
    for _, message in run.notify:
        found = re.search(r"overruns: ([^;\n]*)", message)
        if found:
            worst = max(worst, sum(int(n) for n in re.findall(r" (\d+)", " " + found[1])))
    return worst


def pace(run: Run) -> dict[str, Any]:
    """Paced: how far behind its place on the line's clock the daemon told of what happened.
    ``disclosure_started`` goes out in the very tick its sample belongs to, so its delay
    is the daemon's lag behind the line (plus the pipe); the watchdog's pings show that the
    capture advanced all along."""
    ready, _ = ready_and_stopping(run)
    lags = [at - ready - event["sample"] / RATE for at, event in run.events
            if event["event"] == "disclosure_started"]
    pings = [at for at, m in run.notify if m.strip() == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    return {
        "event_lag_ms_median": round(statistics.median(lags) * 1000, 1) if lags else None,
        "event_lag_ms_max": round(max(lags) * 1000, 1) if lags else None,
        "watchdog_pings": len(pings),
        "watchdog_gap_s_max": round(max(gaps), 2) if gaps else None,
    }


# ---- one part of the soak -----------------------------------------------------------------

def soak_part(work: Path, voices: Voices, *, lines: int, calls: int | None,
              paced_s: float | None, seed: int, watchdog_s: float) -> dict[str, Any]:
    """One `linerec simulate` run: ``calls`` answered calls unpaced, or ``paced_s`` of calls
    paced to the clock; checked call by call."""
    paced = paced_s is not None
    work.mkdir(parents=True)
    storage = work / "recordings"
    layouts = layout(lines)
    config = write_config(work / "linerec.toml", storage, layouts)
    script = Script(layouts, voices, random.Random(seed))  # noqa: S311 - timing, no secret
    if paced_s is not None:
        duration, first, last = plan_paced(script, paced_s)
    else:
        assert calls is not None
        duration, first, last = plan_unpaced(script, calls)
    if duration > MAX_DURATION_S:
        raise SystemExit(f"{calls} calls over {lines} lines need {duration:.0f} s of line "
                         f"audio, over a scenario's {MAX_DURATION_S:.0f} s: use more lines")
    scenario = script.write(work / "scenario.toml", duration)
    run = run_daemon(work, scenario, config, realtime=paced,
                     interval=1.0 if paced else 0.1, watchdog_s=watchdog_s if paced else None)
    failures = [] if run.returncode == 0 else \
        [f"linerec simulate exited {run.returncode}: {run.stderr[-2000:]}"]
    errors = [line for line in run.stderr.splitlines()
              if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]
    failures += [f"logged: {line}" for line in errors[:10]]
    call_figures, call_failures = check_calls(script.calls, run, storage)
    failures += call_failures
    verified, verify_line = verify(storage)
    if not verified:
        failures.append(f"linerec verify: {verify_line}")
    usage = resources(run, idle_samples(run, first), idle_samples(run, last))
    result: dict[str, Any] = {
        "paced": paced,
        "lines": lines,
        "seed": seed,
        "audio_s": round(duration, 1),
        "wall_s": round(run.wall_s, 1),
        "speed_up": round(duration / run.wall_s, 1),
        **call_figures,
        "verify": verify_line,
        "verify_ok": verified,
        "overruns": overruns(run),
        "resources": usage,
        "errors_logged": len(errors),
        "exchange_signals_mb": round(script.signal_samples * 4 / 2**20, 1),
        "cpu_s": round(run.samples[-1].cpu_ticks / os.sysconf("SC_CLK_TCK"), 1)
        if run.samples else None,
    }
    if paced:
        result["pace"] = pace(run)
        if result["pace"]["watchdog_gap_s_max"] is None or \
                result["pace"]["watchdog_gap_s_max"] > watchdog_s:
            failures.append(f"watchdog pings {result['pace']}")
        if result["overruns"]:
            failures.append(f"{result['overruns']} overruns in the paced run")
    failures += resource_failures(usage, RSS_BOUND_MB)
    result["failures"] = failures
    return result


# ---- the report ----------------------------------------------------------------------------

def report(results: dict[str, Any]) -> str:
    """The section "## Load and soak" of docs/RELIABILITY.md."""
    unpaced, paced = results["unpaced"], results["paced"]
    full = results["full_size"]

    def usage(part: dict[str, Any], key: str, unit: str = "") -> str:
        value = part["resources"].get(key, "n/a")
        return f"{value}{unit}"

    rows = [
        ("answered calls (inbound / outbound)",
         *(f"{p['answered_calls']} ({p['inbound']} / {p['outbound']})" for p in (unpaced, paced))),
        ("missed calls (rang, nobody answered)", unpaced["missed_calls"], paced["missed_calls"]),
        ("lines", unpaced["lines"], paced["lines"]),
        ("line audio (s)", unpaced["audio_s"], paced["audio_s"]),
        ("wall time (s)", unpaced["wall_s"], paced["wall_s"]),
        ("speed-up (line audio / wall time)", f"{unpaced['speed_up']}x", f"{paced['speed_up']}x"),
        ("CPU time of the process, simulated HAT included (s)", unpaced["cpu_s"],
         paced["cpu_s"]),
        ("calls with exactly their events, recording and sealed receipt",
         *(f"{p['calls_clean']} of {p['answered_calls']}" for p in (unpaced, paced))),
        ("recordings / receipts / .part files left",
         *(f"{p['recordings']} / {p['receipts']} / {p['part_files']}" for p in (unpaced, paced))),
        ("recordings read by opusinfo (clean) / decoded (speech)",
         *(f"{p['opusinfo_checked']} / {p['speech_checked']}" for p in (unpaced, paced))),
        ("`linerec verify`", unpaced["verify"].split(": ")[-1], paced["verify"].split(": ")[-1]),
        ("RSS, first 10 % of the calls (median)", usage(unpaced, "rss_mb_first_window", " MB"),
         usage(paced, "rss_mb_first_window", " MB")),
        ("RSS, last 10 % of the calls (median)", usage(unpaced, "rss_mb_last_window", " MB"),
         usage(paced, "rss_mb_last_window", " MB")),
        (f"**RSS growth** (bound {RSS_BOUND_MB:g} MB)", usage(unpaced, "rss_growth_mb", " MB"),
         usage(paced, "rss_growth_mb", " MB")),
        ("RSS peak", usage(unpaced, "rss_mb_peak", " MB"), usage(paced, "rss_mb_peak", " MB")),
        ("of which the simulated exchange's tones and caller ids (computed before READY=1)",
         *(f"{p['exchange_signals_mb']} MB" for p in (unpaced, paced))),
        ("open descriptors, idle after the first calls / idle at the end",
         *(f"{usage(p, 'fds_idle_first')} / {usage(p, 'fds_idle_last')}"
           for p in (unpaced, paced))),
        ("open descriptors, most in the first / last 10 %",
         *(f"{usage(p, 'fds_max_first_window')} / {usage(p, 'fds_max_last_window')}"
           for p in (unpaced, paced))),
        ("threads, idle after the first calls / idle at the end",
         *(f"{usage(p, 'threads_idle_first')} / {usage(p, 'threads_idle_last')}"
           for p in (unpaced, paced))),
        ("threads, most in the first / last 10 %",
         *(f"{usage(p, 'threads_max_first_window')} / {usage(p, 'threads_max_last_window')}"
           for p in (unpaced, paced))),
        ("overruns (STATUS=) / capture gaps / lost samples (receipts)",
         *(f"{p['overruns']} / {p['capture_gaps']} / {p['lost_samples']}"
           for p in (unpaced, paced))),
        ("daemon behind the line's clock, median / worst (`disclosure_started`)", "-",
         f"{paced['pace']['event_lag_ms_median']} / {paced['pace']['event_lag_ms_max']} ms"),
        (f"watchdog pings / longest gap (WatchdogSec {WATCHDOG_S:g} s)", "-",
         f"{paced['pace']['watchdog_pings']} / {paced['pace']['watchdog_gap_s_max']} s"),
        ("errors logged / failed checks",
         *(f"{p['errors_logged']} / {len(p['failures'])}" for p in (unpaced, paced))),
    ]
    size = ("the full size" if full else
            f"a **scaled run**: {unpaced['answered_calls']} calls instead of {FULL_CALLS}, "
            f"{paced['audio_s']:.0f} s paced instead of {FULL_PACED_S:.0f} s")
    failures = results["unpaced"]["failures"] + results["paced"]["failures"]
    lines = [
        SECTION,
        "",
        *_wrap(f"Measured by `{results['command']}` on {results['machine']} "
               f"({results['date']}): {size}. `make soak` runs the full size ({FULL_CALLS} "
               f"calls over {FULL_LINES} lines unpaced, then {FULL_PACED_S:.0f} s paced on "
               f"{FULL_PACED_LINES} lines; well over an hour); `tests/test_soak.py` runs a "
               "short version in `make test`. Raw figures in `bench/soak-results.json`."),
        "",
        *_wrap("Each part is one `linerec simulate` process, the real daemon on the simulated "
               "HAT, run as systemd runs it (`NOTIFY_SOCKET`; `WATCHDOG_USEC` when paced), on "
               "a generated scenario: per line, calls one after another with random gaps "
               "(1.5-5 s), inbound (ringing 0.5-8 s, with no caller id, DTMF CLIP or FSK "
               "caller id) or outbound (DTMF dialling, 1-3 ringback bursts, answered by "
               "polarity reversal on the lines with a polarity input and by the far end "
               "speaking on the others), the far end's espeak-ng speech after the English "
               "disclosure, on-hook 0.3-2.5 s after it; one missed call after every "
               f"{MISSED_EVERY} answered ones. Lines are in pairs on two-channel capture "
               "devices, each pair with its own line output, so calls overlap across lines "
               "and devices at random."),
        "",
        "| figure | unpaced | paced |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        *_wrap("**Every call**: exactly one of each of its events in order, the start and end "
               f"dated within {DATED_TO_S * 1000:.0f} ms of the scripted off-hook and "
               "on-hook, the answer told by what the script did, a recording and a sealed "
               "receipt (state, direction, number and its source, no lost samples or capture "
               "gaps), the recording's samples holding all the far end said; no call the "
               "script did not make, no `error`, `disclosure_failed` or `line_fault`, nothing "
               "logged at ERROR.", bullet=True),
        *_wrap("**Resources** from `/proc/<pid>` of the daemon process every 0.1 s (unpaced) "
               "or 1 s (paced). RSS is compared as medians of the first and last tenth of the "
               "samples between two idle stretches; descriptors and threads are compared "
               "exactly (the most seen in each) in those stretches, where every line is "
               "on-hook: one after each "
               "line's first call (the one-time set-up done), one after the last call, where "
               "nothing but a leak can differ. A stretch runs from the last event of the "
               "calls before it to the first event of the calls after it; unpaced, the "
               f"capture devices hang for {STALL_S:g} s in it (a scenario `stall`), so that "
               "it lasts long enough to be sampled. The process includes the simulated HAT: "
               "its line threads, the scenario's decoded audio and the exchange's signals, "
               "all allocated before READY=1.", bullet=True),
        *_wrap(f"**Bound**: RSS growth <= {RSS_BOUND_MB:g} MB (the issue's target), "
               "descriptors and threads equal idle to idle. (gpiozero's mock pins keep every "
               "level change for tests to read back; a simulation that keeps no files, as "
               "here, drops that history, which a HAT's real pins do not keep.)",
               bullet=True),
        *_wrap("**RSS over the unpaced calls**, median of each tenth: "
               + ", ".join(f"{v:g}" for v in unpaced["resources"].get("rss_mb_by_tenth", []))
               + f" MB: {_per_100_calls(unpaced):.2f} MB per 100 calls; at that rate the "
               f"full {FULL_CALLS} calls would add {_per_100_calls(unpaced) * FULL_CALLS / 100:.1f}"
               " MB.", bullet=True),
        *_wrap("**Overruns**: unpaced, the simulated tap runs in lock-step with the daemon "
               "and cannot overrun. Paced, it overruns as a capture device does: when the "
               "process could not run for longer than the capture buffer (160 ms), the frames "
               "of that time are lost and the overrun reported (docs/SIMULATOR.md); the count "
               "is from `STATUS=` and the receipts' capture gaps. The paced part also "
               "measures whether the daemon kept up with the clock: `disclosure_started` goes "
               "out in the tick its sample belongs to, so its delay behind the line's clock is "
               "the daemon's lag.", bullet=True),
        "",
    ]
    if failures:
        lines += ["Checks that failed in this run:", "",
                  *[f"- {f}" for f in failures[:20]], ""]
    return "\n".join(lines)


def _wrap(text: str, *, bullet: bool = False) -> list[str]:
    """A paragraph (or a list item) wrapped as the rest of the document is."""
    return textwrap.wrap(text, width=95, initial_indent="- " if bullet else "",
                         subsequent_indent="  " if bullet else "", break_long_words=False,
                         break_on_hyphens=False)


def _per_100_calls(part: dict[str, Any]) -> float:
    """RSS growth per 100 calls: first tenth to last tenth spans nine tenths of them."""
    growth = part["resources"].get("rss_growth_mb", 0.0)
    return float(growth) / (0.9 * part["answered_calls"]) * 100


def write_section(path: Path, section: str) -> None:
    """Replace this section of the shared document, or add it; the others stay as they are."""
    text = path.read_text() if path.exists() else f"{TITLE}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text.rstrip("\n") + "\n")


# ---- the command ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=FULL_CALLS,
                        help="answered calls in the unpaced part (default %(default)s)")
    parser.add_argument("--lines", type=int, default=FULL_LINES, choices=range(1, 7),
                        help="lines in the unpaced part (default %(default)s)")
    parser.add_argument("--paced-s", type=float, default=FULL_PACED_S,
                        help="seconds of the paced part (default %(default)s)")
    parser.add_argument("--paced-lines", type=int, default=FULL_PACED_LINES,
                        choices=range(1, 7), help="lines in the paced part")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "soak-results.json")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    parser.add_argument("--work", type=Path, help="keep the runs' files here")
    parser.add_argument("--parallel", action="store_true",
                        help="run both parts at once (quicker; the unpaced part then shares "
                             "the machine with the paced one)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the section again from the figures in --out; run nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        write_section(args.report, report(json.loads(args.out.read_text())))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="linerec-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        voices = make_voices(work)
        results: dict[str, Any] = {
            "command": "make soak" if _full(args) else " ".join(
                ["bench/soak.py", *_given(argv if argv is not None else sys.argv[1:])]),
            "full_size": _full(args),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}",
        }
        parts = {
            "unpaced": lambda: soak_part(work / "unpaced", voices, lines=args.lines,
                                         calls=args.calls, paced_s=None, seed=args.seed,
                                         watchdog_s=WATCHDOG_S),
            "paced": lambda: soak_part(work / "paced", voices, lines=args.paced_lines,
                                       calls=None, paced_s=args.paced_s, seed=args.seed + 1,
                                       watchdog_s=WATCHDOG_S),
        }
        if args.parallel:
            with ThreadPoolExecutor(len(parts)) as pool:
                running = {name: pool.submit(part) for name, part in parts.items()}
                results.update({name: future.result() for name, future in running.items()})
        else:
            results.update({name: part() for name, part in parts.items()})
        results["parallel"] = args.parallel
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    section = report(results)
    write_section(args.report, section)
    print(section)
    failures = results["unpaced"]["failures"] + results["paced"]["failures"]
    return 1 if failures else 0


def _full(args: argparse.Namespace) -> bool:
    return (args.calls, args.lines, args.paced_s, args.paced_lines) == \
        (FULL_CALLS, FULL_LINES, FULL_PACED_S, FULL_PACED_LINES)


def _given(argv: list[str]) -> Iterator[str]:
    """The size options of a command line, for the report (not where files went)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--out", "--report", "--work"):
            skip = True
            continue
        if not arg.startswith(("--out=", "--report=", "--work=")):
            yield arg


if __name__ == "__main__":
    sys.exit(main())
