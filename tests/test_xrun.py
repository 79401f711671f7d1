"""Capture overruns under load, on the simulated HAT paced to the clock: the device's clock
does not wait for the daemon, so a daemon starved for more than a capture buffer loses
audio. The loss is counted (receipt, STATUS=, health), nothing crashes, and what comes
after keeps its time in the recording."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from simhelpers import RATE, NotifySocket, decode, receipts, sim_config, step, write_scenario

PERIOD = 160
"""The default period: 20 ms at 8 kHz."""
MARKERS_FROM, MARKER_EVERY, MARKER_S, MARKER_HZ = 3.0, 0.5, 0.04, 1000.0
ONHOOK, DURATION = 11.0, 12.5
"""The on-hook is confirmed 800 ms after it (onhook_confirm_ms), inside the scenario."""
MARKERS = [MARKERS_FROM + k * MARKER_EVERY
           for k in range(int((ONHOOK - 0.5 - MARKERS_FROM) / MARKER_EVERY) + 1)]
"""Line times (s) of the far end's tone bursts, the last one well before the on-hook."""
MARKER_TOLERANCE = 0.005
"""How far from its scripted time a burst may be found (s): the onset detector's own
resolution is a 1 ms step, Opus smears an onset by a few ms."""


def write_markers(path: Path) -> Path:
    """What the far end says: a 40 ms 1 kHz burst every 0.5 s (no call progress tone)."""
    span = MARKERS[-1] - MARKERS_FROM + 1.0
    audio = np.zeros(round(span * RATE))
    burst = np.sin(2 * np.pi * MARKER_HZ * np.arange(round(MARKER_S * RATE)) / RATE)
    for at in MARKERS:
        start = round((at - MARKERS_FROM) * RATE)
        audio[start : start + len(burst)] = 0.5 * 32767 * burst
    return _wav(path, audio)


def write_disclosure(path: Path) -> Path:
    """A short notice (1 s of noise, which the echo check hears well): a test spends its
    time on the recording, not the notice."""
    noise = np.random.default_rng(7).normal(0, 6000, RATE)
    return _wav(path, noise)


def _wav(path: Path, audio: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(np.clip(audio, -32768, 32767).astype("<i2").tobytes())
    return path


def marker_onsets(decoded: np.ndarray) -> list[float]:
    """Where the bursts begin in a recording (s from its first sample): the 1 kHz energy
    over 5 ms, stepped 1 ms, crossing half the bursts' level."""
    step_n, window = RATE // 1000, RATE // 200
    t = np.arange(window) / RATE
    probe = np.exp(-2j * np.pi * MARKER_HZ * t)
    frames = np.lib.stride_tricks.sliding_window_view(decoded, window)[::step_n]
    level = np.abs(frames @ probe)
    threshold = 0.5 * np.percentile(level, 99.5)
    above = level > threshold
    onsets = np.flatnonzero(above[1:] & ~above[:-1]) + 1
    # The window's centre lies half a window after its start.
    return [(i * step_n + window / 2) / RATE for i in onsets]


def retained_health(broker: tuple[str, int]) -> dict[str, Any]:
    """The health the daemon left on the broker (it publishes one as it stops)."""
    got: list[dict[str, Any]] = []
    arrived = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_connect = lambda c, *a: c.subscribe("linerec/office/health", qos=1)

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        got.append(json.loads(m.payload))
        arrived.set()

    client.on_message = on_message
    client.connect(*broker)
    client.loop_start()
    try:
        assert arrived.wait(10), "no retained health"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


class Call:
    """One realtime simulated call (ring, answer, markers, on-hook) under systemd's
    NOTIFY_SOCKET: ``started`` is READY=1, when the line begins at sample 0."""

    def __init__(self, tmp_path: Path, broker: tuple[str, int] | None = None,
                 audio: str = "") -> None:
        self.tmp_path = tmp_path
        config = sim_config(tmp_path, broker, write_disclosure(tmp_path / "notice.wav"),
                            extra=audio)
        scenario = write_scenario(
            tmp_path, step(0.3, "ring") + step(0.5, "offhook")
            + step(MARKERS_FROM, "audio", file=str(write_markers(tmp_path / "markers.wav")))
            + step(ONHOOK, "onhook"), duration=DURATION)
        self.notify = NotifySocket(tmp_path / "notify.sock")
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path)}
        for name in ("JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "linerec.daemon.cli", "simulate", "--realtime",
             "--scenario", str(scenario), "--config", str(config)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started = self.notify.wait_for("READY=1")

    def finish(self) -> tuple[list[dict[str, Any]], str]:
        try:
            stdout, stderr = self.proc.communicate(timeout=60)
        finally:
            self.notify.close()
        assert self.proc.returncode == 0, stderr
        assert "Traceback" not in stderr
        return [json.loads(line) for line in stdout.splitlines()], stderr

    def statuses(self) -> list[str]:
        return [text for _, text in self.notify.messages if text.startswith("STATUS=")]


def check_recording(tmp_path: Path, events: list[dict[str, Any]]) -> tuple[
        dict[str, Any], list[float]]:
    """The call's recording is whole: from its first sample to the on-hook, every gap the
    receipt names silent, and every burst outside a gap at its scripted time. Returns the
    recording's receipt part and the bursts' timing errors (s)."""
    line1 = [e for e in events if e["line"] == "line1" and not e["event"].startswith("ring")]
    assert [e["event"] for e in line1] == [
        "call_started", "disclosure_started", "disclosure_completed", "recording_started",
        "recording_stopped", "call_ended"], line1
    (receipt,) = receipts(tmp_path)
    recording = receipt["recording"]
    first = recording["first_sample"]
    assert first == line1[3]["sample"] and line1[4]["sample"] == round(ONHOOK * RATE)
    assert recording["end_sample"] == round(ONHOOK * RATE)
    assert recording["duration_s"] == round((ONHOOK * RATE - first) / RATE, 3)
    decoded = decode(Path(line1[4]["file"]), tmp_path)
    assert len(decoded) == round(ONHOOK * RATE) - first
    gaps = [(g["sample"] - first, g["lost_samples"]) for g in recording["capture_gaps"]]
    for at, lost in gaps:
        # Silence where the audio was lost (the codec rings up to 20 ms into it when the
        # gap cuts a burst, and an onset after it is smeared ahead by a few ms).
        inside = decoded[at + 160 : at + lost - 80]
        assert not len(inside) or np.sqrt(np.mean(inside**2)) < 50, (at, lost)

    def in_gap(t: float) -> bool:
        return any(at - 80 <= t * RATE <= at + lost + 80 for at, lost in gaps)

    # A burst the gap cuts short still begins where it should.
    expected = [at - first / RATE for at in MARKERS if not in_gap(at - first / RATE)]
    found = [t for t in marker_onsets(decoded) if not in_gap(t)]
    assert len(found) == len(expected), (found, expected, gaps)
    errors = [f - e for f, e in zip(found, expected, strict=True)]
    assert max(abs(e) for e in errors) <= MARKER_TOLERANCE, errors
    return recording, errors


def test_a_stopped_daemon_overruns_the_capture_and_later_audio_keeps_its_time(
        tmp_path: Path, mosquitto: tuple[str, int]) -> None:
    """SIGSTOP of the whole daemon mid-recording, 0.5 s of the wall clock, then SIGCONT:
    the device overran once, lost what came meanwhile (within two periods of the stall),
    the daemon says so in the receipt, STATUS= and the health topic, and every burst after
    the gap is where the far end put it. (Under onhook_confirm_ms, 800 ms: a longer gap
    could hide a hang-up, and ends the recording where it began.)"""
    call = Call(tmp_path, mosquitto)
    stop_at = 7.0
    time.sleep(max(0.0, call.started + stop_at - time.monotonic()))
    stopped = time.monotonic()
    call.proc.send_signal(signal.SIGSTOP)
    time.sleep(0.5)
    call.proc.send_signal(signal.SIGCONT)
    stall = time.monotonic() - stopped
    events, stderr = call.finish()

    recording, errors = check_recording(tmp_path, events)
    # The stop's gap: the largest near 7 s (READY=1, which the test counts from, reaches it
    # a little after the line starts); on a machine loaded by others there may be more,
    # each counted.
    gap = max((g for g in recording["capture_gaps"]
               if abs(g["sample"] - stop_at * RATE) <= 0.3 * RATE),
              key=lambda g: int(g["lost_samples"]))
    assert gap["cause"] == "overrun"
    assert abs(gap["lost_samples"] - stall * RATE) <= 2 * PERIOD, (gap, stall)
    overruns = stderr.count("overrun on capture tap")
    assert overruns == len(recording["capture_gaps"]) >= 1
    assert any(f"overruns: tap {overruns}" in text for text in call.statuses()), \
        call.statuses()
    assert retained_health(mosquitto)["overruns"] == {"tap": overruns}
    print(f"stall {stall:.3f} s, lost {gap['lost_samples']} frames "
          f"({gap['lost_samples'] / RATE - stall:+.3f} s), bursts off by at most "
          f"{max(abs(e) for e in errors) * 1000:.1f} ms")


@pytest.mark.parametrize(("period_frames", "periods"), [(160, 8), (80, 2)],
                         ids=["160ms-buffer", "20ms-buffer"])
def test_a_cpu_load_on_both_cores_loses_nothing_unaccounted(
        tmp_path: Path, period_frames: int, periods: int) -> None:
    """stress-ng on both cores for the whole call: no crash, every overrun (if any) counted
    in STATUS= and the receipt, silence in its place, and every other burst on time. With
    a 20 ms buffer overruns are likely; one around the answer fails the call closed (the
    hook was not watched), which is then what the call must show."""
    stress_ng = shutil.which("stress-ng")
    assert stress_ng, "Debian's stress-ng is a test dependency (Makefile APT_PACKAGES)"
    load = subprocess.Popen([stress_ng, "--cpu", "2", "--timeout", f"{DURATION + 5:.0f}s"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # the workers are running before the call starts
        call = Call(tmp_path, audio=f"\n[audio]\nperiod_frames = {period_frames}\n"
                                    f"periods = {periods}\n")
        events, stderr = call.finish()
    finally:
        load.terminate()
        load.wait(timeout=10)
    total = stderr.count("overrun on capture tap")
    # STATUS= says the count as it rises (it looks every 0.2 s: one in the last moments of
    # the scenario may end the run before it is told).
    told = [int(m) for text in call.statuses()
            for m in re.findall(r"overruns: tap (\d+)", text)]
    assert told == sorted(told) and max(told, default=0) <= total
    failed = [e for e in events if e["event"] == "disclosure_failed"]
    if failed and total:
        assert "capture was lost" in failed[0]["reason"], failed
        report = "the call failed closed"
    else:
        recording, errors = check_recording(tmp_path, events)
        assert all(g["cause"] == "overrun" for g in recording["capture_gaps"])
        assert max(told, default=0) >= len(recording["capture_gaps"]) and \
            total >= len(recording["capture_gaps"])
        report = (f"{len(recording['capture_gaps'])} in the recording, "
                  f"{sum(g['lost_samples'] for g in recording['capture_gaps'])} frames; "
                  f"bursts off by at most {max(abs(e) for e in errors) * 1000:.1f} ms")
    print(f"{period_frames * periods / RATE * 1000:.0f} ms buffer under stress-ng --cpu 2: "
          f"{total} overruns ({report})")
