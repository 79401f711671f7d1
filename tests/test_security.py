"""What a curious person with the SD card or the log finds: files only the service user can
read, and no secret of the config anywhere but the config itself."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from simhelpers import free_port, sim_config, step, write_scenario

from linerec.daemon.config import load_config
from linerec.daemon.telemetry import config_payload

PASSWORD = "Tr0ub4dor&3-linerec-secret"  # noqa: S105 - a test's made-up secret


def call_with_a_broker_that_is_not_there(tmp_path: Path, caller_speech: Path,
                                        onhook: float) -> tuple[Path, Path]:
    """A recorded call, on-hook at ``onhook`` s; the broker is away, so every event waits in
    the outbox on disk. Its config and scenario."""
    config = sim_config(tmp_path, broker=("127.0.0.1", free_port()))
    config.write_text(config.read_text() + f'username = "office"\npassword = "{PASSWORD}"\n')
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(9.0, "audio", file=str(caller_speech))
                              + step(onhook, "onhook"), duration=onhook + 2.0)
    return config, scenario


def test_recordings_receipts_audit_log_and_outbox_are_the_service_users_alone(
        tmp_path: Path, caller_speech: Path) -> None:
    config, scenario = call_with_a_broker_that_is_not_there(tmp_path, caller_speech, 20.0)
    old = os.umask(0o022)  # as a login shell has it: linerec must not rely on it
    try:
        result = subprocess.run([sys.executable, "-m", "linerec.daemon.cli", "simulate",
                                 "--scenario", str(scenario), "--config", str(config)],
                                capture_output=True, text=True, timeout=120, check=False)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    storage = tmp_path / "recordings"
    found = {path.relative_to(storage).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in storage.rglob("*")}
    names = " ".join(found)
    for kind in (".opus", ".json", "audit.jsonl", "mqtt-outbox.jsonl"):
        assert kind in names, names
    loose = {name: f"{mode:04o}" for name, mode in found.items() if mode & 0o077}
    assert loose == {}, "readable by others than the service user"
    assert stat.S_IMODE(storage.stat().st_mode) & 0o077 == 0


def test_no_secret_in_logs_receipts_outbox_config_topic_or_stack_dumps(
        tmp_path: Path, caller_speech: Path) -> None:
    config, scenario = call_with_a_broker_that_is_not_there(tmp_path, caller_speech, 14.0)
    proc = subprocess.Popen([sys.executable, "-m", "linerec.daemon.cli", "--verbose",
                             "simulate", "--scenario", str(scenario), "--config", str(config),
                             "--realtime", "--workdir", str(tmp_path / "work")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6.0)
    proc.send_signal(signal.SIGUSR1)  # every thread's stack, as `systemctl kill -s USR1`
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "(most recent call first)" in stderr  # the dump happened
    places = {"stdout": stdout, "stderr (log, debug level)": stderr,
              "config topic": json.dumps(config_payload(load_config(config)))}
    for path in [*(tmp_path / "recordings").rglob("*"), *(tmp_path / "work").rglob("*")]:
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("latin-1")
    assert len([p for p in places if p.endswith(".json")]) >= 1
    outbox = next(text for p, text in places.items() if p.endswith("mqtt-outbox.jsonl"))
    assert 'recording_stopped' in outbox  # the events waited there
    leaked = [where for where, text in places.items() if PASSWORD in text]
    assert leaked == []
    assert PASSWORD in config.read_text()  # the one place it belongs
