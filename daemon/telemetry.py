"""Retained MQTT topics for dashboards: each line's state and last call, the appliance's
health and config, and Home Assistant discovery."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from linerec.daemon import __version__
from linerec.daemon.commands import CommandHandler, Configurator
from linerec.daemon.config import Config, Secret
from linerec.daemon.events import iso_ms

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 60.0
DISCOVERY_FILE = "mqtt-discovery.json"
"""The Home Assistant entities last published, to remove those of lines since removed."""

STATE_AFTER_EVENT = {
    "ringing": "ringing",
    "ringing_stopped": "idle",
    "call_started": "offhook",
    "disclosure_started": "disclosing",
    "disclosure_failed": "offhook",
    "recording_started": "recording",
    "recording_stopped": "offhook",
    "call_ended": "idle",
}
"""A line's published state after each event; `error` while the line is in fault."""


class RetainedPublisher(Protocol):
    def publish_retained(self, suffix: str, payload: str | dict[str, Any]) -> None:
        """Publish under ``<prefix>/<device_id>/``; an empty string clears the topic."""

    def publish_absolute(self, topic: str, payload: str | dict[str, Any]) -> None:
        """Publish a retained payload to a topic outside the device's prefix."""


class HealthSource(Protocol):
    def overruns(self) -> dict[str, int]: ...

    def disclosure_failures(self) -> dict[str, int]: ...

    def lines_in_fault(self) -> list[str]: ...

    def problems(self) -> list[str]: ...

    def watch_problem(self, source: Callable[[], str | None]) -> None:
        """Count what ``source`` says (when not None) among ``problems``."""


class Telemetry:
    """An event sink that keeps the retained topics true: ``line/<line>/state`` follows
    each call event (state, since, call_id, direction), ``line/<line>/last_call`` each
    ended call (no number in it: retained topics outlive calls), ``health`` every minute
    and at start, ``config`` at start (secrets left out)."""

    def __init__(self, config: Config, publisher: RetainedPublisher,
                 health: HealthSource, *, clock_synchronised: Any = None) -> None:
        self._config = config
        self._publisher = publisher
        self._health = health
        self._synchronised = clock_synchronised
        self._started = time.monotonic()
        self._recorded_bytes = 0
        self._faulted: set[str] = set()
        self._calls: dict[str, dict[str, Any]] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt-health", daemon=True)

    def start(self) -> None:
        self._publisher.publish_retained("config", config_payload(self._config))
        for line in self._config.line:
            self._publish_state(line.name, "idle", None, None, iso_ms(datetime.now(UTC)))
        if self._config.mqtt is not None and self._config.mqtt.discovery:
            self._discovery()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.publish_health()

    # ---- events (the engine threads, through the bus) -----------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        kind, line = event["event"], event.get("line")
        if kind == "recording_stopped":
            self._recorded_bytes += int(event.get("bytes") or 0)
        if line is None:
            return
        if kind == "line_fault":
            self._faulted.add(line)
        elif kind == "line_recovered":
            self._faulted.discard(line)
        if kind == "call_started":
            self._calls[line] = {"call_id": event["call_id"], "direction": event["direction"],
                                 "started_at": event["ts"]}
        call = self._calls.get(line)
        state = STATE_AFTER_EVENT.get(kind)
        if kind == "call_ended" and call is not None:
            self._publisher.publish_retained(f"line/{line}/last_call", {
                **call, "ended_at": event["ts"], "duration_s": event.get("duration_s"),
                "recorded": event.get("recorded"), "reason": event.get("reason"),
                "rule": event.get("rule")})
            self._calls.pop(line, None)
            call = None
        if state is None and kind not in ("line_fault", "line_recovered"):
            return
        if state is None:
            state = "offhook" if call is not None else "idle"
        if line in self._faulted and state in ("idle", "ringing", "offhook"):
            state = "error"
        self._publish_state(line, state, call, event.get("direction"), event["ts"])

    def _publish_state(self, line: str, state: str, call: dict[str, Any] | None,
                       direction: str | None, since: str) -> None:
        self._states[line] = payload = {
            "state": state, "since": since,
            "call_id": call["call_id"] if call else None,
            "direction": call["direction"] if call else direction if state != "idle" else None,
        }
        self._publisher.publish_retained(f"line/{line}/state", payload)

    # ---- health ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self.publish_health()
            except Exception:
                logger.exception("publishing the health topic failed")
            if self._stop.wait(HEALTH_INTERVAL_S):
                return

    def publish_health(self) -> None:
        self._publisher.publish_retained("health", self.health())

    def status(self) -> dict[str, Any]:
        """The answer to the ``status`` command: each line's state and the health."""
        return {"lines": dict(self._states), "health": self.health()}

    def health(self) -> dict[str, Any]:
        storage = self._config.storage
        free = shutil.disk_usage(storage).free if storage.exists() else None
        uptime = time.monotonic() - self._started
        per_day = self._recorded_bytes / uptime * 86400 if uptime >= 60 and \
            self._recorded_bytes else None
        synchronised = self._synchronised() if callable(self._synchronised) else None
        # What keeps events from the broker (a refused login or ACL, TLS), and what to do:
        # seen on the status command, and on this topic once the broker takes it again.
        broker = [problem] if (problem := getattr(self._publisher, "problem", None)) else []
        return {
            "ts": iso_ms(datetime.now(UTC)),
            "version": __version__,
            "uptime_s": round(uptime, 1),
            "storage_free_bytes": free,
            "recorded_bytes_per_day": round(per_day) if per_day else None,
            "storage_days_left": round(free / per_day, 1) if free is not None and per_day
            else None,
            "overruns": self._health.overruns(),
            "disclosure_failures": self._health.disclosure_failures(),
            "lines_in_fault": self._health.lines_in_fault(),
            "clock_synchronised": synchronised,
            "problems": [*self._health.problems(), *broker],
        }

    # ---- Home Assistant ------------------------------------------------------------------

    def _discovery(self) -> None:
        mqtt = self._config.mqtt
        assert mqtt is not None
        device_id = self._config.device_id
        base = f"{mqtt.topic_prefix}/{device_id}"
        device = {"identifiers": [f"linerec-{device_id}"], "name": f"linerec {device_id}",
                  "manufacturer": "linerec", "model": "call recorder", "sw_version": __version__}
        availability = {"availability_topic": f"{base}/status",
                        "payload_available": "online", "payload_not_available": "offline"}
        entities: dict[str, dict[str, Any]] = {}
        for line in self._config.line:
            state = f"{base}/line/{line.name}/state"
            entities[f"binary_sensor/{device_id}_{line.name}_recording"] = {
                "name": f"{line.name} recording", "state_topic": state,
                "value_template": "{{ 'ON' if value_json.state == 'recording' else 'OFF' }}",
                "icon": "mdi:record-rec"}
            entities[f"sensor/{device_id}_{line.name}_state"] = {
                "name": f"{line.name} state", "state_topic": state,
                "value_template": "{{ value_json.state }}",
                "json_attributes_topic": state, "icon": "mdi:phone"}
            entities[f"sensor/{device_id}_{line.name}_last_call"] = {
                "name": f"{line.name} last call",
                "state_topic": f"{base}/line/{line.name}/last_call",
                "value_template": "{{ value_json.ended_at }}", "device_class": "timestamp",
                "json_attributes_topic": f"{base}/line/{line.name}/last_call",
                "icon": "mdi:phone-log"}
        entities[f"sensor/{device_id}_health"] = {
            "name": "storage days left", "state_topic": f"{base}/health",
            "value_template": "{{ value_json.storage_days_left }}", "unit_of_measurement": "d",
            "json_attributes_topic": f"{base}/health", "icon": "mdi:harddisk"}
        for key, entity in entities.items():
            object_id = key.split("/", 1)[1]
            self._publisher.publish_absolute(
                f"{mqtt.discovery_prefix}/{key}/config",
                {**entity, "unique_id": object_id, "object_id": object_id, "device": device,
                 **availability})
        record = self._config.storage / DISCOVERY_FILE
        try:
            before = set(json.loads(record.read_text()))
        except (OSError, ValueError):
            before = set()
        for gone in sorted(before - set(entities)):
            # A line removed from the config: its entities go from Home Assistant too.
            self._publisher.publish_absolute(f"{mqtt.discovery_prefix}/{gone}/config", "")
        _write_atomically(record, json.dumps(sorted(entities)))


def config_payload(config: Config) -> dict[str, Any]:
    """The config as JSON, secrets left out (a password shows as null)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Secret):
            return None
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    data = dataclasses.asdict(config)
    for field in dataclasses.fields(config):
        if field.metadata.get("internal"):
            data.pop(field.name, None)
    return dict(plain(data))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class MqttInterface:
    """A running recorder's link to the broker: events through the outbox, and the
    retained topics kept true. The one place that wires the two together."""

    def __init__(self, config: Config, events: Any, health: HealthSource,
                 clock_synchronised: Any = None, *, config_path: Path | None = None,
                 apply: Any = None, test_disclosure: Any = None) -> None:
        from linerec.daemon.mqtt import MqttEventSink  # paho only where a broker is set

        assert config.mqtt is not None
        self._events = events
        self.sink = MqttEventSink(config.mqtt, config.device_id, config.storage)
        # In STATUS= and the service LED too: events held back are a degraded appliance.
        # The few words there; the journal and the health topic say why and what to do.
        health.watch_problem(lambda: "events wait for the MQTT broker"
                             if self.sink.problem else None)
        self.telemetry = Telemetry(config, self.sink, health,
                                   clock_synchronised=clock_synchronised)

        def apply_and_publish(new: Config) -> None:
            if apply is not None:
                apply(new)
            self.sink.publish_retained("config", config_payload(new))

        self.configurator = Configurator(config_path, config, apply_and_publish)
        self.commands = CommandHandler(
            config.storage, self.telemetry.status, config.numbers.country_code,
            self.configurator, test_disclosure)
        self.sink.set_command_handler(self.commands.handle)

    @property
    def restart_pending(self) -> bool:
        """Device settings changed over MQTT wait for a restart of the daemon."""
        return self.configurator.restart_pending

    def start(self, wait_s: float = 0.0) -> None:
        self.sink.start(wait_s)
        self._events.add(self.sink)
        self.telemetry.start()
        self._events.add(self.telemetry)

    def stop(self) -> None:
        self.telemetry.stop()
        self.sink.stop()
