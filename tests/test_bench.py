"""The benchmarks keep working: a small, fast run of each (the figures come from
`make bench`, not from here: this machine is shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_benchmarks_run_and_report_every_figure(tmp_path: Path) -> None:
    out, report = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out",
                    str(out), "--report", str(report)], check=True, capture_output=True,
                   timeout=600)
    results = json.loads(out.read_text())
    assert results["quick"] is True
    cost = results["encoding_cost"]["cpu_s_per_audio_hour"]
    assert set(cost) == {"linerec", "linerec_no_fsync", "libopus", "opusenc"}
    assert all(v > 0 for v in cost.values())
    assert results["capacity"]["lines"] >= 8 and results["capacity"]["lines_per_core"] > 0
    assert results["memory"]["lines_recording"] == 8
    assert results["memory"]["peak_rss_mb"] > 0
    assert len(results["kill_loss"]["loss_s"]) == 1
    assert {"opus_12k", "g711_alaw"} <= set(results["quality"]["pesq_nb"])
    detection = results["detection"]["cpu_s_per_audio_hour"]
    assert all(detection[k] > 0 for k in ("idle_silent", "call_progress", "busy_watch",
                                          "echo_check", "libopus"))
    text = report.read_text()
    for figure in ("bare libopus", "opusenc", "lines per core", "Peak RSS", "kill -9", "PESQ",
                   "Line signal detection"):
        assert figure in text
