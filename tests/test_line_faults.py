"""Line faults on the simulated HAT: GPIO chatter for minutes, and the wall clock being set
during a call. Real components throughout (alsa-lib, libopus, gpiozero's mock pins, the
daemon as a process); only the HAT is simulated."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from simhelpers import (
    RATE,
    receipts,
    recordings,
    sim_config,
    step,
    write_scenario,
)

from linerec.hw.scenario import ScenarioError, load_scenario

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
PERIOD = 160
"""The capture period of the simulated config (20 ms at 8 kHz)."""
EDGE_TOLERANCE = round(0.150 * RATE)
"""A call's start and end dated within 150 ms of the scripted off-hook and on-hook (the
soak test's bound): the debounce and the contact bounce are inside it."""


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def simulate(tmp_path: Path, scenario: Path, config: Path) \
        -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run ``linerec simulate`` as its own process: its events, and what the process used
    (CPU seconds from wait4; peak RSS in MB, the kernel's high-water mark of the process
    after its exec, read while it runs: wait4's ru_maxrss would count the pages it shared
    with this test process between fork and exec; wall seconds)."""
    out, err = tmp_path / "events.jsonl", tmp_path / "stderr.txt"
    began = time.monotonic()
    peak_kb = 0
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "linerec.daemon.cli", "simulate", "--scenario",
             str(scenario), "--config", str(config), "--workdir", str(tmp_path / "work")],
            stdout=stdout, stderr=stderr)
        status_file = Path(f"/proc/{process.pid}/status")
        while True:
            try:
                hwm = re.search(r"^VmHWM:\s+(\d+)", status_file.read_text(), re.M)
            except OSError:
                hwm = None
            if hwm is None:  # a zombie has no memory left to read: it has ended
                break
            peak_kb = max(peak_kb, int(hwm[1]))
            time.sleep(0.05)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, err.read_text()
    assert " ERROR " not in err.read_text() and "Traceback" not in err.read_text()
    return [json.loads(line) for line in out.read_text().splitlines()], {
        "wall_s": time.monotonic() - began,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mb": peak_kb / 1024,
    }


def of_kind(events: list[dict[str, Any]], kind: str, line: str | None = None) \
        -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind and (line is None or e["line"] == line)]


FLAP_S = 180.0
"""Three minutes of line time with the hook and ring inputs chattering."""


def flapping_line(caller_speech: Path) -> tuple[str, list[dict[str, Any]]]:
    """A scenario of both lines chattering for three minutes, with real calls inside; and the
    calls it scripts: line, direction, off-hook and on-hook (seconds), what is recorded."""
    speech = str(caller_speech)
    glitches = {"glitch_ms": 10, "gap_ms": 300}
    rings = {"input": "ring", "glitch_ms": 10, "gap_ms": 2000}
    body = (
        # Chatter: loop-open or off-hook blips under the 40 ms debounce, mean gap 150 ms;
        # ring detector blips, mean gap 1 s. The script's own edges are left where they are.
        step(0.0, "chatter", until=FLAP_S, seed=1, **glitches)
        + step(0.0, "chatter", until=FLAP_S, seed=2, **rings)
        + step(0.0, "chatter", line="line2", until=30.0, seed=3, **glitches)
        + step(62.0, "chatter", line="line2", until=FLAP_S, seed=4, **glitches)
        + step(0.0, "chatter", line="line2", until=FLAP_S, seed=5, **rings)
        # line1, call 1: inbound, every edge bouncing; the hook chatters all through it.
        + step(10.0, "ring", bounce_ms=5)
        + step(20.3, "offhook", bounce_ms=10)
        + step(26.0, "audio", file=speech)
        + step(50.0, "onhook", bounce_ms=10)
        # line2, call 2: outbound, pulse dialled (60 ms break / 40 ms make, 10 pps; no
        # chatter while it dials, or the digits would be another number), answered by the
        # polarity reversal.
        + step(30.5, "offhook", line="line2", bounce_ms=10)
        + step(31.0, "pulse", line="line2", digits="0612")
        + step(35.5, "tone", line="line2", kind="ringback", until=42.0)
        + step(42.0, "answer", line="line2")
        + step(42.5, "audio", line="line2", file=speech)
        + step(60.0, "onhook", line="line2", bounce_ms=10)
        # line1, call 3: inbound with a hook-flash (100 ms break) while recording: the
        # recording ends there, the call goes on to its on-hook.
        + step(100.0, "ring", bounce_ms=5)
        + step(106.2, "offhook", bounce_ms=10)
        + step(112.0, "audio", file=speech)
        + step(130.0, "flash")
        + step(150.0, "onhook", bounce_ms=10)
        # line2, call 4: inbound, chatter all through.
        + step(140.0, "ring", line="line2", bounce_ms=5)
        + step(145.4, "offhook", line="line2", bounce_ms=10)
        + step(150.0, "audio", line="line2", file=speech)
        + step(170.0, "onhook", line="line2", bounce_ms=10)
    )
    calls = [
        {"line": "line1", "direction": "inbound", "offhook": 20.3, "onhook": 50.0,
         "stop": "call_ended"},
        {"line": "line2", "direction": "outbound", "offhook": 30.5, "onhook": 60.0,
         "stop": "call_ended", "number": "0612"},
        {"line": "line1", "direction": "inbound", "offhook": 106.2, "onhook": 150.0,
         "stop": "hook_flash", "flash": 130.0},
        {"line": "line2", "direction": "inbound", "offhook": 145.4, "onhook": 170.0,
         "stop": "call_ended"},
    ]
    return body, calls


def test_a_line_flapping_for_minutes_has_exactly_one_call_per_real_call(
        tmp_path: Path, caller_speech: Path) -> None:
    """Three minutes of hook and ring chatter on both lines, bounce on every scripted edge,
    pulse dialling and a hook-flash: exactly the scripted calls, each once (events, receipts,
    recordings), dated to the script; nothing spurious; CPU and memory of the daemon sane."""
    body, calls = flapping_line(caller_speech)
    scenario = write_scenario(tmp_path, body, duration=FLAP_S)
    config = sim_config(tmp_path)
    # line2 has a polarity input: its outbound call is answered by the reversal.
    config.write_text(config.read_text().replace("led_pin = 25\n",
                                                 "led_pin = 25\npolarity_pin = 5\n"))
    changes = load_scenario(scenario, ["line1", "line2"]).gpio_changes(RATE)
    chatter = sum(1 for c in changes if c.input in ("hook", "ring"))
    events, used = simulate(tmp_path, scenario, config)
    print(f"{FLAP_S / 60:g} min of line time, {chatter} hook and ring edges, "
          f"{len(calls)} calls scripted; {used}")

    assert of_kind(events, "error") == [] and of_kind(events, "disclosure_failed") == []
    assert of_kind(events, "line_fault") == []
    started = of_kind(events, "call_started")
    ended = of_kind(events, "call_ended")
    assert len(started) == len(ended) == len(calls), [
        (e["event"], e["line"], e["sample"] / RATE) for e in started + ended]
    stored = {r["call_id"]: r for r in receipts(tmp_path)}
    assert len(stored) == len(calls)
    assert len(recordings(tmp_path)) == len(calls)
    for call in calls:
        line = call["line"]
        [start] = [e for e in started
                   if e["line"] == line and abs(e["sample"] - call["offhook"] * RATE)
                   <= EDGE_TOLERANCE]
        [end] = [e for e in ended if e["call_id"] == start["call_id"]]
        assert abs(end["sample"] - call["onhook"] * RATE) <= EDGE_TOLERANCE
        assert end["reason"] == "onhook" and end["recorded"] is True
        assert start["direction"] == call["direction"]
        receipt = stored[start["call_id"]]
        assert receipt["state"] == "closed" and receipt["direction"] == call["direction"]
        assert receipt["disclosure"]["status"] == "completed"
        assert receipt["recording"]["stop_reason"] == call["stop"]
        assert receipt["recording"]["lost_samples"] == 0
        assert receipt["clock_steps"] == []
        if "number" in call:
            assert receipt["number"]["value"] == call["number"]
            assert receipt["number"]["source"] == "dialled_pulse"
        if "flash" in call:
            # Cut at the flash (the loop opened there), not before: the call went on.
            assert abs(receipt["recording"]["end_sample"] - call["flash"] * RATE) <= PERIOD
    # The ring chatter rang no phone: one "ringing" per scripted ring, none stopped
    # unanswered (a ring blip before call 2 would have made it inbound).
    rang = [(e["line"], e["sample"] / RATE) for e in of_kind(events, "ringing")]
    assert [line for line, _ in rang] == ["line1", "line1", "line2"], rang
    for (_, at), scripted in zip(rang, (10.0, 100.0, 140.0), strict=True):
        assert scripted <= at <= scripted + PERIOD / RATE
    assert of_kind(events, "ringing_stopped") == []
    assert len(of_kind(events, "recording_started")) == len(calls)
    # Sane: the daemon (and the simulated line in its process) under 1.5 cores, and no
    # growth for minutes of chatter worth mentioning.
    assert used["cpu_s"] < used["wall_s"] * 1.5
    assert used["max_rss_mb"] < 300


def test_hook_chatter_that_never_settles_ends_the_call_where_it_began(
        tmp_path: Path) -> None:
    """Hum on a wet pair: the hook input flips every few milliseconds and never holds a
    level for the debounce. Whether the caller hung up cannot be told, so the call and its
    recording end where the chatter began (`hook_unsettled`), and a second caller answered
    during it is not recorded in the first one's call, nor at all: it never settles."""
    scenario = write_scenario(tmp_path, (
        step(0.5, "ring") + step(1.0, "offhook") + step(14.0, "onhook")
        + step(10.0, "chatter", until=40.0, glitch_ms=10, gap_ms=20, seed=1)
        + step(20.0, "ring") + step(22.0, "offhook") + step(38.0, "onhook")), duration=42.0)
    events, _ = simulate(tmp_path, scenario, sim_config(tmp_path))
    line1 = [e for e in events if e["line"] == "line1"]
    (ended,) = of_kind(line1, "call_ended")
    assert ended["reason"] == "hook_unsettled" and ended["sample"] == 10 * RATE
    (stopped,) = of_kind(line1, "recording_stopped")
    assert stopped["sample"] == 10 * RATE
    assert len(of_kind(line1, "call_started")) == 1
    (receipt,) = receipts(tmp_path)
    assert receipt["end_reason"] == "hook_unsettled"
    assert receipt["recording"]["end_sample"] == 10 * RATE


def test_unknown_chatter_and_clock_step_keys_name_the_step(tmp_path: Path) -> None:
    """The new steps are checked like the others: the message names step[i].<key>."""
    cases = [
        (step(1.0, "chatter", until=2.0, input="polarity"), "step[0].input"),
        (step(1.0, "chatter"), "step[0].until"),
        (step(1.0, "chatter", until=9.0, gap_ms=0.5), "step[0].gap_ms"),
        (step(0.0, "chatter", until=100.0, gap_ms=1, glitch_ms=0.1), "step[0].gap_ms"),
        (step(1.0, "offhook", bounce_ms=500), "step[0].bounce_ms"),
        (step(1.0, "ring", seed=-1), "step[0].seed"),
        (step(1.0, "clock_step", seconds=0), "step[0].seconds"),
        (step(1.0, "clock_step", seconds=1e9), "step[0].seconds"),
        (step(1.0, "clock_step", line="line9", seconds=60), "step[0].line"),
    ]
    for body, key in cases:
        with pytest.raises(ScenarioError, match=rf"scenario.toml: {re.escape(key)}: "):
            load_scenario(write_scenario(tmp_path, body, duration=100.0), ["line1", "line2"])
    # A clock step belongs to the appliance: it needs no line.
    lineless = write_scenario(tmp_path, '[[step]]\nat = 1.0\ndo = "clock_step"\n'
                              "seconds = -3600\n", duration=10.0)
    assert load_scenario(lineless, ["line1"]).clock_steps(RATE) == [(RATE, -3600.0)]


HOURS_3 = 3 * 3600.0


def test_clock_steps_during_calls_are_in_their_receipts(tmp_path: Path,
                                                        caller_speech: Path) -> None:
    """NTP sets the clock 3 h forward during one call and 1 h back during the next: each
    receipt lists its step (where, when, how far), the durations still come from the
    samples, and a step back that gives two calls the same start second leaves their call
    ids apart."""
    speech = str(caller_speech)
    body = (step(0.5, "ring") + step(1.0, "offhook") + step(8.0, "audio", file=speech)
            + step(12.0, "clock_step", seconds=HOURS_3) + step(20.0, "onhook")
            # Between the calls, back by 3 h 24 s: the next call starts, by the wall clock,
            # in the second the first one did.
            + step(22.0, "clock_step", seconds=-HOURS_3 - 24)
            + step(23.5, "ring") + step(25.0, "offhook") + step(31.0, "audio", file=speech)
            + step(35.0, "clock_step", line="line2", seconds=-3600)
            + step(45.0, "onhook"))
    scenario = write_scenario(tmp_path, body, duration=47.0)
    events, _ = simulate(tmp_path, scenario, sim_config(tmp_path))
    first, second = of_kind(events, "call_started")
    epoch = parse(first["ts"]).timestamp() - first["sample"] / RATE
    by_id = {r["call_id"]: r for r in receipts(tmp_path)}
    assert len(by_id) == 2 and first["call_id"] != second["call_id"]
    one, two = by_id[first["call_id"]], by_id[second["call_id"]]
    assert one["started_at"] == two["started_at"]  # the same millisecond, even
    assert first["call_id"][:16] == second["call_id"][:16]

    # Where the step was seen: the tick that ends just after it.
    for receipt, at, seconds, offset_after in ((one, 12.0, HOURS_3, HOURS_3),
                                               (two, 35.0, -3600.0, -3624.0)):
        [seen] = receipt["clock_steps"]
        assert seen["seconds"] == seconds
        assert at * RATE < seen["sample"] <= at * RATE + PERIOD
        assert parse(seen["at"]).timestamp() == pytest.approx(
            epoch + seen["sample"] / RATE + offset_after, abs=0.001)
    # Durations from the samples; the wall-clock times differ by the step as well.
    ended = {e["call_id"]: e for e in of_kind(events, "call_ended")}
    for receipt, length, stepped in ((one, 19.0, HOURS_3), (two, 20.0, -3600.0)):
        assert ended[receipt["call_id"]]["duration_s"] == length
        wall = (parse(receipt["ended_at"]) - parse(receipt["started_at"])).total_seconds()
        assert wall == pytest.approx(length + stepped, abs=0.001)
        recording = receipt["recording"]
        assert recording["duration_s"] == pytest.approx(
            (recording["end_sample"] - recording["first_sample"]) / RATE, abs=0.03)
        assert recording["status"] == "complete"
    stderr = (tmp_path / "stderr.txt").read_text()
    assert stderr.count("the wall clock stepped by") == 3
    assert f"set 1 time(s), by +10800.000 s in all, during call {one['call_id']}" in stderr
    assert f"set 1 time(s), by -3600.000 s in all, during call {two['call_id']}" in stderr


FAKED = textwrap.dedent("""
    import json, select, sys, time
    from pathlib import Path
    from linerec.hw.board import WallClock

    offset = Path(sys.argv[1])
    clock, position, real = WallClock(8000), 0, []
    for tick in range(60):
        if tick == 20:
            offset.write_text("+2h")    # NTP sets the clock forward
        if tick == 30:
            select.select([], [], [], 0.5)  # the engine stalls: no step
        if tick == 40:
            offset.write_text("-30m")   # and back
        position += 160
        clock.advance("tap", position)
        real.append(time.time())
        select.select([], [], [], 0.02)  # time.sleep: EINVAL under libfaketime
    print(json.dumps({
        "steps": [[s.sample, s.at.timestamp(), s.seconds] for s in clock.steps("tap", 0)],
        "last": clock.timestamp("tap", position).timestamp()}))
""")


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs libfaketime (apt faketime)")
def test_wall_clock_finds_real_steps_under_libfaketime(tmp_path: Path) -> None:
    """The real WallClock, with the process's wall clock set by libfaketime (the monotonic
    clock left alone, as NTP leaves it): two steps found, each to the millisecond; an
    engine stall of 0.5 s is not one."""
    offset = tmp_path / "offset"
    offset.write_text("+0")
    env = {**os.environ, "LD_PRELOAD": str(LIBFAKETIME),
           "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_NO_CACHE": "1",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    result = subprocess.run([sys.executable, "-c", FAKED, str(offset)], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    print("steps found:", found["steps"])
    (forward, back) = found["steps"]
    assert forward[0] == 21 * 160 and back[0] == 41 * 160
    assert forward[2] == pytest.approx(7200, abs=0.005)
    assert back[2] == pytest.approx(-9000, abs=0.005)
    assert found["last"] == pytest.approx(time.time() - 1800, abs=5)
    assert "the wall clock stepped by +7200.0" in result.stderr
