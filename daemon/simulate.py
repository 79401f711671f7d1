"""`linerec simulate` and `linerec demo`: the real daemon on the simulated HAT."""

from __future__ import annotations

import logging
import threading
from importlib.resources import files
from pathlib import Path
from typing import Any, TextIO

from linerec.daemon.config import Config, config_from_dict
from linerec.daemon.events import EventBus, EventSink
from linerec.daemon.runtime import Recorder
from linerec.daemon.service import Outcome, serve
from linerec.daemon.supervisor import ServiceNotifier
from linerec.daemon.telemetry import MqttInterface
from linerec.hw.sim import SimulatedHat

logger = logging.getLogger(__name__)


def demo_scenario() -> Path:
    return Path(str(files("linerec.hw") / "scenarios" / "demo.toml"))


EXAMPLE_PURPOSE = {
    "name": "service",
    "text": "To handle the caller's request and to improve our service, under our "
            "agreement with the caller.",
    "lawful_basis": "contract",
    "retention_days": 90,
}
"""The purpose the shipped example disclosures announce (scripts/make-disclosures)."""


def simulated_config(storage: Path) -> Config:
    """The built-in config of the simulated HAT: two lines on one two-channel tap, their
    disclosures played through one two-channel line output. Calls are announced in Dutch
    and English with the shipped example disclosures; line2's HAT input sees the line
    polarity reversal that marks the answer of an outbound call."""
    return config_from_dict(
        {
            "device_id": "linerec-sim",
            "storage": str(storage),
            "capture": [{"name": "tap", "device": "simulated", "channels": 2}],
            "playback": [{"name": "out", "device": "simulated", "channels": 2}],
            "purpose": [EXAMPLE_PURPOSE],
            "disclosure": [
                {"name": "welcome", "purpose": "service",
                 "parts": [{"language": "nl"}, {"language": "en"}]},
            ],
            "line": [
                {"name": "line1", "capture": "tap", "channel": 0, "playback": "out",
                 "playback_channel": 0, "hook_pin": 17, "ring_pin": 27, "led_pin": 22,
                 "disclosure": "welcome"},
                {"name": "line2", "capture": "tap", "channel": 1, "playback": "out",
                 "playback_channel": 1, "hook_pin": 23, "ring_pin": 24, "led_pin": 25,
                 "polarity_pin": 5, "disclosure": "welcome"},
            ],
        },
        source="<built-in simulated config>",
        base=Path.cwd(),
    )


class RecordingCollector:
    """Remembers the recordings a simulation produced, for the summary at the end."""

    def __init__(self) -> None:
        self.recordings: list[str] = []

    def publish(self, event: dict[str, Any]) -> None:
        if event["event"] == "recording_stopped":
            self.recordings.append(event["file"])


class DemoPrinter:
    """Events as a person reads them."""

    def __init__(self, stream: TextIO, rate: int) -> None:
        self._stream = stream
        self._rate = rate

    def publish(self, event: dict[str, Any]) -> None:
        details = {k: v for k, v in event.items()
                   if k not in ("event", "line", "call_id", "ts", "sample")}
        text = "  ".join(f"{k}={v}" for k, v in details.items())
        seconds = event.get("sample", 0) / self._rate
        self._stream.write(f"[{seconds:7.3f} s] {event['line'] or '-':6} "
                           f"{event['event']:21} {text}\n")
        self._stream.flush()


class RestartToApply(Exception):
    """Device settings changed over MQTT; every line is free: restart to apply them."""


def run_simulation(
    hat: SimulatedHat,
    sinks: list[EventSink],
    *,
    stop: threading.Event | None = None,
    config_path: Path | None = None,
) -> None:
    """Run the hat's scenario to its end through the real daemon code; raises on a
    failure of the simulated line. The hat is closed afterwards."""
    config = hat.config
    events = EventBus(sinks)
    recorder = Recorder(config, hat, events, until=hat.total)
    mqtt = None
    if config.mqtt is not None:
        mqtt = MqttInterface(config, events, recorder, hat.clock.synchronised,
                             config_path=config_path, apply=recorder.apply_config,
                             test_disclosure=recorder.test_disclosure)
        mqtt.start(wait_s=5.0)
    try:
        outcome = serve(recorder, ServiceNotifier(), stop or threading.Event(),
                        finished=lambda: recorder.wait(0) or hat.failure() is not None,
                        restart_pending=lambda: mqtt is not None and mqtt.restart_pending,
                        on_ready=hat.start_lines)
        if hat.keep_files:
            hat.save_line_audio()
        failure = hat.failure()
        if failure is not None:
            raise failure
        if outcome is Outcome.RESTART:
            raise RestartToApply()
    finally:
        hat.close()
        if mqtt is not None:
            mqtt.stop()
