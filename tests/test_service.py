"""The daemon as systemd runs it: the unit file, and sd_notify over a real unix socket."""

from __future__ import annotations

import os
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
from simhelpers import sim_config

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
