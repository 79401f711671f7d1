"""The MQTT interface against real mosquitto brokers: password file and ACL, TLS with
certificates made here, a broker outage during a call, a daemon killed with events still
in its outbox."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from simhelpers import RECORDED_CALL, free_port, recordings, sim_config, step, write_scenario

from linerec.daemon.config import json_schema
from linerec.daemon.outbox import ACKED_NAME, OUTBOX_NAME, Outbox

RINGING_CALL = ["ringing", *RECORDED_CALL]
"""An answered inbound call as MQTT carries it: the line rings, then the call's events."""

DAEMON = ("linerec", "daemon-secret")
OFFICE = ("office", "office-secret")
EVENT_TOPICS = "linerec/office/#"


class Broker:
    """A mosquitto of this test's own, on a fixed port so that it can stop and start again
    (with its sessions kept on disk, as a production broker keeps them)."""

    def __init__(self, folder: Path, *, tls: dict[str, Path] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.tls = tls
        passwords = folder / "passwd"
        for user, password in (DAEMON, OFFICE):
            subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if user == DAEMON[0] else []),
                            str(passwords), user, password], check=True)
        acl = folder / "acl"
        acl.write_text(f"user {DAEMON[0]}\ntopic readwrite linerec/office/#\n"
                       "topic readwrite homeassistant/#\n\n"
                       f"user {OFFICE[0]}\ntopic read linerec/office/#\n"
                       "topic write linerec/office/cmd/#\ntopic write linerec/office/config/set\n"
                       "topic read homeassistant/#\n")
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous false",
                 f"password_file {passwords}", f"acl_file {acl}", "persistence true",
                 f"persistence_location {folder}/", "user root"]
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['server_cert']}",
                      f"keyfile {tls['server_key']}", "require_certificate true"]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                    raise RuntimeError(f"mosquitto did not start: {out}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    folder = tmp_path / "broker"
    folder.mkdir()
    running = Broker(folder)
    running.start()
    try:
        yield running
    finally:
        running.stop()


class Office:
    """The office's client: a persistent session, so that what the broker holds for it while
    it is away (or the broker restarts) reaches it."""

    def __init__(self, broker: Broker, tls: dict[str, Path] | None = None,
                 topics: tuple[str, ...] = (EVENT_TOPICS,), client_id: str = "office-test"
                 ) -> None:
        self.messages: list[tuple[str, Any]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=False)
        self.client.username_pw_set(*OFFICE)
        if tls:
            self.client.tls_set(ca_certs=str(tls["ca"]), certfile=str(tls["client_cert"]),
                                keyfile=str(tls["client_key"]), cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the office client could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        payload = message.payload.decode()
        plain = message.topic.endswith("/status") or not payload
        self.messages.append((message.topic, payload if plain else json.loads(payload)))

    def on(self, topic: str) -> list[Any]:
        return [m for t, m in self.messages if t == topic]

    def events(self) -> list[dict[str, Any]]:
        return [m for topic, m in self.messages if topic.endswith("/event")]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events()) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.events()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def config_for(tmp_path: Path, broker: Broker, *, password: str = DAEMON[1],
               tls: dict[str, Path] | None = None, extra: str = "") -> Path:
    """The simulated layout with an [mqtt] table for ``broker``; ``extra``: more of its
    keys."""
    text = (f'\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "{DAEMON[0]}"\n'
            f'password = "{password}"\nreconnect_max_s = 2\n{extra}')
    if tls:
        text += (f'ca_file = "{tls["ca"]}"\ncert_file = "{tls["client_cert"]}"\n'
                 f'key_file = "{tls["client_key"]}"\n')
    return sim_config(tmp_path, extra=text)


CALL = step(0.5, "ring") + step(5.5, "offhook") + step(16.0, "onhook")


def simulate(tmp_path: Path, config: Path, body: str = CALL, duration: float = 18.0,
             *extra: str) -> subprocess.CompletedProcess[str]:
    scenario = write_scenario(tmp_path, body, duration)
    return subprocess.run([sys.executable, "-m", "linerec.daemon.cli", "simulate",
                           "--scenario", str(scenario), "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=180, check=False)


def realtime_daemon(scenario: Path, config: Path,
                    workdir: Path | None = None) -> subprocess.Popen[str]:
    """``linerec simulate --realtime``: a daemon that lives as long as its scenario."""
    return subprocess.Popen(
        [sys.executable, "-m", "linerec.daemon.cli", "simulate", "--realtime",
         "--scenario", str(scenario), "--config", str(config),
         *(["--workdir", str(workdir)] if workdir else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_event(daemon: subprocess.Popen[str], kind: str) -> None:
    """Read the daemon's events (stdout) up to the first ``kind``."""
    assert daemon.stdout is not None
    for line in daemon.stdout:
        if json.loads(line)["event"] == kind:
            return
    raise AssertionError(f"no {kind} event")


def outbox_lines(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "recordings" / OUTBOX_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def acked(tmp_path: Path) -> int:
    return int((tmp_path / "recordings" / ACKED_NAME).read_text())


def delivered_at_restart(tmp_path: Path, broker: Broker, config: Path) -> None:
    """The daemon starts again (a scenario with no call): the call's seven events left in
    its outbox reach the office, in order, numbered 1 to 7, each once."""
    office = Office(broker)
    try:
        result = simulate(tmp_path, config, "", 0.5)
        assert result.returncode == 0, result.stderr
        events = office.wait_for(7)
        time.sleep(0.5)  # anything sent twice would have arrived by now
        events = office.events()
    finally:
        office.close()
    assert [(e["seq"], e["event"]) for e in events] == list(zip(range(1, 8), RINGING_CALL,
                                                                strict=True))


def test_events_reach_the_office_through_password_and_acl(tmp_path: Path,
                                                          broker: Broker) -> None:
    office = Office(broker)
    try:
        result = simulate(tmp_path, config_for(tmp_path, broker))
        assert result.returncode == 0, result.stderr
        events = office.wait_for(len(RINGING_CALL))
        statuses = [m for topic, m in office.messages if topic.endswith("/status")]
    finally:
        office.close()
    assert [e["event"] for e in events] == RINGING_CALL
    assert [e["seq"] for e in events] == list(range(1, 8))
    schema = json.loads((Path(__file__).resolve().parent.parent / "docs" / "mqtt"
                         / "event.schema.json").read_text())
    for event in events:
        jsonschema.Draft202012Validator(schema).validate(event)
    assert statuses == ["online", "offline"]  # offline said at a clean stop
    assert acked(tmp_path) == 7


def test_a_refused_password_loses_no_call_and_no_event(tmp_path: Path, broker: Broker) -> None:
    result = simulate(tmp_path, config_for(tmp_path, broker, password="wrong"))  # noqa: S106
    assert result.returncode == 0, result.stderr
    assert "refused the connection" in result.stderr
    assert len(recordings(tmp_path)) == 1  # the recorder records whether or not MQTT works
    assert [json.loads(e["payload"])["event"] for e in outbox_lines(tmp_path)] == RINGING_CALL
    # With the right password the next start delivers them, in order, and nothing twice.
    delivered_at_restart(tmp_path, broker, config_for(tmp_path, broker))
    assert acked(tmp_path) == 7


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    files = {name: folder / f"{name}.pem" for name in
             ("ca", "ca_key", "server_cert", "server_key", "client_cert", "client_key")}
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=linerec test CA", "-keyout", str(files["ca_key"]), "-out", str(files["ca"]))
    for who, name in (("server", "127.0.0.1"), ("client", "linerec")):
        request = folder / f"{who}.csr"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(files[f"{who}_key"]), "-out", str(request))
        extensions = folder / f"{who}.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1\n" if who == "server"
                              else "extendedKeyUsage=clientAuth\n")
        run("x509", "-req", "-in", str(request), "-CA", str(files["ca"]), "-CAkey",
            str(files["ca_key"]), "-CAcreateserial", "-days", "2", "-extfile", str(extensions),
            "-out", str(files[f"{who}_cert"]))
    return files


def test_events_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    certificates = tmp_path / "certs"
    certificates.mkdir()
    tls = make_certificates(certificates)
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Broker(folder, tls=tls)
    broker.start()
    try:
        office = Office(broker, tls)
        try:
            result = simulate(tmp_path, config_for(tmp_path, broker, tls=tls))
            assert result.returncode == 0, result.stderr
            events = office.wait_for(7)
        finally:
            office.close()
    finally:
        broker.stop()
    assert [e["event"] for e in events] == RINGING_CALL


def test_events_survive_a_broker_outage_during_a_call_in_order(tmp_path: Path,
                                                               broker: Broker) -> None:
    """The broker goes away a second into the call and comes back 30 s later: every event
    reaches the office once, in order."""
    office = Office(broker)
    try:
        body = step(0.5, "ring") + step(2.0, "offhook") + step(14.0, "onhook")
        scenario = write_scenario(tmp_path, body, 40.0)
        daemon = realtime_daemon(scenario, config_for(tmp_path, broker))
        time.sleep(1.5)
        broker.stop()
        time.sleep(30.0)
        broker.start()
        out, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, err
        events = office.wait_for(7, timeout=20)
    finally:
        office.close()
    printed = [json.loads(line)["event"] for line in out.splitlines()]
    assert printed == RINGING_CALL
    assert [e["event"] for e in events] == RINGING_CALL
    assert [e["seq"] for e in events] == list(range(1, 8))
    assert acked(tmp_path) == 7


def test_events_in_the_outbox_of_a_killed_daemon_arrive_after_its_restart(
        tmp_path: Path, broker: Broker) -> None:
    broker.stop()  # away while the call happens
    body = step(0.5, "ring") + step(2.0, "offhook") + step(11.0, "onhook")
    scenario = write_scenario(tmp_path, body, 40.0)
    config = config_for(tmp_path, broker)
    daemon = realtime_daemon(scenario, config)
    wait_for_event(daemon, "call_ended")
    time.sleep(0.5)  # the outbox thread writes the last event
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    assert [json.loads(e["payload"])["event"] for e in outbox_lines(tmp_path)] == RINGING_CALL
    broker.start()
    delivered_at_restart(tmp_path, broker, config)


def test_the_outbox_drops_a_torn_line_and_keeps_its_numbers(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    for n in range(3):
        outbox.append("t", {"event": "e", "n": n})
    outbox.acknowledge(2)  # out of order: nothing before it is done yet
    assert outbox.acked == 0
    outbox.acknowledge(1)
    assert outbox.acked == 2 and [e.seq for e in outbox.pending] == [3]
    outbox.close()
    with (tmp_path / OUTBOX_NAME).open("ab") as torn:
        torn.write(b'{"seq": 4, "topic": "t", "pay')  # a power cut mid-write
    again = Outbox(tmp_path)
    assert [e.seq for e in again.pending] == [3]
    assert again.append("t", {"event": "e"}).seq == 4  # numbers go on, never reused
    again.close()
    assert (tmp_path / OUTBOX_NAME).read_text().count("\n") == 4


def test_retained_state_last_call_health_config_and_discovery(tmp_path: Path,
                                                              broker: Broker) -> None:
    office = Office(broker, topics=(EVENT_TOPICS, "homeassistant/#"))
    try:
        result = simulate(tmp_path, config_for(tmp_path, broker))
        assert result.returncode == 0, result.stderr
        office.wait_for(7)
        time.sleep(0.5)
    finally:
        office.close()
    states = [m["state"] for m in office.on("linerec/office/line/line1/state")]
    assert states == ["idle", "ringing", "offhook", "disclosing", "recording", "offhook", "idle"]
    recording = office.on("linerec/office/line/line1/state")[4]
    assert recording["direction"] == "inbound" and recording["call_id"]
    assert [m["state"] for m in office.on("linerec/office/line/line2/state")] == ["idle"]
    [last] = office.on("linerec/office/line/line1/last_call")
    assert last["recorded"] is True and last["call_id"] == recording["call_id"]
    assert "number" not in last
    health = office.on("linerec/office/health")[-1]
    assert health["storage_free_bytes"] > 0 and health["version"]
    assert health["disclosure_failures"] == {"line1": 0, "line2": 0}
    assert health["overruns"] == {"tap": 0} and health["lines_in_fault"] == []
    [config] = office.on("linerec/office/config")
    schema_file = Path(__file__).resolve().parent.parent / "docs" / "mqtt" / "config.schema.json"
    schema = json.loads(schema_file.read_text())
    # The documented schema is the loader's own (regenerate it when the config changes).
    assert schema == json_schema(title=schema["title"])
    jsonschema.Draft202012Validator(schema).validate(config)
    assert config["mqtt"]["username"] == DAEMON[0] and config["mqtt"]["password"] is None
    assert DAEMON[1] not in json.dumps(office.messages)
    assert [line["name"] for line in config["line"]] == ["line1", "line2"]
    for topic, name in (("line/line1/state", "state"), ("line/line2/state", "state"),
                        ("line/line1/last_call", "last_call"), ("health", "health")):
        schema = json.loads((Path(__file__).resolve().parent.parent / "docs" / "mqtt"
                             / f"{name}.schema.json").read_text())
        for payload in office.on(f"linerec/office/{topic}"):
            jsonschema.Draft202012Validator(schema).validate(payload)
    discovery = {t: m for t, m in office.messages if t.startswith("homeassistant/")}
    assert len(discovery) == 7
    recording_sensor = discovery["homeassistant/binary_sensor/office_line1_recording/config"]
    assert recording_sensor["state_topic"] == "linerec/office/line/line1/state"
    assert recording_sensor["availability_topic"] == "linerec/office/status"

    # line2 taken out of the config: its entities are removed from Home Assistant.
    config_file = config_for(tmp_path, broker)
    text = config_file.read_text()
    start = text.index('[[line]]\nname = "line2"')
    config_file.write_text(text[:start] + text[text.index("\n[mqtt]"):])
    office = Office(broker, topics=("homeassistant/#",), client_id="office-test-2")
    try:
        result = simulate(tmp_path, config_file, "", 0.5)
        assert result.returncode == 0, result.stderr
        time.sleep(1.0)
    finally:
        office.close()
    cleared = sorted(t for t, m in office.messages if m == "")
    assert cleared == [f"homeassistant/{kind}/office_line2_{what}/config" for kind, what in (
        ("binary_sensor", "recording"), ("sensor", "last_call"), ("sensor", "state"))]


def test_commands_answer_every_request_once_and_change_nothing_when_wrong(
        tmp_path: Path, broker: Broker) -> None:
    config = config_for(tmp_path, broker)
    assert simulate(tmp_path, config).returncode == 0  # one recorded call in the storage
    [receipt_file] = (tmp_path / "recordings").glob("*/*/*/*.json")
    call_id = receipt_file.stem
    office = Office(broker, topics=("linerec/office/reply",))
    try:
        # line2 is lifted and nothing dialled: a line to test the disclosure on.
        scenario = write_scenario(tmp_path, step(1.0, "offhook", line="line2")
                                  + step(24.0, "onhook", line="line2"), 25.0)
        daemon = realtime_daemon(scenario, config, tmp_path / "work")
        requests = [
            ("find", {"request_id": "r1", "args": {"line": "line1"}}),
            ("find", {"request_id": "r2", "args": {"from": "yesterday"}}),
            ("hold", {"request_id": "r3", "args": {"call_ids": [call_id], "reason": "T-1"}}),
            ("delete", {"request_id": "r4", "args": {"call_ids": [call_id],
                                                     "reason": "DSR-9"}}),
            ("delete", {"request_id": "r5", "args": {"call_ids": ["../../etc/passwd"],
                                                     "reason": "x"}}),
            ("status", {"request_id": "r6"}),
            ("launch", {"request_id": "r7"}),
            ("export-list", {"request_id": "r8", "args": {"call_ids": [call_id]}}),
            ("test-disclosure", {"request_id": "t1", "args": {"line": "line1"}}),
            ("test-disclosure", {"request_id": "t2", "args": {"line": "line1",
                                                              "render": True}}),
            ("test-disclosure", {"request_id": "t3", "args": {"line": "line9"}}),
            ("test-disclosure", {"request_id": "t4", "args": {"line": "line2"}}),
        ]
        time.sleep(3.0)  # connected and subscribed
        for name, request in requests:
            office.client.publish(f"linerec/office/cmd/{name}", json.dumps(request), qos=1)
        office.client.publish("linerec/office/cmd/find", b"\xff not json", qos=1)
        deadline = time.monotonic() + 15
        while len(office.on("linerec/office/reply")) < 13 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(8.0)  # the test disclosure plays out into line2
        daemon.terminate()
        daemon.wait(timeout=30)
    finally:
        office.close()
    replies = {r["request_id"]: r for r in office.on("linerec/office/reply")}
    assert len(office.on("linerec/office/reply")) == 13
    schema = json.loads((Path(__file__).resolve().parent.parent / "docs" / "mqtt"
                         / "reply.schema.json").read_text())
    for reply in replies.values():
        jsonschema.Draft202012Validator(schema).validate(reply)
    assert [c["call_id"] for c in replies["r1"]["result"]] == [call_id]
    assert not str(replies["r1"]["result"][0]["recording"]).startswith("/")
    assert replies["r2"]["error"]["key"] == "args.from"
    assert replies["r3"]["ok"] and replies["r3"]["result"] == [call_id]
    assert not replies["r4"]["ok"] and "hold" in replies["r4"]["error"]["problem"]
    assert replies["r5"]["error"]["key"] == "args" and "not a linerec call id" in \
        replies["r5"]["error"]["problem"]
    assert replies["r6"]["result"]["lines"]["line1"]["state"] == "idle"
    assert replies["r7"]["error"]["key"] == "(topic)"
    assert replies["r8"]["result"][0]["recording_sha256"]
    assert replies[None]["error"]["key"] == "(payload)"
    assert receipt_file.is_file()  # held: the delete changed nothing
    # test-disclosure: refused on an on-hook line, rendered to a file, played into a line
    # that is off-hook with nothing dialled.
    assert "on-hook" in replies["t1"]["error"]["problem"]
    rendered = tmp_path / "recordings" / replies["t2"]["result"]["file"]
    assert replies["t2"]["result"]["duration_s"] == pytest.approx(6.55, abs=0.05)
    with wave.open(str(rendered)) as wav:
        assert wav.getnframes() / 8000 == pytest.approx(replies["t2"]["result"]["duration_s"],
                                                        abs=0.001)
    assert "no line 'line9'" in replies["t3"]["error"]["problem"]
    assert replies["t4"]["ok"] and replies["t4"]["result"]["played"] is True
    played = (tmp_path / "work" / "line2.played.wav")
    with wave.open(str(played)) as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    sounding = np.flatnonzero(samples)
    assert (sounding[-1] - sounding[0]) / 8000 == pytest.approx(6.5, abs=0.3)


def test_random_payloads_get_one_reply_each_and_change_nothing(tmp_path: Path) -> None:
    """Property-based: whatever arrives on a command topic or config/set is answered, never
    crashes the handler, and leaves the storage and the config file as they were."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from linerec.daemon.commands import CommandHandler, Configurator
    from linerec.daemon.config import load_config

    config = sim_config(tmp_path)
    assert simulate(tmp_path, config).returncode == 0
    storage = tmp_path / "recordings"
    handler = CommandHandler(storage, lambda: {"lines": {}},
                             configurator=Configurator(config, load_config(config),
                                                       lambda new: None))
    config_text = config.read_bytes()

    def snapshot() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in sorted(storage.rglob("*")) if p.is_file()}

    before = snapshot()
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=30),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                     inner, max_size=4),
        max_leaves=12)
    requests = st.fixed_dictionaries(
        {"request_id": st.text(max_size=70) | st.sampled_from(["r1", "ok-id"])},
        optional={"args": st.dictionaries(
            st.sampled_from(["call_ids", "reason", "number", "from", "to", "line", "config",
                             "x"]),
            json_values, max_size=4), "junk": json_values})
    payloads = st.binary(max_size=200) | requests.map(lambda r: json.dumps(r).encode())
    names = st.sampled_from([*handler.names, "reload", "", "../x"])

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(names, payloads)
    def answered(name: str, payload: bytes) -> None:
        reply = handler.handle(name, payload)
        assert isinstance(reply["ok"], bool)
        json.dumps(reply)  # a reply can always be sent
        if not reply["ok"]:
            assert reply["error"]["key"] and reply["error"]["problem"]

    answered()
    assert snapshot() == before
    assert config.read_bytes() == config_text


def test_config_set_refuses_bad_changes_naming_the_key_and_changes_nothing(
        tmp_path: Path) -> None:
    from linerec.daemon.commands import CommandHandler, Configurator
    from linerec.daemon.config import load_config

    path = sim_config(tmp_path)
    running = load_config(path)
    applied: list[Any] = []
    handler = CommandHandler(tmp_path, lambda: {}, configurator=Configurator(
        path, running, applied.append))
    original = path.read_bytes()
    line = {"name": "line1", "capture": "tap", "playback": "out", "hook_pin": 17,
            "ring_pin": 27, "led_pin": 22, "disclosure": "welcome"}
    for change, key, words in (
            ({"colour": 1}, "config.colour", "unknown key"),
            ({"audio": {"bitrate": "fast"}}, "config.audio.bitrate", "whole number"),
            ({"audio": {"periods": 1}}, "config.audio.periods", "out of range"),
            ({"disclosure": [{"name": "welcome", "purpose": "service",
                              "parts": [{"language": "en", "file": "/nope.wav"}]}]},
             "config.disclosure[0].parts[0].file", "not found"),
            ({"line": [{**line, "answer_timeout_s": 1}]}, "config.line[0].answer_timeout_s",
             "out of range"),
            ({"numbers": {"never_record": "0201234567"}}, "config.numbers.never_record",
             "list of strings")):
        reply = handler.handle("config/set", json.dumps(
            {"request_id": "c1", "args": {"config": change}}).encode())
        assert not reply["ok"], change
        assert reply["error"]["key"] == key and words in reply["error"]["problem"], reply
        assert path.read_bytes() == original and applied == []
    reply = handler.handle("config/set", b'{"request_id": "c2", "args": {"config": 5}}')
    assert reply["error"]["key"] == "args.config"

    # A good one: written atomically, applied; device settings wait for a restart.
    reply = handler.handle("config/set", json.dumps({"request_id": "c3", "args": {"config": {
        "numbers": {"never_record": ["0201234567"]}, "audio": {"bitrate": 16000}}}}).encode())
    assert reply["ok"], reply
    assert reply["result"] == {"applied": ["numbers"], "restart_required": ["audio"]}
    saved = load_config(path)
    assert saved.numbers.never_record == ("0201234567",) and saved.audio.bitrate == 16000
    assert [c.numbers.never_record for c in applied] == [("0201234567",)]
    assert not list(tmp_path.glob("*.tmp"))
    reply = handler.handle("reload", b'{"request_id": "c4"}')
    assert reply["result"] == {"applied": [], "restart_required": ["audio"]}


def test_config_set_during_a_call_applies_when_the_line_is_free(tmp_path: Path,
                                                              broker: Broker) -> None:
    """The number becomes never-record while its call is recorded: that call keeps its
    settings to the end; the next call from that number plays nothing and records nothing."""
    config = config_for(tmp_path, broker)
    body = (step(0.3, "callerid", number="0201234567") + step(1.0, "ring")
            + step(6.0, "offhook") + step(20.0, "onhook")
            + step(21.0, "callerid", number="0201234567") + step(22.0, "ring")
            + step(27.0, "offhook") + step(31.0, "onhook"))
    scenario = write_scenario(tmp_path, body, 33.0)
    office = Office(broker, topics=(EVENT_TOPICS,))
    try:
        daemon = realtime_daemon(scenario, config)
        wait_for_event(daemon, "recording_started")
        office.client.publish("linerec/office/config/set", json.dumps(
            {"request_id": "live", "args": {"config": {"numbers": {
                "never_record": ["0201234567"]}}}}), qos=1)
        _, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, err
        time.sleep(0.5)
    finally:
        office.close()
    [reply] = office.on("linerec/office/reply")
    assert reply["ok"] and reply["result"]["applied"] == ["numbers"], reply
    ended = [e for e in office.events() if e["event"] == "call_ended"]
    assert [(e["recorded"], e["rule"]) for e in ended] == [(True, None),
                                                           (False, "never_record")]
    assert len(recordings(tmp_path)) == 1
    [config_payload] = [m for t, m in office.messages if t == "linerec/office/config"][-1:]
    assert config_payload["numbers"]["never_record"] == ["0201234567"]


def test_mqtt_5_events_and_replies_with_correlation_data(tmp_path: Path,
                                                         broker: Broker) -> None:
    """With protocol 5 the events flow as before, and a reply goes to the request's response
    topic with its correlation data."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    config = config_for(tmp_path, broker)
    config.write_text(config.read_text() + 'protocol = "5"\n')
    office = Office(broker)
    try:
        assert simulate(tmp_path, config).returncode == 0
        events = office.wait_for(7)
    finally:
        office.close()
    assert [e["event"] for e in events] == RINGING_CALL

    replies: list[tuple[str, Any, Any]] = []
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="crm-v5",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(*OFFICE)
    client.on_connect = lambda c, *a: c.subscribe("linerec/office/answers/crm", qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: replies.append(
        (m.topic, json.loads(m.payload), getattr(m.properties, "CorrelationData", None)))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        daemon = realtime_daemon(write_scenario(tmp_path, "", 8.0), config)
        time.sleep(3.0)
        request = Properties(PacketTypes.PUBLISH)
        request.CorrelationData = b"crm-0042"
        request.ResponseTopic = "linerec/office/answers/crm"
        client.publish("linerec/office/cmd/status", json.dumps({"request_id": "s1"}), qos=1,
                       properties=request)
        deadline = time.monotonic() + 10
        while not replies and time.monotonic() < deadline:
            time.sleep(0.1)
        daemon.communicate(timeout=30)
    finally:
        client.disconnect()
        client.loop_stop()
    [(topic, reply, correlation)] = replies
    assert topic == "linerec/office/answers/crm" and correlation == b"crm-0042"
    assert reply["request_id"] == "s1" and reply["ok"]


def test_random_payloads_on_every_inbound_topic_of_a_running_daemon(tmp_path: Path,
                                                                    broker: Broker) -> None:
    """Property-based, end to end: random payloads on every command topic and config/set
    each get exactly one reply from the running daemon, which goes on answering, and leave
    the recordings, receipts, audit log and config file as they were."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    config = config_for(tmp_path, broker)
    assert simulate(tmp_path, config).returncode == 0
    storage = tmp_path / "recordings"

    def snapshot() -> dict[str, bytes]:
        # The daemon's own MQTT files and a rendered test disclosure may change by design.
        return {str(p): p.read_bytes() for p in sorted(storage.rglob("*")) if p.is_file()
                and not p.name.startswith(("mqtt-", "test-disclosure-"))}

    before, config_text = snapshot(), config.read_bytes()
    office = Office(broker, topics=("linerec/office/reply",))
    daemon = realtime_daemon(write_scenario(tmp_path, "", 120.0), config)
    try:
        time.sleep(3.0)
        values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                st.sampled_from(["line", "render", "direction", "call_ids", "reason",
                                 "config", "numbers", "audio", "bitrate", "x"]),
                inner, max_size=3), max_leaves=8)
        requests = st.fixed_dictionaries({"request_id": st.sampled_from(["p1", "p2", "bad id"])},
                                         optional={"args": values})
        payloads = st.binary(max_size=100) | requests.map(lambda r: json.dumps(r).encode())
        topics = st.sampled_from([*(f"cmd/{name}" for name in (
            "status", "find", "export-list", "delete", "hold", "release", "test-disclosure",
            "reload", "nope")), "config/set"])

        @settings(max_examples=120, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(topics, payloads)
        def answered(topic: str, payload: bytes) -> None:
            count = len(office.on("linerec/office/reply"))
            office.client.publish(f"linerec/office/{topic}", payload, qos=1)
            deadline = time.monotonic() + 10
            while len(office.on("linerec/office/reply")) == count \
                    and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.02)  # a second reply, were there one, would be here by now
            replies = office.on("linerec/office/reply")[count:]
            assert len(replies) == 1, (topic, payload, replies)
            assert isinstance(replies[0]["ok"], bool)

        answered()
        assert daemon.poll() is None  # still running
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        office.close()
    assert snapshot() == before
    assert config.read_bytes() == config_text


def test_device_settings_set_over_mqtt_restart_the_daemon_once_no_line_has_a_call(
        tmp_path: Path, broker: Broker) -> None:
    """A new bitrate cannot change under a running encoder: saved, and once the call in
    progress has ended linerec stops with status 3 for systemd to start it with it."""
    config = config_for(tmp_path, broker)
    body = step(0.5, "ring") + step(2.0, "offhook") + step(14.0, "onhook")
    office = Office(broker, topics=("linerec/office/reply",))
    try:
        started = time.monotonic()
        daemon = realtime_daemon(write_scenario(tmp_path, body, 60.0), config)
        wait_for_event(daemon, "recording_started")
        office.client.publish("linerec/office/config/set", json.dumps(
            {"request_id": "b1", "args": {"config": {"audio": {"bitrate": 16000}}}}), qos=1)
        _, err = daemon.communicate(timeout=60)
        ran_for = time.monotonic() - started
    finally:
        office.close()
    assert daemon.returncode == 3, err
    assert "starts again" in err
    [reply] = office.on("linerec/office/reply")
    assert reply["result"] == {"applied": [], "restart_required": ["audio"]}
    assert "bitrate = 16000" in config.read_text()
    # The call was not dropped: it ended on-hook, recorded whole.
    [receipt] = [json.loads(p.read_text()) for p in
                 (tmp_path / "recordings").glob("*/*/*/*.json")]
    assert receipt["end_reason"] == "onhook" and receipt["recording"]["status"] == "complete"
    # It stopped by itself once the call had ended (14 s), long before its scenario's 60 s.
    assert 14.0 < ran_for < 30.0
