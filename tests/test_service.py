"""The daemon as systemd runs it: the unit file, and sd_notify over a real unix socket."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simhelpers import NotifySocket, sim_config, step, write_scenario

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "linerec.service"


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this venv's linerec (verify checks it exists)."""
    linerec = Path(sys.executable).parent / "linerec"
    path = tmp_path / "linerec.service"
    path.write_text(UNIT.read_text().replace("/opt/linerec/bin/linerec", str(linerec)))
    return path


def test_unit_file_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of the systemd package"
    unit = unit_for_this_machine(tmp_path)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    text = UNIT.read_text()
    assert "Type=notify" in text
    security = subprocess.run([analyze, "security", "--offline=true", "--threshold=20",
                               str(unit)], capture_output=True, text=True, check=False)
    assert security.returncode == 0, security.stdout[-2000:]


@pytest.fixture
def line_devices(tmp_path: Path) -> Iterator[dict[str, str]]:
    """ALSA file-plugin PCMs fed in real time from a FIFO, as a quiet line would be."""
    fifo = tmp_path / "tap.fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)
    asoundrc = tmp_path / "asoundrc"
    asoundrc.write_text(
        f'pcm.tap {{ type file slave.pcm "null" file "/dev/null" infile "{fifo}" format "raw" }}\n'
        f'pcm.out {{ type file slave.pcm "null" file "{tmp_path}/out.raw" format "raw" }}\n')
    stop = threading.Event()

    def feed() -> None:
        silence = bytes(160 * 2 * 2)  # 20 ms of two-channel S16_LE at 8 kHz
        while not stop.wait(0.02):
            os.write(fd, silence)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield {"ALSA_CONFIG_PATH": f"/usr/share/alsa/alsa.conf:{asoundrc}"}
    finally:
        stop.set()
        feeder.join()
        os.close(fd)


def test_run_tells_systemd_ready_status_and_stopping(tmp_path: Path,
                                                     line_devices: dict[str, str]) -> None:
    config = sim_config(tmp_path)
    text = config.read_text().replace('device = "hw:CARD=tapHAT"', 'device = "tap"')
    text = text.replace('device = "plughw:CARD=tapHAT"', 'device = "out"')
    config.write_text(text)
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    env = {**os.environ, **line_devices, "NOTIFY_SOCKET": str(notify_path),
           "GPIOZERO_PIN_FACTORY": "mock"}
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen([sys.executable, "-m", "linerec.daemon.cli", "run", "--config",
                             str(config)], env=env, stderr=subprocess.PIPE, text=True)
    messages: list[str] = []
    try:
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=line1: idle, line2: idle" in ready
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGUSR1)  # a stack dump, and it runs on
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "armed 2 line(s): line1, line2" in stderr
    assert "SIGTERM received" in stderr
    # Every thread's stack: the capture thread waits inside the ALSA adapter's read.
    assert stderr.count("(most recent call first)") >= 4
    assert "linerec/hw/alsa.py" in stderr or "/hw/alsa.py" in stderr


def test_run_refuses_a_bad_config_with_status_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("storage = 3\n")
    result = subprocess.run([sys.executable, "-m", "linerec.daemon.cli", "run", "--config",
                             str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert f"{bad}: storage: expected a path" in result.stderr


def test_run_exits_cleanly_when_a_device_is_missing(tmp_path: Path) -> None:
    config = sim_config(tmp_path)
    config.write_text(config.read_text().replace('"plughw:CARD=tapHAT"', '"linerec_no_such_pcm"'))
    env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}
    env.pop("JOURNAL_STREAM", None)
    result = subprocess.run([sys.executable, "-m", "linerec.daemon.cli", "run", "--config",
                             str(config)], env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 1
    assert "ALSA device 'linerec_no_such_pcm' (playback 'out') cannot be opened" in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_storage_is_refused_before_any_call(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text("duration = 1.0\n")
    result = subprocess.run([sys.executable, "-m", "linerec.daemon.cli", "simulate",
                             "--scenario", str(scenario), "--storage", "/dev/null/recordings"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "storage folder /dev/null/recordings is not writable" in result.stderr
    assert "Traceback" not in result.stderr


def realtime_config(tmp_path: Path) -> Path:
    config = sim_config(tmp_path)
    config.write_text(config.read_text() + "\n[audio]\ncapture_priority = 10\nlock_memory = true\n")
    return config


DEMO = REPO / "hw" / "scenarios" / "demo.toml"


def test_real_time_capture_and_locked_memory_where_allowed(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to be granted SCHED_FIFO and mlockall")
    result = subprocess.run([sys.executable, "-m", "linerec.daemon.cli", "simulate",
                             "--scenario", str(DEMO), "--config", str(realtime_config(tmp_path))],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "refused" not in result.stderr
    assert '"event": "recording_stopped"' in result.stdout


def test_without_the_rights_real_time_settings_are_warnings(tmp_path: Path) -> None:
    """As the service user without LimitRTPRIO/LimitMEMLOCK: warnings, and it records."""
    setpriv, prlimit = shutil.which("setpriv"), shutil.which("prlimit")
    assert setpriv and prlimit, "util-linux provides setpriv and prlimit"
    drop = [setpriv, "--bounding-set=-sys_nice,-ipc_lock", "--inh-caps=-sys_nice,-ipc_lock",
            prlimit, "--rtprio=0", "--memlock=65536"] if os.geteuid() == 0 else [
            prlimit, "--rtprio=0", "--memlock=65536"]
    result = subprocess.run([*drop, sys.executable, "-m", "linerec.daemon.cli", "simulate",
                             "--scenario", str(DEMO), "--config", str(realtime_config(tmp_path))],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "mlockall was refused" in result.stderr
    assert "SCHED_FIFO priority 10 was refused" in result.stderr
    assert '"event": "recording_stopped"' in result.stdout


def simulate_under_systemd(tmp_path: Path, scenario: Path, config: Path,
                           notify: NotifySocket, watchdog_s: float) -> subprocess.Popen[str]:
    """`linerec simulate --realtime` as systemd would run the daemon: NOTIFY_SOCKET, and
    WATCHDOG_USEC from WatchdogSec."""
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path),
           "WATCHDOG_USEC": str(int(watchdog_s * 1_000_000))}
    env.pop("JOURNAL_STREAM", None)
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen([sys.executable, "-m", "linerec.daemon.cli", "simulate",
                             "--scenario", str(scenario), "--config", str(config),
                             "--realtime"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_watchdog_is_fed_only_while_the_capture_advances(tmp_path: Path) -> None:
    """READY first (with STATUS), STATUS as the lines change, WATCHDOG=1 at half the
    interval while audio comes in, none while the capture device hangs, STOPPING last."""
    config = sim_config(tmp_path)
    stall_at, stall_s, duration = 4.0, 3.0, 10.0
    scenario = write_scenario(tmp_path, step(1.0, "ring") + step(1.5, "offhook")
                              + step(stall_at, "stall", seconds=stall_s)
                              + step(8.0, "onhook"), duration=duration)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        proc = simulate_under_systemd(tmp_path, scenario, config, notify, watchdog_s=1.0)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        messages = list(notify.messages)
    finally:
        notify.close()
    texts = [text for _, text in messages]
    assert "READY=1" in texts[0] and "STATUS=line1: idle, line2: idle" in texts[0]
    assert "STOPPING=1" in texts[-1]
    assert all("READY=1" not in text for text in texts[1:])
    statuses = [text for text in texts if text.startswith("STATUS=")]
    assert any("line1: disclosing" in text for text in statuses), statuses
    pings = [at for at, text in messages if text == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # The hang is the one long silence; otherwise a ping comes every half interval
    # (0.5 s) plus the loop's tick, loose for a busy machine.
    assert max(gaps) >= stall_s - 0.3, gaps
    assert sorted(gaps)[-2] < 1.5, gaps
    assert len(pings) >= (duration - stall_s) / 0.5 * 0.6, len(pings)
    assert "no progress from capture tap" in stderr
    assert stderr.count("the watchdog is not fed") == 1


def test_sigterm_mid_call_leaves_a_complete_recording(tmp_path: Path,
                                                     caller_speech: Path) -> None:
    """systemctl stop during a recorded call: STOPPING=1, the recording closed whole (no
    .part; opusinfo reads it to the end) with its receipt sealed, well inside
    TimeoutStopSec."""
    config = sim_config(tmp_path)
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(9.0, "audio", file=str(caller_speech)), duration=60.0)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        proc = simulate_under_systemd(tmp_path, scenario, config, notify, watchdog_s=10.0)
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line)["event"] == "recording_started":
                break
        recording_from = time.monotonic()
        time.sleep(3.0)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stdout, stderr = proc.communicate(timeout=30)
        stopped_in = time.monotonic() - signalled
        notify.wait_for("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert proc.returncode == 0, stderr
    assert stopped_in < 10.0
    events = [json.loads(line) for line in stdout.splitlines()]
    ended = next(e for e in events if e["event"] == "call_ended")
    assert ended["reason"] == "shutdown" and ended["recorded"] is True
    storage = tmp_path / "recordings"
    assert not list(storage.rglob("*.part"))
    (recording,) = storage.rglob("*.opus")
    info = subprocess.run(["opusinfo", str(recording)], capture_output=True, text=True,
                          check=False)
    assert info.returncode == 0 and "WARNING" not in info.stdout + info.stderr, info.stdout
    receipt = json.loads(recording.with_suffix(".json").read_text())
    assert receipt["state"] == "closed"
    assert receipt["end_reason"] == "shutdown", receipt
    # What was recorded until the signal is all there (the line ran paced to the clock).
    recorded = signalled - recording_from
    assert receipt["recording"]["duration_s"] >= recorded - 0.5


def read_journal_entry(datagram: bytes) -> dict[str, str]:
    """One entry of journald's native protocol: KEY=value lines, or KEY, a 64-bit
    little-endian length and the value for values with a newline."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = after
        else:
            size = int.from_bytes(after[:8], "little")
            fields[line.decode()] = after[8:8 + size].decode()
            rest = after[8 + size + 1:]
    return fields


def test_journal_entries_carry_line_call_id_and_message_ids(tmp_path: Path,
                                                           caller_speech: Path) -> None:
    """Under systemd, records go to journald with LINE, CALL_ID and, for the key events,
    MESSAGE_ID. The daemon runs in its own mount namespace where /run/systemd/journal is
    a folder whose socket this test reads: the real libsystemd client, a stand-in
    journald."""
    from linerec.daemon.events import MESSAGE_IDS, EventKind

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root for a private mount namespace")
    run_systemd = tmp_path / "run-systemd"
    (run_systemd / "journal").mkdir(parents=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(run_systemd / "journal" / "socket"))
    journal.settimeout(0.2)
    config = sim_config(tmp_path, line_extra="answer_timeout_s = 5.0\n",
                        extra="[storage_guard]\nlow_mb = 10000000\nfloor_mb = 0\n")
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(1.0, "offhook", line="line2")
                              + step(9.0, "onhook", line="line2")
                              + step(12.0, "audio", file=str(caller_speech))
                              + step(22.0, "onhook"), duration=24.0)
    env = {**os.environ, "JOURNAL_STREAM": "8:1"}
    command = [sys.executable, "-m", "linerec.daemon.cli", "simulate", "--scenario",
               str(scenario), "--config", str(config)]
    datagrams: list[bytes] = []
    done = threading.Event()

    def read() -> None:  # as journald does, or the daemon's sends would block
        while not done.is_set():
            try:
                datagrams.append(journal.recv(1 << 20))
            except TimeoutError:
                continue

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        result = subprocess.run(
            ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /run/systemd && exec "$@"',
             str(run_systemd), *command], env=env, capture_output=True, text=True,
            timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        time.sleep(0.5)
    finally:
        done.set()
        reader.join()
        journal.close()
    entries = [read_journal_entry(datagram) for datagram in datagrams]
    assert entries and all(e["SYSLOG_IDENTIFIER"] == "linerec" for e in entries)

    def with_id(kind: EventKind) -> list[dict[str, str]]:
        return [e for e in entries if e.get("MESSAGE_ID") == MESSAGE_IDS[kind]]

    started = with_id(EventKind.CALL_STARTED)
    assert [e["LINE"] for e in started] == ["line2", "line1"]
    assert all(e["MESSAGE"].startswith("call_started") for e in started)
    call_id = started[1]["CALL_ID"]
    (stopped,) = with_id(EventKind.RECORDING_STOPPED)
    assert (stopped["LINE"], stopped["CALL_ID"]) == ("line1", call_id)
    (failed,) = with_id(EventKind.DISCLOSURE_FAILED)
    assert failed["LINE"] == "line2" and failed["PRIORITY"] == "4"
    (low,) = with_id(EventKind.STORAGE_LOW)
    assert "LINE" not in low and "CALL_ID" not in low and low["PRIORITY"] == "4"
    # Every record of line1's call carries its line and call id.
    of_call = [e for e in entries if f"call={call_id}" in e["MESSAGE"]]
    assert len(of_call) >= 5 and all(e.get("CALL_ID") == call_id for e in of_call)


def test_the_message_ids_in_the_docs_are_the_daemons() -> None:
    from linerec.daemon.events import MESSAGE_IDS

    rows = re.findall(r"^\| `([a-z_]+)` \| `([0-9a-f]{32})` \|$",
                      (REPO / "docs" / "EVENTS.md").read_text(), re.MULTILINE)
    assert dict(rows) == {str(kind): message_id for kind, message_id in MESSAGE_IDS.items()}
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)


def test_watchdog_is_fed_while_a_lost_device_is_being_reopened(tmp_path: Path) -> None:
    """An unplugged capture device is the capture thread's to bring back: while it keeps
    trying, systemd is still told WATCHDOG=1 (a restart would bring the device back no
    sooner, and would cut off lines on healthy devices)."""
    config = sim_config(tmp_path)
    gone_s, watchdog_s = 4.0, 4.0
    scenario = write_scenario(tmp_path, step(2.0, "unplug", seconds=gone_s), duration=10.0)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        proc = simulate_under_systemd(tmp_path, scenario, config, notify, watchdog_s=watchdog_s)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        pings = [at for at, text in notify.messages if text == "WATCHDOG=1"]
    finally:
        notify.close()
    errors = [json.loads(line) for line in stdout.splitlines()
              if json.loads(line)["event"] == "error"]
    assert errors and "unplugged" in errors[0]["message"]
    assert "capture device tap is back" in stderr
    # A ping every half interval (2 s) throughout, the reopens (0.1 s doubling to 1.6 s
    # apart here; at most 5 s apart, under half the unit's WatchdogSec=20s) included.
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(gaps) >= 3 and max(gaps) < watchdog_s * 0.75, gaps
    assert "the watchdog is not fed" not in stderr
