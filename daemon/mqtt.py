"""MQTT adapter: the only module that imports paho-mqtt."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from linerec.daemon.config import MqttConfig

logger = logging.getLogger(__name__)


class MqttEventSink:
    """Publishes events with QoS 1 to ``<prefix>/<device_id>/line/<line>/event``.

    The client connects in the background and reconnects by itself; paho queues QoS 1
    messages published while it is offline, so the recorder never waits for the broker.
    """

    def __init__(self, config: MqttConfig, device_id: str) -> None:
        self._config = config
        self._base = f"{config.topic_prefix}/{device_id}"
        self._connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"linerec-{device_id}", clean_session=False
        )
        if config.username:
            self._client.username_pw_set(config.username, config.password or None)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.reconnect_delay_set(min_delay=1, max_delay=60)
        # Message ids published and not yet acknowledged (PUBACK). The PUBACK can arrive on
        # the network thread before publish() has returned here, hence the second set.
        self._ack_lock = threading.Lock()
        self._unacked: set[int] = set()
        self._acked_early: set[int] = set()

    def start(self, wait_s: float = 0.0) -> None:
        """Connect in the background; optionally wait a little for the first connection."""
        self._client.connect_async(self._config.host, self._config.port,
                                   keepalive=self._config.keepalive_s)
        self._client.loop_start()
        if wait_s and not self._connected.wait(wait_s):
            logger.warning("MQTT broker %s:%d not reachable yet; events are queued",
                           self._config.host, self._config.port)

    def topic(self, line: str | None) -> str:
        return f"{self._base}/line/{line}/event" if line else f"{self._base}/event"

    def publish(self, event: dict[str, Any]) -> None:
        # While offline, paho keeps QoS 1 messages and sends them once it reconnects.
        info = self._client.publish(self.topic(event.get("line")), json.dumps(event), qos=1)
        with self._ack_lock:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._unacked.add(info.mid)

    def stop(self, flush_s: float = 3.0) -> None:
        """Give queued events up to ``flush_s`` to reach the broker, then disconnect."""
        deadline = time.monotonic() + flush_s
        while self._unacked and self._connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._unacked:
            logger.warning("%d event(s) had not reached the MQTT broker at shutdown",
                           len(self._unacked))
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            logger.warning("MQTT broker %s:%d refused the connection: %s",
                           self._config.host, self._config.port, reason)
            return
        logger.info("connected to MQTT broker %s:%d", self._config.host, self._config.port)
        self._connected.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self._ack_lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._acked_early.add(mid)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._connected.clear()
        if reason.is_failure:
            logger.warning("MQTT connection lost (%s); reconnecting", reason)
