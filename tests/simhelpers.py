"""Helpers shared by the tests: the linerec command, simulated configs and scenarios."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from linerec.daemon.config import packaged_disclosure


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def linerec(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `linerec` command line."""
    return subprocess.run([sys.executable, "-m", "linerec.daemon.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)


def speak(text: str, path: Path, voice: str = "en") -> Path:
    """Generated speech from espeak-ng, as a 22.05 kHz WAV file."""
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    return path


RATE = 8000
TOLERANCE = round(0.040 * RATE)
"""The issue's 40 ms."""
ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
RECORDED_CALL = [
    "call_started",
    "disclosure_started",
    "disclosure_completed",
    "recording_started",
    "recording_stopped",
    "call_ended",
]


def sim_config(tmp_path: Path, broker: tuple[str, int] | None = None,
               disclosure: Path | None = None, *, line_extra: str = "",
               extra: str = "") -> Path:
    """The two-line simulated layout, as a config file an installer could write: calls
    are announced with the English example disclosure (or ``disclosure``). ``line_extra``
    goes into each [[line]], ``extra`` at the end."""
    text = f"""
device_id = "office"
storage = "{tmp_path / 'recordings'}"

[[purpose]]
name = "service"
text = "To handle the caller's request, under our agreement with the caller."
lawful_basis = "contract"
retention_days = 90

[[disclosure]]
name = "welcome"
purpose = "service"
parts = [{{ language = "en", file = "{disclosure or packaged_disclosure('en')}" }}]

[[capture]]
name = "tap"
device = "hw:CARD=tapHAT"
channels = 2

[[playback]]
name = "out"
device = "plughw:CARD=tapHAT"
channels = 2
"""
    for index, (hook, ring, led) in enumerate(((17, 27, 22), (23, 24, 25))):
        text += f"""
[[line]]
name = "line{index + 1}"
capture = "tap"
channel = {index}
playback = "out"
playback_channel = {index}
hook_pin = {hook}
ring_pin = {ring}
led_pin = {led}
disclosure = "welcome"
{line_extra}
"""
    if broker:
        text += f'\n[mqtt]\nhost = "{broker[0]}"\nport = {broker[1]}\n'
    text += extra
    path = tmp_path / "linerec.toml"
    path.write_text(text)
    return path


def write_scenario(tmp_path: Path, body: str, duration: float = 24.0) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(f"duration = {duration}\n{body}")
    return path


def step(at: float, do: str, line: str = "line1", **params: Any) -> str:
    extra = "".join(f'{k} = {json.dumps(v)}\n' for k, v in params.items())
    return f'[[step]]\nat = {at}\nline = "{line}"\ndo = "{do}"\n{extra}\n'


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float64)


def decode(opus: Path, tmp_path: Path) -> np.ndarray:
    out = tmp_path / (opus.stem + ".decoded.wav")
    subprocess.run(["opusdec", "--quiet", "--rate", str(RATE), str(opus), str(out)], check=True)
    return read_wav(out)


RINGING_EVENTS = ("ringing", "ringing_stopped")
"""The line's own events around a call; most tests follow the call's and leave them out."""


def run_sim(tmp_path: Path, scenario: Path, config: Path, *,
            ringing: bool = False) -> list[dict[str, Any]]:
    """The events of a simulation, in order; ``ringing`` keeps the ringing events too."""
    result = linerec("simulate", "--scenario", str(scenario), "--config", str(config),
                     "--workdir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return events if ringing else without_ringing(events)


def without_ringing(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] not in RINGING_EVENTS]


class Subscriber:
    """Collects what the broker delivers on the event topics."""

    def __init__(self, host: str, port: int) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *a: c.subscribe("linerec/+/line/+/event", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append(
            (m.topic, json.loads(m.payload)))
        self.client.connect(host, port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "test subscriber could not subscribe"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def recordings(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "recordings").rglob("*.opus*"))


RECEIPT_SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "docs" / "receipt.schema.json").read_text())


def receipts(tmp_path: Path) -> list[dict[str, Any]]:
    """The receipts a simulation wrote, each checked against the documented schema."""
    validator = jsonschema.Draft202012Validator(
        RECEIPT_SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    found = [json.loads(p.read_text()) for p in (tmp_path / "recordings").glob("*/*/*/*.json")]
    for receipt in found:
        validator.validate(receipt)
    return found


def start_again(tmp_path: Path, config: Path) -> list[dict[str, Any]]:
    """The events of a start on the same storage with no call (a short simulation): what the
    start-up recovery reports."""
    return run_sim(tmp_path, write_scenario(tmp_path, "", duration=0.2), config)


class NotifySocket:
    """A unix datagram socket bound where NOTIFY_SOCKET points, as systemd's is: every
    message (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) with the monotonic time it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, text: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message in list(self.messages):
                if text in message:
                    return at
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} from the daemon: {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._reader.join()
        self._sock.close()
