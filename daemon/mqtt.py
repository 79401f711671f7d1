"""MQTT adapter: the only module that imports paho-mqtt."""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linerec.daemon.config import MqttConfig
from linerec.daemon.outbox import Outbox, OutboxEntry

logger = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"
SESSION_EXPIRY_S = 7 * 24 * 3600
"""MQTT 5: how long the broker keeps the session (and QoS 1 messages) while linerec is away."""


def _plain_topic(topic: str) -> bool:
    """A response topic to publish to: no wildcards, not empty, not too long."""
    return 0 < len(topic) <= 512 and "+" not in topic and "#" not in topic \
        and "\0" not in topic


def make_client(config: MqttConfig, client_id: str, *, persistent: bool) -> mqtt.Client:
    """A paho client for the configured broker: its protocol, credentials and TLS.
    ``persistent`` keeps the session while disconnected (MQTT 3.1.1; MQTT 5 asks for that
    when it connects)."""
    if config.protocol == "5":
        # MQTT 5 has no clean session flag: a session that outlives the connection.
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=not persistent)
    if config.username:
        client.username_pw_set(config.username, config.password or None)
    if config.ca_file is not None:
        client.tls_set(
            ca_certs=str(config.ca_file),
            certfile=str(config.cert_file) if config.cert_file else None,
            keyfile=str(config.key_file) if config.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    return client


BrokerOutcome = Literal["connected", "refused-credentials", "refused", "no-listener",
                        "unknown-host", "no-answer", "tls", "closed", "unreachable"]
CREDENTIAL_REASONS = (134, 135, 140)
"""CONNACK reason codes (MQTT 5 numbering; paho maps 3.1.1's 4 and 5 onto 134 and 135):
bad user name or password, not authorised, bad authentication method."""


def probe_broker(config: MqttConfig, client_id: str,
                 timeout_s: float = 5.0) -> tuple[BrokerOutcome, str]:
    """Connect once with the config's credentials and TLS and wait for the CONNACK: the
    outcome, and what the network, TLS or broker said. A clean session under its own
    client id, so that the daemon's session is neither taken over nor ended."""
    client = make_client(config, client_id, persistent=False)
    client.connect_timeout = timeout_s
    answers: list[Any] = []
    client.on_connect = lambda c, userdata, flags, reason, properties: answers.append(reason)
    try:
        client.connect(config.host, config.port, keepalive=config.keepalive_s)
    except ssl.SSLError as exc:
        return "tls", str(getattr(exc, "verify_message", "") or exc.reason or exc)
    except ConnectionRefusedError as exc:
        return "no-listener", exc.strerror or str(exc)
    except socket.gaierror as exc:
        return "unknown-host", exc.strerror or str(exc)
    except TimeoutError:
        return "no-answer", f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return "unreachable", exc.strerror or str(exc)
    try:
        deadline = time.monotonic() + timeout_s
        while not answers and time.monotonic() < deadline:
            try:
                code = client.loop(timeout=0.1)
            except ssl.SSLError as exc:  # the broker turned down the client certificate
                return "tls", str(exc.reason or exc)
            if code != mqtt.MQTT_ERR_SUCCESS and not answers:
                return "closed", mqtt.error_string(code)
    finally:
        client.disconnect()
    if not answers:
        return "no-answer", f"no CONNACK within {timeout_s:g} s"
    reason = answers[0]
    if not reason.is_failure:
        return "connected", ""
    if reason.value in CREDENTIAL_REASONS:
        return "refused-credentials", str(reason)
    return "refused", str(reason)


class MqttEventSink:
    """Publishes events with QoS 1 to ``<prefix>/<device_id>/line/<line>/event`` (device-wide
    ones to ``<prefix>/<device_id>/event``), through the on-disk outbox: an event is on disk
    before it is published, and leaves the outbox only when the broker acknowledged it, so
    none is lost to a broker outage, a restart or a power cut.

    ``publish`` only queues (the engine thread never waits for the disk or the broker); the
    ``mqtt-outbox`` thread writes, publishes and notes acknowledgements. paho connects in
    the background and reconnects with a doubling delay; ``<prefix>/<device_id>/status`` is
    ``online`` while connected and ``offline`` (the Last Will) otherwise, both retained.
    """

    def __init__(self, config: MqttConfig, device_id: str, storage: Path) -> None:
        self._config = config
        self._base = f"{config.topic_prefix}/{device_id}"
        self._storage = storage
        self._connected = threading.Event()
        self._v5 = config.protocol == "5"
        self._client = make_client(config, f"linerec-{device_id}", persistent=True)
        self._client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.reconnect_delay_set(min_delay=1, max_delay=config.reconnect_max_s)
        # In order: one event in flight at a time; the rest wait in paho's queue.
        self._client.max_inflight_messages_set(1)
        self._work: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._in_flight: dict[int, int] = {}
        """paho message id -> outbox seq, for the PUBACKs to come."""
        self._outbox: Outbox | None = None
        self._thread = threading.Thread(target=self._run, name="mqtt-outbox", daemon=True)
        self._commands: queue.Queue[tuple[str, bytes, Any] | None] = queue.Queue()
        self._handler: Callable[[str, bytes], dict[str, Any]] | None = None
        self._command_thread = threading.Thread(target=self._answer, name="mqtt-commands",
                                                daemon=True)
        self._client.on_message = self._on_message

    @property
    def status_topic(self) -> str:
        return f"{self._base}/status"

    def set_command_handler(self, handler: Callable[[str, bytes], dict[str, Any]]) -> None:
        """Answer ``<base>/cmd/<name>`` requests on ``<base>/reply`` (set before start)."""
        self._handler = handler

    def topic(self, line: str | None) -> str:
        return f"{self._base}/line/{line}/event" if line else f"{self._base}/event"

    def start(self, wait_s: float = 0.0) -> None:
        """Open the outbox (events left from before go out first), connect in the
        background; optionally wait a little for the first connection."""
        self._storage.mkdir(parents=True, exist_ok=True)
        self._outbox = Outbox(self._storage)
        left = len(self._outbox.pending)
        if left:
            logger.info("%d event(s) from before wait in the MQTT outbox", left)
        self._thread.start()
        if self._handler is not None:
            self._command_thread.start()
        if self._v5:
            session = Properties(PacketTypes.CONNECT)
            session.SessionExpiryInterval = SESSION_EXPIRY_S
            self._client.connect_async(self._config.host, self._config.port,
                                       keepalive=self._config.keepalive_s, clean_start=False,
                                       properties=session)
        else:
            self._client.connect_async(self._config.host, self._config.port,
                                       keepalive=self._config.keepalive_s)
        self._client.loop_start()
        if wait_s and not self._connected.wait(wait_s):
            logger.warning("MQTT broker %s:%d not reachable yet; events wait in the outbox",
                           self._config.host, self._config.port)

    def publish(self, event: dict[str, Any]) -> None:
        self._work.put(("event", event))

    def publish_retained(self, suffix: str, payload: str | dict[str, Any]) -> None:
        """A retained state topic under ``<prefix>/<device_id>/``: only its latest value
        matters, so it skips the outbox (paho queues it while offline)."""
        self.publish_absolute(f"{self._base}/{suffix}", payload)

    def publish_absolute(self, topic: str, payload: str | dict[str, Any]) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self._client.publish(topic, text, qos=1, retain=True)

    @property
    def unacknowledged(self) -> int:
        return len(self._outbox.pending) if self._outbox else 0

    def stop(self, flush_s: float = 3.0) -> None:
        """Give queued events up to ``flush_s`` to reach the broker, say offline, and
        disconnect; what did not go stays in the outbox for the next start."""
        deadline = time.monotonic() + flush_s
        while time.monotonic() < deadline and self._connected.is_set() \
                and (self._work.qsize() or self.unacknowledged):
            time.sleep(0.02)
        self._work.put(("stop", None))
        self._thread.join(timeout=5.0)
        if self._command_thread.is_alive():
            self._commands.put(None)
            self._command_thread.join(timeout=5.0)
        if self.unacknowledged:
            logger.warning("%d event(s) had not reached the MQTT broker at shutdown; they "
                           "wait in the outbox", self.unacknowledged)
        if self._connected.is_set():
            self._client.publish(self.status_topic, OFFLINE, qos=1, retain=True) \
                .wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()
        if self._outbox is not None:
            self._outbox.close()

    # ---- the outbox thread -----------------------------------------------------------

    def _run(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        for entry in outbox.pending:
            self._send(entry)
        while True:
            kind, item = self._work.get()
            try:
                if kind == "stop":
                    return
                if kind == "event":
                    self._send(outbox.append(self.topic(item.get("line")), item))
                elif kind == "acked":
                    seq = self._in_flight.pop(item, None)
                    if seq is not None:
                        outbox.acknowledge(seq)
            except OSError as exc:
                # The disk is full or failing: the event still goes out, without a copy.
                logger.error("MQTT outbox: %s", exc)
                if kind == "event":
                    self._client.publish(self.topic(item.get("line")), json.dumps(item), qos=1)

    def _answer(self) -> None:
        """The commands thread: a slow command (a search through every receipt) never holds
        up paho's network thread or the events."""
        assert self._handler is not None
        while (request := self._commands.get()) is not None:
            name, payload, properties = request
            try:
                reply = self._handler(name, payload)
            except Exception as exc:  # a bug must still answer, and not stop the thread
                logger.exception("command %s failed", name)
                reply = {"request_id": None, "command": name, "ok": False,
                         "error": {"key": "(internal)", "problem": str(exc)}}
            topic, reply_properties = f"{self._base}/reply", None
            correlation = getattr(properties, "CorrelationData", None)
            response_topic = getattr(properties, "ResponseTopic", None)
            if correlation is not None or response_topic:
                # MQTT 5: the reply goes where the request asked, with its correlation data.
                reply_properties = Properties(PacketTypes.PUBLISH)
                if correlation is not None:
                    reply_properties.CorrelationData = correlation
                if response_topic and _plain_topic(response_topic):
                    topic = response_topic
            self._client.publish(topic, json.dumps(reply), qos=1, properties=reply_properties)

    def _send(self, entry: OutboxEntry) -> None:
        info = self._client.publish(entry.topic, entry.payload, qos=1)
        self._in_flight[info.mid] = entry.seq

    # ---- paho callbacks (its network thread) --------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            logger.warning("MQTT broker %s:%d refused the connection: %s",
                           self._config.host, self._config.port, reason)
            return
        logger.info("connected to MQTT broker %s:%d", self._config.host, self._config.port)
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        if self._handler is not None:
            client.subscribe([(f"{self._base}/cmd/+", 1), (f"{self._base}/config/set", 1)])
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        topic = str(message.topic)
        name = "config/set" if topic == f"{self._base}/config/set" else topic.rsplit("/", 1)[-1]
        self._commands.put((name, bytes(message.payload), getattr(message, "properties", None)))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        # The outbox thread matches it to its event: it alone touches the outbox, and it
        # has registered the message id before this can arrive (it runs first in queue order).
        self._work.put(("acked", mid))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._connected.clear()
        if reason.is_failure:
            logger.warning("MQTT connection lost (%s); reconnecting", reason)
