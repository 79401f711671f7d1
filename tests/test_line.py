"""The line's call state machine, run in-process on the simulated HAT so that a test can
watch the LED pins and break hardware at a chosen moment."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from simhelpers import RECORDED_CALL, RINGING_EVENTS, recordings, sim_config, step, write_scenario

from linerec.audio.pcm import load_line_audio
from linerec.audio.ring import SampleRing
from linerec.daemon.config import PlaybackConfig, load_config, packaged_disclosure
from linerec.daemon.disclosure import DisclosureLibrary
from linerec.daemon.events import EventBus
from linerec.daemon.line import HookEdge, HookFilter, Line
from linerec.daemon.numbers import NumberRules
from linerec.daemon.playback import PlaybackThread
from linerec.daemon.simulate import run_simulation
from linerec.hw.alsa import AlsaPlayback
from linerec.hw.board import WallClock
from linerec.hw.gpio import GpioInput, GpioLed, drive_input, mock_pin_factory, pin_is_high
from linerec.hw.scenario import load_scenario
from linerec.hw.sim import SimulatedHat

LED_PIN = 22


class Watcher:
    """An event sink that also notes the recording LED's level at each event."""

    def __init__(self, hat: SimulatedHat) -> None:
        self.hat = hat
        self.events: list[dict[str, Any]] = []
        self.led: list[bool] = []
        self.on_event: dict[str, Any] = {}

    def publish(self, event: dict[str, Any]) -> None:
        if event["event"] in RINGING_EVENTS:
            return  # these tests follow the calls
        self.events.append(event)
        self.led.append(pin_is_high(self.hat.pin_factory, LED_PIN))
        action = self.on_event.get(event["event"])
        if action:
            action()

    @property
    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]


def simulate(tmp_path: Path, body: str, duration: float = 24.0,
             disclosure: Path | None = None) -> tuple[SimulatedHat, Watcher]:
    config = load_config(sim_config(tmp_path, disclosure=disclosure))
    scenario = load_scenario(write_scenario(tmp_path, body, duration), ["line1", "line2"])
    hat = SimulatedHat(config, scenario, workdir=tmp_path / "work")
    return hat, Watcher(hat)


INBOUND = step(0.5, "ring") + step(5.5, "offhook") + step(20.0, "onhook")


def test_led_is_lit_exactly_while_the_recording_is_open(tmp_path: Path) -> None:
    hat, watcher = simulate(tmp_path, INBOUND)
    run_simulation(hat, [watcher])
    assert watcher.kinds == RECORDED_CALL
    # Off through the disclosure, on from recording_started, off again at recording_stopped.
    assert watcher.led == [False, False, False, True, False, False]


def test_disclosure_file_gone_at_call_time_fails_closed(tmp_path: Path) -> None:
    disclosure = tmp_path / "notice.wav"
    shutil.copy(packaged_disclosure("nl"), disclosure)
    hat, watcher = simulate(tmp_path, INBOUND, disclosure=disclosure)
    disclosure.unlink()  # the config was good at start-up; the file vanished since
    run_simulation(hat, [watcher])
    assert watcher.kinds == ["call_started", "disclosure_failed", "call_ended"]
    assert "cannot be played" in watcher.events[1]["reason"]
    assert str(disclosure) in watcher.events[1]["reason"]
    assert recordings(tmp_path) == []
    assert not any(watcher.led)


def test_line_output_failure_during_disclosure_fails_closed(tmp_path: Path) -> None:
    hat, watcher = simulate(tmp_path, INBOUND)
    watcher.on_event["disclosure_started"] = lambda: hat.break_line_output("line1")
    run_simulation(hat, [watcher])
    assert watcher.kinds == ["call_started", "disclosure_started", "disclosure_failed",
                             "error", "call_ended"] or watcher.kinds == [
        "call_started", "disclosure_started", "disclosure_failed", "call_ended"]
    assert "line output failed" in watcher.events[2]["reason"]
    assert recordings(tmp_path) == []
    assert not any(watcher.led)


def test_hook_filter_dates_edges_and_ignores_bounce_and_flash() -> None:
    period = 160
    hook = HookFilter(debounce=320, onhook_confirm=6400)
    levels = [False] * 5 + [True] + [False] * 3 + [True] * 10 + [False] * 10 + [True] * 20 \
        + [False] * 45
    edges = []
    for index, level in enumerate(levels):
        event = hook.update(index * period, period, level)
        if event:
            edges.append((event.edge, event.at // period, event.length // period))
    # A one-period blip at 5 is bounce; off-hook from 9; a 10-period (200 ms) break at 19
    # is a hook-flash, reported as a break; on-hook from 49, confirmed 40 periods (800 ms)
    # later.
    assert edges == [(HookEdge.OFFHOOK, 9, 0), (HookEdge.BREAK, 19, 10),
                     (HookEdge.ONHOOK, 49, 0)]


def test_played_disclosure_is_sample_exact_for_a_16_khz_line(tmp_path: Path) -> None:
    text = sim_config(tmp_path).read_text() + "\n[audio]\nrate = 16000\nperiod_frames = 320\n"
    (tmp_path / "linerec.toml").write_text(text)
    config = load_config(tmp_path / "linerec.toml")
    scenario = load_scenario(write_scenario(tmp_path, INBOUND), ["line1", "line2"])
    hat = SimulatedHat(config, scenario, workdir=tmp_path / "work")
    watcher = Watcher(hat)
    run_simulation(hat, [watcher])
    assert watcher.kinds == RECORDED_CALL
    played = hat.played("line1")
    assert np.count_nonzero(played) > 0
    assert watcher.events[2]["sample"] > watcher.events[1]["sample"] + 6.5 * 16000


class LineBench:
    """One Line on real hardware adapters (an alsa-lib file PCM as its line output, mock
    pins), ticked by the test itself, so that the capture can run ahead of the engine as it
    does on real hardware, and hook changes can be placed on any period."""

    PERIOD = 160

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **line: Any) -> None:
        asoundrc = tmp_path / "asoundrc"
        asoundrc.write_text(
            'pcm.out { type file slave.pcm "null" file "/dev/null" format "raw" }\n')
        monkeypatch.setenv("ALSA_CONFIG_PATH", f"/usr/share/alsa/alsa.conf:{asoundrc}")
        config = load_config(sim_config(tmp_path))
        # dataclasses.replace skips the config checks: a test may set what a file cannot.
        # The bench has no line that carries the output back to the tap, so the check that
        # the disclosure was heard is off here (tests on the simulated HAT cover it).
        self.config = dataclasses.replace(config.line[0], **{"verify_min_score": 0.0, **line})
        self.factory = mock_pin_factory()
        self.events: list[dict[str, Any]] = []
        self.device = AlsaPlayback(PlaybackConfig("out", "out", channels=1), config.audio)
        self.player = PlaybackThread("out", self.device)
        self.ring = SampleRing(32768)
        self.output = self.player.channel(0, self.ring)
        self.player.start()
        self.line = Line(
            self.config, config.audio, capture_name="tap", capture_period=self.PERIOD,
            capture_buffer=640, ring=self.ring,
            hook=GpioInput(17, active_high=True, name="hook", pin_factory=self.factory),
            ringer=GpioInput(27, active_high=True, name="ring", pin_factory=self.factory),
            polarity=None, led=GpioLed(22, name="led", pin_factory=self.factory),
            output=self.output,
            clock=WallClock(8000), storage=tmp_path / "recordings", device_id="office",
            disclosures=DisclosureLibrary(config, 8000), rules=NumberRules(config.numbers),
            events=EventBus([self]))
        self.position = 0
        # As Recorder.start does: a write never makes the storage itself.
        (tmp_path / "recordings").mkdir()

    def publish(self, event: dict[str, Any]) -> None:
        if event["event"] not in RINGING_EVENTS:
            self.events.append(event)

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def sample_of(self, kind: str) -> int:
        return int(next(e for e in self.events if e["event"] == kind)["sample"])

    def run(self, until: int, changes: dict[int, tuple[int, bool]], lag: int = 0) -> None:
        """Tick up to sample ``until``; ``changes`` maps a sample position to (pin, level);
        ``lag`` is how far the capture is ahead of the engine."""
        if self.position == 0 and lag:
            self.ring.write(np.zeros(lag, np.int16))
        while self.position < until:
            for at, (pin, level) in changes.items():
                if self.position <= at < self.position + self.PERIOD:
                    drive_input(self.factory, pin, high=level)
            self.ring.write(np.zeros(self.PERIOD, np.int16))
            self.line.tick(self.position, self.PERIOD)
            self.position += self.PERIOD
            # As in the engine: the playback thread keeps up with the ticks.
            while self.output.queue:
                time.sleep(0.0005)

    def close(self) -> None:
        self.line.shutdown(self.position)
        self.player.stop()
        self.player.join()
        self.device.close()
        self.factory.close()


HOOK, RING = 17, 27
ANSWERED_AT = {0: (RING, True), 3200: (HOOK, True), 3360: (RING, False)}


def test_disclosure_end_follows_the_capture_clock_when_the_engine_lags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On real hardware the capture runs on, whatever the engine does. If the engine is a
    second behind when it plays the disclosure, the notice leaves the line a second later
    than the tick position says: the recording must not start before that."""
    bench = LineBench(tmp_path, monkeypatch)
    lag = 8000
    try:
        bench.run(20 * 8000, ANSWERED_AT, lag=lag)
        disclosure = load_line_audio(packaged_disclosure("en"), 8000)
        last_sample_played_at = bench.sample_of("disclosure_started") + len(disclosure) + lag
        assert bench.sample_of("disclosure_completed") >= (
            last_sample_played_at + bench.output.buffer_frames)
        assert bench.sample_of("recording_started") == bench.sample_of("disclosure_completed")
    finally:
        bench.close()


def test_a_loop_break_just_before_the_disclosure_end_fails_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "clean").mkdir()
    (tmp_path / "flash").mkdir()
    clean = LineBench(tmp_path / "clean", monkeypatch)
    try:
        clean.run(20 * 8000, ANSWERED_AT)
        line_end = clean.sample_of("disclosure_completed")
    finally:
        clean.close()
    # A 400 ms hook-flash that begins in the last period before the notice has fully left
    # the line: at the tick that would arm the recording it is still shorter than bounce.
    bench = LineBench(tmp_path / "flash", monkeypatch)
    flash = (line_end - 1) // bench.PERIOD * bench.PERIOD
    assert flash < line_end
    try:
        bench.run(20 * 8000, {**ANSWERED_AT, flash: (HOOK, False), flash + 3200: (HOOK, True)})
        assert bench.kinds() == ["call_started", "disclosure_started", "disclosure_failed"]
    finally:
        bench.close()
    assert not list((tmp_path / "flash" / "recordings").rglob("*.opus*"))


def test_a_hang_up_confirmed_as_the_loop_opens_ends_the_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no gap between debounce and on-hook confirmation (which the config refuses),
    the on-hook edge arrives while disclosing: the call must still end there, and the next
    off-hook is a new call."""
    bench = LineBench(tmp_path, monkeypatch, hook_debounce_ms=200, onhook_confirm_ms=200)
    try:
        bench.run(20 * 8000, {**ANSWERED_AT, 40000: (HOOK, False), 80000: (HOOK, True)})
        assert bench.kinds() == ["call_started", "disclosure_started", "disclosure_failed",
                                 "call_ended", "call_started"]
        assert bench.events[3]["sample"] == 40000
        assert bench.events[4]["direction"] == "outbound"
    finally:
        bench.close()


def test_a_silent_line_output_fails_closed_and_three_in_a_row_put_the_line_in_fault(
        tmp_path: Path) -> None:
    """The output plays without an error, but the line does not carry it: the disclosure
    is not heard, so nothing is recorded; after three such calls the LED blinks, and the
    first call whose disclosure is heard again clears the fault."""
    calls = ""
    for n in range(4):
        at = 0.5 + 18 * n
        calls += step(at, "ring") + step(at + 5.0, "offhook") + step(at + 16.0, "onhook")
    hat, watcher = simulate(tmp_path, calls, duration=4 * 18.0)
    hat.silence_line_output("line1")
    led_pin = hat.pin_factory.pin(LED_PIN)
    blinks: list[int] = []

    def after_the_third_call() -> None:
        if watcher.kinds.count("line_fault") == 1 and not blinks:
            # The engine waits here; the LED blinks from gpiozero's own thread meanwhile.
            before = len(led_pin.states)
            time.sleep(1.5)
            blinks.append(len(led_pin.states) - before)
            hat.silent_outputs.discard("line1")  # the installer fixed the output

    watcher.on_event["call_ended"] = after_the_third_call
    run_simulation(hat, [watcher])
    unheard = ["call_started", "disclosure_started", "error", "disclosure_failed", "call_ended"]
    assert watcher.kinds == unheard * 2 + unheard[:4] + ["line_fault", "call_ended"] \
        + RECORDED_CALL[:3] + ["line_recovered", *RECORDED_CALL[3:]]
    failed = [e for e in watcher.events if e["event"] == "disclosure_failed"]
    assert all("not heard on the line" in e["reason"] for e in failed)
    assert len(list((tmp_path / "recordings").rglob("*.json"))) == 4
    assert len(recordings(tmp_path)) == 1
    # 0.2 s on, 0.8 s off: in 1.5 s at least one whole flash, on and off.
    assert blinks and blinks[0] >= 2
    # Recording again: steady on while the fourth call records, off after it.
    recording = watcher.kinds.index("recording_started")
    assert watcher.led[recording] is True and watcher.led[-1] is False
