"""A recorder killed mid-call (SIGKILL, as a power cut or a crash would) loses at most
the page being filled; the next start makes the recording whole and says so."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from simhelpers import (
    RATE,
    decode,
    linerec,
    sim_config,
    step,
    write_scenario,
)

PAGE_INTERVAL_S = 0.8


def test_sigkill_mid_recording_is_recovered_at_the_next_start(tmp_path: Path,
                                                              caller_speech: Path) -> None:
    config = sim_config(tmp_path)
    speech_at = 9.0
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(speech_at, "audio", file=str(caller_speech)),
                              duration=60.0)
    proc = subprocess.Popen([sys.executable, "-m", "linerec.daemon.cli", "simulate",
                             "--scenario", str(scenario), "--config", str(config),
                             "--realtime"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "recording_started":
                break
        armed = time.monotonic()
        time.sleep(4.0)
        proc.kill()
        killed = time.monotonic()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    recorded_s = killed - armed
    storage = tmp_path / "recordings"
    (part,) = storage.rglob("*.opus.part")
    receipt_file = part.with_name(part.name.replace(".opus.part", ".json"))
    assert json.loads(receipt_file.read_text())["state"] == "open"

    # The next start (here a short simulation on the same storage) recovers it.
    restart = write_scenario(tmp_path, "", duration=0.2)
    result = linerec("simulate", "--scenario", str(restart), "--config", str(config))
    assert result.returncode == 0, result.stderr
    (recovered,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert recovered["event"] == "recording_recovered"
    final = Path(recovered["file"])
    assert final == part.with_name(part.name.removesuffix(".part"))
    assert not list(storage.rglob("*.part"))
    info = subprocess.run(["opusinfo", str(final)], capture_output=True, text=True, check=False)
    assert info.returncode == 0 and "WARNING" not in info.stdout, info.stdout

    receipt = json.loads(receipt_file.read_text())
    assert receipt["state"] == "interrupted" and receipt["end_reason"] == "interrupted"
    assert receipt["recording"]["status"] == "interrupted"
    assert receipt["recording"]["file"] == final.name
    assert receipt["disclosure"]["status"] == "completed"

    decoded = decode(final, tmp_path)
    assert abs(len(decoded) / RATE - recovered["duration_s"]) < 0.001
    # Everything up to the last page is there: at most one page interval is lost (plus the
    # time the test took to notice recording_started and to kill).
    assert recorded_s - PAGE_INTERVAL_S - 0.5 <= len(decoded) / RATE <= recorded_s + 0.5
    # And it is the call: silence after the disclosure, then the caller's speech.
    first = receipt["recording"]["first_sample"]
    speech_from = round(speech_at * RATE) - first
    assert np.sqrt(np.mean(decoded[: speech_from - 80] ** 2)) < 30
    assert np.sqrt(np.mean(decoded[speech_from:] ** 2)) > 300

    # A second start finds nothing more to do.
    again = linerec("simulate", "--scenario", str(restart), "--config", str(config))
    assert again.returncode == 0 and again.stdout == ""
