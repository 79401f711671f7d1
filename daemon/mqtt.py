"""MQTT adapter: the only module that imports paho-mqtt."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import socket
import ssl
import sys
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
                        "unknown-host", "no-answer", "tls", "closed", "unreachable", "no-echo"]
CREDENTIAL_REASONS = (134, 135, 140)
"""CONNACK reason codes (MQTT 5 numbering; paho maps 3.1.1's 4 and 5 onto 134 and 135):
bad user name or password, not authorised, bad authentication method."""


def probe_broker(config: MqttConfig, client_id: str, timeout_s: float = 5.0, *,
                 echo_topic: str | None = None) -> tuple[BrokerOutcome, str]:
    """Connect once with the config's credentials and TLS and wait for the CONNACK: the
    outcome, and what the network, TLS or broker said. A clean session under its own
    client id, so that the daemon's session is neither taken over nor ended.

    With ``echo_topic``, a connection is only "connected" once a message published there
    came back on a subscription to it: the daemon counts an MQTT 3.1.1 event as delivered
    only when it comes back so (mosquitto acknowledges a publish its ACL drops), and an ACL
    that lets it write but not read its topics would hold every event in the outbox."""
    client = make_client(config, client_id, persistent=False)
    client.connect_timeout = timeout_s
    answers: list[Any] = []
    echoes: list[bytes | bytearray] = []
    client.on_connect = lambda c, userdata, flags, reason, properties: answers.append(reason)
    client.on_message = lambda c, userdata, message: echoes.append(message.payload)
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
        if answers and not answers[0].is_failure and echo_topic is not None:
            token = f"linerec probe {time.time_ns()}".encode()
            client.subscribe(echo_topic, qos=1)
            client.publish(echo_topic, token, qos=1)
            while token not in echoes and time.monotonic() < deadline:
                if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break  # the broker closed the connection (an ACL that disconnects)
            if token not in echoes:
                return "no-echo", f"{echo_topic} did not come back within {timeout_s:g} s"
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


def describe_connect_failure(exc: BaseException, host: str, port: int, *, tls: bool) -> str:
    """What a failed attempt to reach the broker means, and what to do about it."""
    where = f"MQTT broker {host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: {where} showed a certificate linerec does not accept "
                f"({exc.verify_message or exc.reason}): check that [mqtt] ca_file is the CA "
                f"that signed it, that it names {host!r} and that it has not expired")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS handshake with {where} failed ({exc.reason or exc}): check that the "
                f"port is the broker's TLS listener (usually 8883) and that it accepts the "
                f"client certificate in [mqtt] cert_file")
    if isinstance(exc, ConnectionRefusedError):
        return f"no MQTT broker listens on {host}:{port}: check [mqtt] host and port"
    if isinstance(exc, socket.gaierror):
        return f"MQTT broker host {host!r} is unknown ({exc.strerror}): check [mqtt] host"
    if isinstance(exc, TimeoutError):
        return f"{where} does not answer: check the network path and [mqtt] host and port"
    if tls and isinstance(exc, ConnectionError | EOFError):
        return (f"{where} closed the connection during the TLS handshake ({exc}): check that "
                f"port {port} is the broker's TLS listener (usually 8883), not plain MQTT")
    return f"{where} cannot be reached: {exc}"


RETRY_MIN_S = 1.0
"""First wait before an event the broker refused is sent again; it doubles up to
``reconnect_max_s``."""
ECHO_TIMEOUT_S = 10.0
"""MQTT 3.1.1: how long an event the broker acknowledged may take to come back on linerec's
own subscription before it counts as not delivered (an ACL that refuses the topic)."""
PROBLEM_REPEAT_S = 600.0
"""The same broker problem is logged again at most this often while it lasts."""


class MqttEventSink:
    """Publishes events with QoS 1 to ``<prefix>/<device_id>/line/<line>/event`` (device-wide
    ones to ``<prefix>/<device_id>/event``), through the on-disk outbox: an event is on disk
    before it is published, and leaves the outbox only when the broker has taken it, so
    none is lost to a broker outage, a refused login or ACL, a restart or a power cut.

    ``publish`` only queues (the engine thread never waits for the disk or the broker); the
    ``mqtt-outbox`` thread writes, publishes one event at a time, oldest first, and notes
    each one taken before it sends the next: so they reach the broker in order, even when
    the broker refuses one for a while. Taken means, with MQTT 5, a PUBACK without an error
    reason code; with MQTT 3.1.1, whose PUBACK says nothing (mosquitto acknowledges a
    publish its ACL drops), the event coming back on linerec's own subscription.

    paho connects in the background and reconnects with a doubling delay;
    ``<prefix>/<device_id>/status`` is ``online`` while connected and ``offline`` (the Last
    Will) otherwise, both retained. ``problem`` says what keeps events from the broker now.
    """

    def __init__(self, config: MqttConfig, device_id: str, storage: Path) -> None:
        self._config = config
        self._base = f"{config.topic_prefix}/{device_id}"
        self._where = f"MQTT broker {config.host}:{config.port}"
        self._storage = storage
        self._connected = threading.Event()
        self._v5 = config.protocol == "5"
        self._echo = not self._v5
        self._unusable: str | None = None
        """Why no connection can be made before the config is fixed (a TLS file)."""
        try:
            self._client = make_client(config, f"linerec-{device_id}", persistent=True)
        except (ssl.SSLError, OSError, ValueError) as exc:
            # A CA, certificate or key file that is not PEM: calls are still recorded and
            # their events kept; a client without TLS stands in and never connects.
            self._unusable = (f"{self._where}: the TLS files in [mqtt] cannot be used ({exc}): "
                              "check ca_file, cert_file and key_file, then restart linerec")
            self._client = make_client(dataclasses.replace(
                config, ca_file=None, cert_file=None, key_file=None),
                f"linerec-{device_id}", persistent=True)
        self._client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        self._client.on_pre_connect = self._on_pre_connect
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.reconnect_delay_set(min_delay=1, max_delay=config.reconnect_max_s)
        self._client.max_inflight_messages_set(1)
        self._work: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._outbox: Outbox | None = None
        self._thread = threading.Thread(target=self._run, name="mqtt-outbox", daemon=True)
        self._commands: queue.Queue[tuple[str, bytes, Any] | None] = queue.Queue()
        self._handler: Callable[[str, bytes], dict[str, Any]] | None = None
        self._command_thread = threading.Thread(target=self._answer, name="mqtt-commands",
                                                daemon=True)
        self._client.on_message = self._on_message
        self._retained: dict[str, str] = {}
        """Each retained topic's latest payload: sent again at every connection instead of
        piling up in paho's queue while the broker is away (only the latest matters)."""
        self._retained_lock = threading.Lock()
        self._awaiting_connack = False
        self.problem: str | None = self._unusable
        """What keeps events from reaching the broker now, with what to do; None when
        all is well."""
        self._problem_lock = threading.Lock()
        self._logged: dict[str, float] = {}
        """Problems logged lately, and when."""
        self._problem_logged = False

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
        left = self._outbox.count
        if left:
            logger.info("%d event(s) from before wait in the MQTT outbox", left)
        self._thread.start()
        if self._handler is not None:
            self._command_thread.start()
        if self._unusable is not None:
            self._report(self._unusable)
            return
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
        if wait_s and not self._connected.wait(wait_s) and self.problem is None:
            self._report(f"{self._where} not reachable yet")

    def publish(self, event: dict[str, Any]) -> None:
        self._work.put(("event", event))

    def publish_retained(self, suffix: str, payload: str | dict[str, Any]) -> None:
        """A retained state topic under ``<prefix>/<device_id>/``: only its latest value
        matters, so it skips the outbox."""
        self.publish_absolute(f"{self._base}/{suffix}", payload)

    def publish_absolute(self, topic: str, payload: str | dict[str, Any]) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        with self._retained_lock:
            self._retained[topic] = text
            if self._connected.is_set():
                self._client.publish(topic, text, qos=1, retain=True)

    @property
    def unacknowledged(self) -> int:
        return self._outbox.count if self._outbox else 0

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
            logger.warning("%d event(s) had not reached the %s at shutdown; they wait in the "
                           "outbox", self.unacknowledged, self._where)
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
        head: OutboxEntry | None = None
        """The event in flight: the oldest not yet taken; the next waits for it."""
        mid: int | None = None
        """paho's message id of head's latest publish, for its PUBACK."""
        echo_due: float | None = None
        """MQTT 3.1.1: head acknowledged; it must come back on the subscription by then."""
        retry_at: float | None = None
        """head was refused: when to publish it again."""
        retry_s = RETRY_MIN_S
        while True:
            if head is None and (head := outbox.oldest()) is not None:
                mid, echo_due, retry_at = self._send(head), None, None
            due = retry_at if retry_at is not None else echo_due
            try:
                kind, item = self._work.get(
                    timeout=None if due is None else max(0.0, due - time.monotonic()))
            except queue.Empty:
                kind, item = "timer", None
            try:
                if kind == "stop":
                    return
                if kind == "event":
                    outbox.append(self.topic(item.get("line")), item)
                    continue
                if head is None:
                    continue
                taken = False
                if kind == "puback" and item[0] == mid:
                    mid = None
                    if item[1] is not None:  # MQTT 5: an error reason code
                        self._report(f"{self._where} refused event seq {head.seq} on topic "
                                     f"{head.topic} ({item[1]}): let user "
                                     f"{self._config.username or '(anonymous)'} publish to "
                                     f"{self._base}/# in the broker's ACL")
                        retry_at = time.monotonic() + retry_s
                    elif self._echo:
                        echo_due = time.monotonic() + ECHO_TIMEOUT_S
                    else:
                        taken = True
                elif kind == "echo" and item == head.seq:
                    taken = True
                elif kind == "connected" and echo_due is not None:
                    # Its echo waits in the session, or comes after the reconnection.
                    echo_due = time.monotonic() + ECHO_TIMEOUT_S
                elif kind == "timer" and retry_at is not None \
                        and time.monotonic() >= retry_at:
                    mid, retry_at = self._send(head), None
                    retry_s = min(retry_s * 2, float(self._config.reconnect_max_s))
                elif kind == "timer" and echo_due is not None \
                        and time.monotonic() >= echo_due:
                    echo_due = None
                    if not self._connected.is_set():
                        echo_due = time.monotonic() + ECHO_TIMEOUT_S
                    else:
                        self._report(
                            f"{self._where} acknowledged event seq {head.seq} on topic "
                            f"{head.topic} but did not deliver it (not back on linerec's "
                            f"own subscription within {ECHO_TIMEOUT_S:g} s): its ACL "
                            f"must let user {self._config.username or '(anonymous)'} read "
                            f"and write {self._base}/#")
                        retry_at = time.monotonic() + retry_s
                if taken:
                    outbox.acknowledge(head.seq)
                    head, mid, echo_due, retry_at, retry_s = None, None, None, None, RETRY_MIN_S
                    if self.problem is not None and self._connected.is_set():
                        self._report(None)
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

    def _send(self, entry: OutboxEntry) -> int:
        # While the broker is away paho keeps it and sends it at the next connection; it
        # holds no other event (one in flight), so its queue does not grow with the outbox.
        return int(self._client.publish(entry.topic, entry.payload, qos=1).mid)

    def _report(self, problem: str | None) -> None:
        """Note what keeps events from the broker (None: nothing any more). Each problem is
        logged at most once every PROBLEM_REPEAT_S, and its end only when it was: a broker
        that flaps or refuses every few seconds does not flood the journal."""
        with self._problem_lock:
            if problem is None:
                if self.problem is not None and self._problem_logged:
                    logger.info("%s takes events again; %d event(s) in the outbox go out now",
                                self._where, self.unacknowledged)
                self.problem, self._problem_logged = None, False
                return
            self.problem = problem
            now = time.monotonic()
            self._logged = {text: at for text, at in self._logged.items()
                            if now - at < PROBLEM_REPEAT_S}
            if problem not in self._logged:
                self._problem_logged = True  # this outage was announced: so is its end
                logger.warning("%s; calls are recorded, and %d event(s) wait in the outbox",
                               problem, self.unacknowledged)
                self._logged[problem] = now

    # ---- paho callbacks (its network thread) --------------------------------------------

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._awaiting_connack = True

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self._awaiting_connack = False
        if reason.is_failure:
            user = self._config.username or "(anonymous)"
            if reason.value in CREDENTIAL_REASONS:
                self._report(f"{self._where} refused the connection for user {user} "
                             f"({reason}): correct [mqtt] username and password (or the "
                             "broker's password file), then restart linerec")
            else:
                self._report(f"{self._where} refused the connection ({reason})")
            return
        if self.problem is None and not self._logged:
            logger.info("connected to %s", self._where)
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        topics = [(f"{self._base}/cmd/+", 1), (f"{self._base}/config/set", 1)] \
            if self._handler is not None else []
        if self._echo:
            topics += [(f"{self._base}/line/+/event", 1), (f"{self._base}/event", 1)]
        if topics:
            client.subscribe(topics)
        with self._retained_lock:
            self._connected.set()
            for topic, text in self._retained.items():
                client.publish(topic, text, qos=1, retain=True)
        self._work.put(("connected", None))
        self._report(None)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside the ``except OSError`` around its connection attempt.
        exc = sys.exc_info()[1]
        self._awaiting_connack = False
        self._report(describe_connect_failure(exc, self._config.host, self._config.port,
                                              tls=self._config.ca_file is not None)
                     if exc is not None else f"{self._where} cannot be reached")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        topic = str(message.topic)
        if topic.endswith("/event"):
            # Our own event back (MQTT 3.1.1): the broker has really taken it.
            try:
                seq = json.loads(message.payload)["seq"]
            except (ValueError, KeyError, TypeError):
                return
            self._work.put(("echo", seq))
            return
        name = "config/set" if topic == f"{self._base}/config/set" else topic.rsplit("/", 1)[-1]
        self._commands.put((name, bytes(message.payload), getattr(message, "properties", None)))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        # The outbox thread matches it to its event: it alone touches the outbox, and it
        # has noted the message id before this can arrive (it runs first in queue order).
        self._work.put(("puback", (mid, str(reason) if reason.is_failure else None)))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._awaiting_connack:
            # Closed before any CONNACK: a TLS client certificate turned down, or not MQTT.
            self._awaiting_connack = False
            self._report(f"{self._where} closed the connection before answering ({reason}): "
                         "if it asks for a client certificate, check [mqtt] cert_file and "
                         "key_file; check that host and port name an MQTT listener")
        elif was_connected and reason.is_failure:
            self._report(f"connection to {self._where} lost ({reason}); reconnecting")
