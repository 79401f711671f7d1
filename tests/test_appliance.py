"""The appliance around the lines: the storage guard, the LEDs that tell an office what
the box is doing, and the HAT profiles an installer names in the config."""

from __future__ import annotations

import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from simhelpers import linerec, receipts, sim_config, step, write_scenario

from linerec.daemon.archive import RetentionSweeper
from linerec.daemon.config import (
    ConfigError,
    StorageGuardConfig,
    hat_profiles,
    load_config,
    packaged_disclosure,
)
from linerec.daemon.events import EventBus
from linerec.daemon.simulate import run_simulation
from linerec.daemon.storage_guard import MB, SpaceLevel, StorageGuard
from linerec.hw.scenario import load_scenario
from linerec.hw.sim import SimulatedHat

SERVICE_LED = 26
LINE1_LED = 22


class Events:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.on_event: dict[str, Any] = {}

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        action = self.on_event.pop(event["event"], None)
        if action:
            action()

    def kinds(self, line: str | None = "line1") -> list[str]:
        return [e["event"] for e in self.events if e["line"] == line]


def free_mb(path: Path) -> int:
    return shutil.disk_usage(path).free // MB


def toggle_intervals(hat: SimulatedHat, pin: int, seconds: float) -> list[float]:
    """Watch a mock output pin for a while: the times between its level changes (a mock
    pin notes each change with the time since the one before)."""
    states = hat.pin_factory.pin(pin).states
    before = len(states)
    time.sleep(seconds)
    return [s.timestamp for s in states[before + 1:]]


def simulate(tmp_path: Path, body: str, extra: str, duration: float, *, top: str = ""
             ) -> tuple[SimulatedHat, Events]:
    """The simulated two-line layout; ``top`` holds top-level keys, ``extra`` tables."""
    (tmp_path / "recordings").mkdir(exist_ok=True)
    path = sim_config(tmp_path, extra=extra)
    path.write_text(top + path.read_text())
    config = load_config(path)
    scenario = load_scenario(write_scenario(tmp_path, body, duration), ["line1", "line2"])
    return SimulatedHat(config, scenario, workdir=tmp_path / "work"), Events()


CALL = step(0.5, "ring") + step(5.5, "offhook") + step(20.0, "onhook")


def test_a_full_card_turns_calls_away_at_their_start_and_says_so(tmp_path: Path) -> None:
    """Under the floor nothing new is recorded: no disclosure, a receipt that says why,
    a storage_full alarm, the lines' LEDs and the service LED blinking."""
    (tmp_path / "recordings").mkdir()
    floor = free_mb(tmp_path) + 100_000  # far above what this disk has free
    hat, sink = simulate(tmp_path, CALL, f"[storage_guard]\nlow_mb = {floor}\n"
                         f"floor_mb = {floor}\n", 24.0, top=f"service_led_pin = {SERVICE_LED}\n")
    seen: dict[str, list[float]] = {}

    def watch_leds() -> None:
        # The engine waits here; the LEDs blink from gpiozero's own threads meanwhile.
        seen["line"] = toggle_intervals(hat, LINE1_LED, 3.5)
        seen["service"] = toggle_intervals(hat, SERVICE_LED, 2.5)

    sink.on_event["call_started"] = watch_leds
    run_simulation(hat, [sink])
    full = next(e for e in sink.events if e["event"] == "storage_full")
    assert full["line"] is None and full["free_mb"] < floor
    assert "new calls are not recorded" in full["message"]
    assert sink.kinds() == ["ringing", "call_started", "call_ended"]
    ended = next(e for e in sink.events if e["event"] == "call_ended")
    assert ended["rule"] == "storage_full" and ended["recorded"] is False
    (receipt,) = receipts(tmp_path)
    assert receipt["rule"] == "storage_full" and receipt["recording"] is None
    assert receipt["disclosure"]["status"] == "not_played"
    assert not list((tmp_path / "recordings").rglob("*.opus"))
    # Slow even blinking (1 s on, 1 s off) on the line; faster (0.5 s) on the service LED.
    assert seen["line"] and all(0.8 < gap < 1.3 for gap in seen["line"]), seen
    assert len(seen["service"]) >= 3 and all(0.35 < g < 0.8 for g in seen["service"]), seen


def test_service_led_is_steady_when_all_is_well_and_off_when_stopped(tmp_path: Path) -> None:
    hat, sink = simulate(tmp_path, CALL, "", 24.0, top=f"service_led_pin = {SERVICE_LED}\n")
    during: dict[str, Any] = {}

    def look() -> None:
        pin = hat.pin_factory.pin(SERVICE_LED)
        during["level"] = pin.state
        during["changes"] = len(toggle_intervals(hat, SERVICE_LED, 1.2))

    sink.on_event["recording_started"] = look
    run_simulation(hat, [sink])
    assert during == {"level": True, "changes": 0}
    assert not any(e["event"].startswith("storage_") for e in sink.events)
    assert hat.pin_factory.pin(SERVICE_LED).state is False


def test_low_space_runs_retention_at_once_and_levels_change_with_a_margin(
        tmp_path: Path) -> None:
    bus_events = Events()
    bus = EventBus([bus_events])
    sweeper = RetentionSweeper(tmp_path, bus, interval_s=3600)
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while sweeper.sweeps < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        free = free_mb(tmp_path)
        guard = StorageGuard(tmp_path, StorageGuardConfig(low_mb=free + 100_000, floor_mb=0),
                             bus, on_low=sweeper.sweep_now)
        assert guard.check() is SpaceLevel.LOW
        # The sweep that would have come in an hour comes now.
        while sweeper.sweeps < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sweeper.sweeps == 2
        low = bus_events.events[-1]
        assert low["event"] == "storage_low" and "expired calls are being deleted" in \
            low["message"]
        # Just above the floor, by less than the margin: still full, no flapping.
        guard.config = StorageGuardConfig(low_mb=free + 100_000, floor_mb=free + 100_000)
        assert guard.check() is SpaceLevel.FULL
        guard.config = StorageGuardConfig(low_mb=free + 100_000, floor_mb=max(free - 5, 0))
        assert guard.check() is SpaceLevel.FULL
        # Space came back: recording resumes.
        guard.config = StorageGuardConfig(low_mb=0, floor_mb=0)
        assert guard.check() is SpaceLevel.OK and not guard.refusing
        kinds = [e["event"] for e in bus_events.events if e["event"].startswith("storage")]
        assert kinds == ["storage_low", "storage_full", "storage_ok"]
    finally:
        sweeper.stop()
        sweeper.join(5)


def test_vanished_storage_fails_closed(tmp_path: Path) -> None:
    bus_events = Events()
    guard = StorageGuard(tmp_path / "gone", StorageGuardConfig(), EventBus([bus_events]))
    assert guard.check() is SpaceLevel.FULL
    assert "cannot be measured" in bus_events.events[0]["message"]


# ---- HAT profiles ---------------------------------------------------------------------

PROFILE_CONFIG = f"""
hat = "generic-2line"
storage = "recordings"

[[purpose]]
name = "service"
text = "To handle the caller's request."
lawful_basis = "contract"
retention_days = 90

[[disclosure]]
name = "welcome"
purpose = "service"
parts = [{{ language = "en", file = "{packaged_disclosure('en')}" }}]
"""


def test_every_shipped_profile_is_complete() -> None:
    profiles = hat_profiles()
    assert {"generic-2line", "generic-4line"} <= set(profiles)
    for name, path in profiles.items():
        data = tomllib.loads(path.read_text())
        assert data["overlay"] in data["config_txt"], name
        lines = "".join(f'[[line]]\nname = "{line["name"]}"\ndisclosure = "welcome"\n'
                        for line in data["line"])
        config = PROFILE_CONFIG.replace("generic-2line", name) + lines
        loaded = _load(config, Path("/tmp"))
        assert [line.name for line in loaded.line] == [line["name"] for line in data["line"]]
        assert loaded.service_led_pin == data["service_led_pin"]


def _load(text: str, folder: Path) -> Any:
    path = folder / f"profile-{time.monotonic_ns()}.toml"
    path.write_text(text)
    try:
        return load_config(path)
    finally:
        path.unlink()


def test_a_config_names_a_profile_and_overrides_a_pin(tmp_path: Path) -> None:
    path = tmp_path / "linerec.toml"
    path.write_text(PROFILE_CONFIG + """
[[line]]
name = "line2"
disclosure = "welcome"
ring_pin = 16
hook_active_high = false
""")
    config = load_config(path)
    (line,) = config.line
    assert (line.name, line.hook_pin, line.ring_pin, line.led_pin) == ("line2", 23, 16, 25)
    assert line.hook_active_high is False and line.polarity_pin == 6
    assert config.capture[0].device == "hw:CARD=audioinjectorpi"
    result = linerec("check-config", str(path))
    assert result.returncode == 0 and "1 line(s): line2" in result.stdout


@pytest.mark.parametrize(("change", "key", "words"), [
    (('hat = "generic-2line"', 'hat = "generic-9line"'), "hat", "use one of generic-2line"),
    (('hat = "generic-2line"', 'hat = "mine.toml"'), "hat", "cannot be read"),
    (("", '[[line]]\nname = "line7"\ndisclosure = "welcome"\n'), "line[0].name",
     "not a line of the HAT profile 'generic-2line' (it has line1, line2)"),
    (("", '[[line]]\nname = "line1"\ndisclosure = "welcome"\nring_pin = 26\n'),
     "line[0].ring_pin", "GPIO 26 is already used as service_led_pin"),
    (("", '[[line]]\nname = "line1"\ndisclosure = "welcome"\nring_pin = 19\n'),
     "line[0].ring_pin", "GPIO 19 is already used as a pin of the HAT's codec (profile "
     "'generic-2line' reserves 2, 3, 18, 19, 20, 21)"),
])
def test_profile_mistakes_name_the_key(tmp_path: Path, change: tuple[str, str], key: str,
                                       words: str) -> None:
    old, new = change
    text = PROFILE_CONFIG.replace(old, new) if old else PROFILE_CONFIG + new
    if old:
        text += '[[line]]\nname = "line1"\ndisclosure = "welcome"\n'
    path = tmp_path / "linerec.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}: {key}: " in str(error.value) and words in str(error.value)


def test_a_lost_capture_device_blinks_its_lines_leds_until_it_is_back(
        tmp_path: Path) -> None:
    """The simulated device is back as soon as it is reopened; the engine holds here (in
    the event's callback) right after it said the device failed, which is how long the
    lines' LEDs are watched."""
    hat, sink = simulate(tmp_path, step(2.0, "unplug", seconds=3.0), "", 10.0)
    seen: dict[str, Any] = {}

    def watch() -> None:
        seen["line"] = toggle_intervals(hat, LINE1_LED, 2.2)

    sink.on_event["error"] = watch
    run_simulation(hat, [sink])
    # The fault blink: 0.2 s on, 0.8 s off.
    assert seen["line"] and all(0.1 < gap < 0.3 or 0.65 < gap < 0.95
                                for gap in seen["line"]), seen
    assert hat.pin_factory.pin(LINE1_LED).state is False  # back, then stopped


def test_the_daemon_reports_failed_start_up_checks_once_until_they_pass(
        tmp_path: Path) -> None:
    """`linerec run` runs doctor's checks that need no exclusive hardware at start and
    every minute: a failure is one check_failed event (journal, MQTT) and a problem the
    service LED shows, until the check passes again."""
    import dataclasses

    from linerec.daemon.runtime import Recorder
    from linerec.daemon.service import StartupChecks

    (tmp_path / "recordings").mkdir()
    above = free_mb(tmp_path) + 100_000
    config = load_config(sim_config(
        tmp_path, extra=f"[storage_guard]\nlow_mb = {above}\nfloor_mb = {above}\n"))
    scenario = load_scenario(write_scenario(tmp_path, "", 1.0), ["line1", "line2"])
    hat = SimulatedHat(config, scenario, workdir=tmp_path / "work")
    sink = Events()
    recorder = Recorder(config, hat, EventBus([sink]))
    checks = StartupChecks(recorder)
    try:
        checks.run()
        checks.run()  # not due again yet
        failed = [e for e in sink.events if e["event"] == "check_failed"]
        storage = [e for e in failed if e["check"] == "storage"]
        assert len(storage) == 1 and "storage_guard.floor_mb" in storage[0]["message"]
        assert storage[0]["fix"].startswith("make room on that disk")
        assert "check failed: storage" in recorder.problems()
        # The installer made room (here: the thresholds), and a minute later it passes.
        recorder.config = dataclasses.replace(config, storage_guard=StorageGuardConfig(0, 0))
        checks._due = 0.0
        checks.run()
        assert "storage" not in recorder.check_failures
        assert len([e for e in sink.events if e["event"] == "check_failed"]) == len(failed)
    finally:
        hat.close()


def test_a_config_takes_away_what_the_profile_sets_with_none(tmp_path: Path) -> None:
    """An exchange that does not reverse the polarity: without the input, the answer of
    an outbound call is heard (ringback, then speech) instead."""
    path = tmp_path / "linerec.toml"
    path.write_text(PROFILE_CONFIG.replace('hat = "generic-2line"',
                                           'hat = "generic-2line"\nservice_led_pin = "none"')
                    + '[[line]]\nname = "line1"\ndisclosure = "welcome"\n'
                    'polarity_pin = "none"\n')
    config = load_config(path)
    assert config.line[0].polarity_pin is None and config.service_led_pin is None
    assert config.line[0].hook_pin == 17


@pytest.mark.parametrize(("profile", "words"), [
    ('[[capture]]\ndevice = "hw:0"\n', "capture[0].name: missing"),
    ('[line]\nname = "line1"\n', "line: expected a list of tables ([[line]])"),
    ('[[line]]\nname = "line1"\nverify_min_score = 0.05\n',
     "line[0].verify_min_score: not a wiring key"),
    ('reserved_pins = "18-21"\n', "reserved_pins: expected a list of BCM GPIO numbers"),
    ('colour = "red"\n', "colour: unknown key"),
])
def test_a_broken_profile_of_ones_own_is_named(tmp_path: Path, profile: str,
                                               words: str) -> None:
    (tmp_path / "my-hat.toml").write_text(profile)
    path = tmp_path / "linerec.toml"
    path.write_text(PROFILE_CONFIG.replace("generic-2line", "my-hat.toml")
                    + '[[line]]\nname = "line1"\ndisclosure = "welcome"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}: hat: the HAT profile {tmp_path / 'my-hat.toml'}: {words}" in \
        str(error.value)
    result = linerec("check-config", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_a_failed_line_output_stops_the_watchdog_so_that_systemd_reopens_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The playback device goes away (the codec resets): its lines could not disclose,
    so no more WATCHDOG=1, and systemd's restart reopens it. Until then pings come."""
    import socket
    import threading

    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    (tmp_path / "recordings").mkdir()
    config = load_config(sim_config(tmp_path))
    scenario = load_scenario(write_scenario(tmp_path, step(3.0, "ring"), 7.0),
                             ["line1", "line2"])
    hat = SimulatedHat(config, scenario, workdir=tmp_path / "work", realtime=True)
    sink = Events()
    broken: list[float] = []

    def break_output() -> None:
        broken.append(time.monotonic())
        hat.break_line_output("line1")

    sink.on_event["ringing"] = break_output
    pings: list[float] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                if sock.recv(4096) == b"WATCHDOG=1":
                    pings.append(time.monotonic())
            except TimeoutError:
                continue

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        run_simulation(hat, [sink])
    finally:
        done.set()
        reader.join()
        sock.close()
    assert broken
    before = [at for at in pings if at < broken[0]]
    after = [at for at in pings if at > broken[0] + 0.7]
    assert len(before) >= 3, pings
    assert after == [], (broken, pings)
