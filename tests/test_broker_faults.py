"""Broker faults against real mosquitto brokers and real daemons: a refused login and a
refusing ACL, every way TLS fails, and a broker that flaps for a minute while calls go on.
Each test says what it measured (run with ``-s`` to see the figures).

``LINEREC_FLAP_S`` sets how long the broker flaps (30 s by default, in CI; 600 for the long run)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from simhelpers import step, write_scenario
from test_mqtt import (
    DAEMON,
    RINGING_CALL,
    Broker,
    Office,
    acked,
    config_for,
    make_certificates,
)

FLAP_S = float(os.environ.get("LINEREC_FLAP_S", "30"))
TICKS = os.sysconf("SC_CLK_TCK")


class FaultBroker(Broker):
    """test_mqtt's broker, logging every connection to a file (to count attempts), with an
    ACL and passwords that can change under it (SIGHUP makes mosquitto read them again)."""

    def __init__(self, folder: Path, *, tls: dict[str, Path] | None = None,
                 daemon_acl: str = "topic readwrite linerec/office/#") -> None:
        super().__init__(folder, tls=tls)
        self.log = folder / "broker.log"
        self.conf.write_text(self.conf.read_text() + f"log_dest file {self.log}\n"
                             "connection_messages true\nlog_type all\n")
        self.set_daemon_acl(daemon_acl)

    def set_daemon_acl(self, rules: str) -> None:
        (self.folder / "acl").write_text(
            f"user {DAEMON[0]}\n{rules}\ntopic readwrite homeassistant/#\n\n"
            "user office\ntopic read linerec/office/#\ntopic read homeassistant/#\n")

    def set_password(self, user: str, password: str) -> None:
        subprocess.run(["mosquitto_passwd", "-b", str(self.folder / "passwd"), user, password],
                       check=True)

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def attempts(self) -> int:
        """Connections the broker saw (the daemon's refused ones included; the office's
        client connects once)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count("New connection from")


class Daemon:
    """``linerec simulate --realtime`` with its output in files (a pipe nobody reads would
    stop it on a long run), and its CPU time and memory read from /proc."""

    def __init__(self, tmp_path: Path, scenario: Path, config_file: Path) -> None:
        self.out, self.err = tmp_path / "daemon.out", tmp_path / "daemon.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "linerec.daemon.cli", "simulate", "--realtime",
                 "--scenario", str(scenario), "--config", str(config_file)],
                stdout=out, stderr=err, text=True)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def finish(self, timeout: float = 90.0) -> tuple[list[dict[str, Any]], str]:
        assert self.proc.wait(timeout=timeout) == 0, self.err.read_text()
        return ([json.loads(line) for line in self.out.read_text().splitlines()],
                self.err.read_text())


def delivered(office: Office, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    office.wait_for(count, timeout)
    time.sleep(1.0)  # anything sent twice would have arrived by now
    return office.events()


CALL = step(0.5, "ring") + step(2.0, "offhook") + step(11.0, "onhook")


def test_refused_login_then_refused_acl_lose_nothing_and_do_not_spin(tmp_path: Path) -> None:
    """MQTT 3.1.1, one daemon, a call at 0.5-11 s. The broker first refuses the daemon's
    password (reconnect attempts and CPU measured), then takes it (its password file put
    right, SIGHUP) but its ACL lets the daemon only read its topics: mosquitto acknowledges
    and drops every event, which the daemon sees by their not coming back; then the ACL is
    put right. Every event arrives, in order, once; the journal names the broker and what
    to do, each problem once."""
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = FaultBroker(folder, daemon_acl="topic read linerec/office/#")
    broker.set_password(DAEMON[0], "not-what-the-daemon-has")
    broker.start()
    try:
        office = Office(broker)
        try:
            daemon = Daemon(tmp_path, write_scenario(tmp_path, CALL, 34.0),
                            config_for(tmp_path, broker))
            time.sleep(2.0)  # start-up
            cpu0, t0, tries0 = daemon.cpu_s(), time.monotonic(), broker.attempts()
            time.sleep(12.0)
            refused_s = time.monotonic() - t0
            cpu = (daemon.cpu_s() - cpu0) / refused_s
            tries = broker.attempts() - tries0
            broker.set_password(*DAEMON)
            broker.reload()  # logged in now; the ACL still drops the events
            time.sleep(14.0)
            assert office.events() == []
            broker.set_daemon_acl("topic readwrite linerec/office/#")
            broker.reload()
            printed, err = daemon.finish()
            events = delivered(office, 7)
        finally:
            office.close()
    finally:
        broker.stop()
    per_minute = tries / refused_s * 60
    print(f"\nrefused login: {tries} attempts in {refused_s:.1f} s ({per_minute:.0f}/min with "
          f"reconnect_max_s = 2), daemon CPU {cpu:.1%} of a core (audio simulation included)")
    # What the daemon made (an error event too when the machine is too busy for the
    # simulated line) reached the office in order, each once.
    assert [e["event"] for e in printed][:7] == RINGING_CALL
    assert [(e["seq"], e["event"]) for e in events] == [
        (n, e["event"]) for n, e in enumerate(printed, 1)]
    assert acked(tmp_path) == len(printed)
    # At most one attempt per reconnect_max_s (2 s) after the first few: no busy loop.
    assert 3 <= tries <= refused_s / 2 + 3, tries
    assert cpu < 0.5
    login = f"MQTT broker 127.0.0.1:{broker.port} refused the connection for user linerec"
    acl = f"MQTT broker 127.0.0.1:{broker.port} acknowledged event seq 1 on topic " \
          "linerec/office/line/line1/event but did not deliver it"
    assert err.count(login) == 1, err  # logged once, not at every attempt
    assert "then restart linerec" in err
    assert err.count(acl) == 1 and "read and write linerec/office/#" in err, err
    assert err.index(login) < err.index(acl) < err.rindex("takes events again")


def test_acl_refusal_with_mqtt_5_keeps_events_until_the_acl_is_fixed(tmp_path: Path) -> None:
    """MQTT 5: mosquitto's PUBACK says "Not authorized". The daemon keeps every event in
    its outbox; after the ACL is put right the next start delivers them, in order, once."""
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = FaultBroker(folder, daemon_acl="topic read linerec/office/#\n"
                                            "topic readwrite linerec/office/status")
    broker.start()
    try:
        config_file = config_for(tmp_path, broker, extra='protocol = "5"\n')
        result = simulate(tmp_path, config_file, CALL + step(13.0, "ring", "line2"), 14.0)
        assert result.returncode == 0, result.stderr
        assert f"MQTT broker 127.0.0.1:{broker.port} refused event seq 1 on topic " \
               "linerec/office/line/line1/event (Not authorized): let user linerec publish " \
               "to linerec/office/# in the broker's ACL" in result.stderr
        assert "8 event(s) had not reached" in result.stderr
        broker.set_daemon_acl("topic readwrite linerec/office/#")
        broker.reload()
        office = Office(broker)
        try:
            assert simulate(tmp_path, config_file, "", 0.5).returncode == 0
            events = delivered(office, 8)
        finally:
            office.close()
    finally:
        broker.stop()
    assert [(e["seq"], e["event"]) for e in events] == list(zip(
        range(1, 9), [*RINGING_CALL, "ringing"], strict=True))


def simulate(tmp_path: Path, config_file: Path, body: str,
             duration: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linerec.daemon.cli", "simulate",
                           "--scenario", str(write_scenario(tmp_path, body, duration)),
                           "--config", str(config_file)],
                          capture_output=True, text=True, timeout=120, check=False)


def sign(folder: Path, ca: Path, ca_key: Path, name: str, *, san: str = "IP:127.0.0.1",
         dates: tuple[str, str] | None = None) -> tuple[Path, Path]:
    """A server certificate signed by ``ca``; ``dates`` (openssl's YYYYMMDDHHMMSSZ) for one
    that has expired."""
    key, csr, cert = (folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=broker",
                    "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
    db = folder / f"{name}-ca"
    db.mkdir()
    (db / "index.txt").touch()
    (db / "serial").write_text("1000\n")
    (db / "ca.cnf").write_text(
        f"[ca]\ndefault_ca = d\n[d]\ndatabase = {db}/index.txt\nnew_certs_dir = {db}\n"
        f"serial = {db}/serial\ndefault_md = sha256\npolicy = p\nx509_extensions = ext\n"
        f"default_days = 2\n[p]\ncommonName = supplied\n[ext]\nsubjectAltName = {san}\n")
    when = ["-startdate", dates[0], "-enddate", dates[1]] if dates else []
    subprocess.run(["openssl", "ca", "-batch", "-config", str(db / "ca.cnf"), "-cert", str(ca),
                    "-keyfile", str(ca_key), "-in", str(csr), "-out", str(cert), *when],
                   check=True, capture_output=True)
    return cert, key


def test_every_tls_failure_is_named_and_loses_nothing(tmp_path: Path) -> None:
    """First a start whose client certificate file is garbage: the call is recorded, its
    events kept, the journal names the file to fix. Then one daemon with a good config
    while the broker's port shows, a few seconds each: plain MQTT without TLS, a
    certificate from a CA the daemon does not know, one for another host name, an expired
    one, and at last the right one. Each failure is logged once with what to do; the 15
    events of both starts arrive in order, once each."""
    certificates = tmp_path / "certs"
    certificates.mkdir()
    tls = make_certificates(certificates)
    (tmp_path / "other-ca").mkdir()
    other = make_certificates(tmp_path / "other-ca")  # a CA the daemon does not know
    wrong_host = sign(certificates, tls["ca"], tls["ca_key"], "wrong-host",
                      san="DNS:broker.example")
    expired = sign(certificates, tls["ca"], tls["ca_key"], "expired",
                   dates=("20200101000000Z", "20200201000000Z"))
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = FaultBroker(folder, tls=tls)
    good_conf = broker.conf.read_text()
    plain_conf = "\n".join(line for line in good_conf.splitlines()
                           if not line.startswith(("cafile", "certfile", "keyfile", "require_"))
                           ) + "\n"

    def serve(conf: str, cert: tuple[Path, Path] | None = None) -> None:
        broker.stop()
        if cert is not None:
            conf = conf.replace(f"certfile {tls['server_cert']}", f"certfile {cert[0]}") \
                .replace(f"keyfile {tls['server_key']}", f"keyfile {cert[1]}")
        broker.conf.write_text(conf)
        broker.start()

    garbage = certificates / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n"
                       "-----END CERTIFICATE-----\n")
    bad = config_for(tmp_path, broker, tls={**tls, "client_cert": garbage})
    result = simulate(tmp_path, bad, CALL, 12.0)
    assert result.returncode == 0, result.stderr
    assert "the TLS files in [mqtt] cannot be used" in result.stderr
    assert "7 event(s) had not reached" in result.stderr

    broker.conf.write_text(plain_conf)
    broker.start()
    office: Office | None = None
    try:
        daemon = Daemon(tmp_path, write_scenario(tmp_path, CALL, 30.0),
                        config_for(tmp_path, broker, tls=tls))
        time.sleep(6.0)
        serve(good_conf, (other["server_cert"], other["server_key"]))
        time.sleep(4.0)
        serve(good_conf, wrong_host)
        time.sleep(4.0)
        serve(good_conf, expired)
        time.sleep(4.0)
        serve(good_conf)
        office = Office(broker, tls)
        printed, err = daemon.finish()
        events = delivered(office, 14)
    finally:
        if office is not None:
            office.close()
        broker.stop()
    assert [e["event"] for e in printed] == RINGING_CALL
    assert [(e["seq"], e["event"]) for e in events] == list(zip(
        range(1, 15), RINGING_CALL * 2, strict=True))
    where = f"MQTT broker 127.0.0.1:{broker.port}"
    expected = [
        f"{where} closed the connection during the TLS handshake",  # plain MQTT there
        "unable to get local issuer certificate",  # a CA the daemon does not know
        "IP address mismatch",  # a certificate for another name
        "certificate has expired",
        f"{where} takes events again",
    ]
    at = [err.find(text) for text in expected]
    print(f"\nTLS failures logged at offsets {at}")
    assert all(offset >= 0 for offset in at) and at == sorted(at), err
    assert err.count("check that [mqtt] ca_file is the CA that signed it") == 3, err


def test_a_flapping_broker_loses_no_event_and_memory_stays_flat(tmp_path: Path) -> None:
    """The broker goes away every 2-5 s (terminated, or stopped with SIGSTOP) for 2-5 s,
    for LINEREC_FLAP_S seconds, while calls come and go on both lines. Every event the
    daemon made reaches the office, in seq order once duplicates are dropped; the
    duplicates QoS 1 allows are counted; the daemon's RSS over the last stretch of the run
    is within a bound of the first."""
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = FaultBroker(folder)
    broker.start()
    body = ""
    at = 0.5
    while at < FLAP_S:
        body += step(at, "ring") + step(at + 1.5, "offhook") + step(at + 10.5, "onhook")
        body += step(at + 6.0, "ring", "line2") + step(at + 7.0, "offhook", "line2") \
            + step(at + 16.0, "onhook", "line2")
        at += 18.0
    duration = max(at + 1.0, FLAP_S + 8.0)
    rng = random.Random(20261129)
    samples: list[tuple[float, int]] = []
    faults = {"terminated": 0, "stopped": 0}
    office = Office(broker)
    try:
        daemon = Daemon(tmp_path, write_scenario(tmp_path, body, duration),
                        config_for(tmp_path, broker))
        started = time.monotonic()
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5) and daemon.proc.poll() is None:
                try:
                    samples.append((time.monotonic() - started, daemon.rss_kb()))
                except (OSError, AssertionError):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(2.0)
        while time.monotonic() - started < FLAP_S:
            time.sleep(rng.uniform(2.0, 5.0))
            down = rng.uniform(2.0, 5.0)
            assert broker.proc is not None
            if rng.random() < 0.5:
                faults["terminated"] += 1
                broker.stop()
                time.sleep(down)
                broker.start()
            else:
                faults["stopped"] += 1
                broker.proc.send_signal(signal.SIGSTOP)
                time.sleep(down)
                broker.proc.send_signal(signal.SIGCONT)
        flapped_s = time.monotonic() - started
        printed, err = daemon.finish(timeout=duration + 60)
        done.set()
        sampler.join()
        raw = delivered(office, len(printed), timeout=60)
    finally:
        office.close()
        broker.stop()
    seqs = [e["seq"] for e in raw]
    first_seen: list[int] = []
    for seq in seqs:
        if seq not in first_seen:
            first_seen.append(seq)
    duplicates = len(seqs) - len(first_seen)
    stretch = max(1, len(samples) // 5)
    first = sorted(kb for _, kb in samples[2:2 + stretch])[stretch // 2]
    last = sorted(kb for _, kb in samples[-stretch:])[stretch // 2]
    print(f"\nflapping {flapped_s:.0f} s ({faults}): {len(printed)} events made, "
          f"{len(raw)} delivered, {duplicates} duplicate(s); RSS median first stretch "
          f"{first} kB, last stretch {last} kB ({len(samples)} samples)")
    assert first_seen == list(range(1, len(printed) + 1))  # in order, none lost
    by_seq = {e["seq"]: e["event"] for e in raw}
    assert [by_seq[s] for s in first_seen] == [e["event"] for e in printed]
    assert duplicates <= sum(faults.values())  # at most the one in flight per outage
    assert acked(tmp_path) == len(printed)
    assert last - first < 4096, (first, last)
    assert err.count("lost (") <= 1 + int(FLAP_S // 600), err  # not one line per flap
