"""The soak keeps working: a short version of `make soak` (calls unpaced over four lines,
then a minute paced on two), each call checked, resources flat."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", REPO / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_short_soak_checks_every_call_and_finds_no_growth(tmp_path: Path) -> None:
    out, report = tmp_path / "soak.json", tmp_path / "RELIABILITY.md"
    # Both parts at once, to stay near two minutes: the paced one sets the time.
    result = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--calls", "60",
                             "--paced-s", "90", "--parallel", "--out", str(out),
                             "--report", str(report)],
                            capture_output=True, text=True, timeout=600, check=False)
    results = json.loads(out.read_text())
    failures = results["unpaced"]["failures"] + results["paced"]["failures"]
    assert failures == [], failures
    assert result.returncode == 0, result.stderr[-2000:]
    unpaced, paced = results["unpaced"], results["paced"]
    assert unpaced["answered_calls"] == unpaced["calls_clean"] == unpaced["receipts"] \
        == unpaced["recordings"] == 60
    assert unpaced["missed_calls"] >= 1
    assert unpaced["inbound"] and unpaced["outbound"]
    assert unpaced["speed_up"] > 1.5  # faster than real time
    assert paced["answered_calls"] == paced["calls_clean"] >= 2
    assert paced["wall_s"] >= paced["audio_s"]  # paced to the clock
    for part in (unpaced, paced):
        assert part["verify_ok"] and part["part_files"] == 0
        assert part["overruns"] == part["capture_gaps"] == part["lost_samples"] == 0
        usage = part["resources"]
        assert usage["rss_growth_mb"] <= 5.0
        assert usage["fds_idle_last"] == usage["fds_idle_first"]
        assert usage["threads_idle_last"] == usage["threads_idle_first"]
    assert paced["pace"]["watchdog_gap_s_max"] <= 20.0
    text = report.read_text()
    assert text.startswith("# Reliability")
    assert "## Load and soak" in text and "scaled run" in text


def test_the_report_replaces_only_its_own_section(tmp_path: Path) -> None:
    soak = soak_module()
    document = tmp_path / "RELIABILITY.md"
    document.write_text("# Reliability\n\n## Faults\n\nfaults text\n\n## Load and soak\n\nold\n"
                        "\n## Security\n\nsecurity text\n")
    soak.write_section(document, "## Load and soak\n\nnew figures\n")
    assert document.read_text() == ("# Reliability\n\n## Faults\n\nfaults text\n\n"
                                    "## Load and soak\n\nnew figures\n\n## Security\n\n"
                                    "security text\n")
    missing = tmp_path / "new.md"
    soak.write_section(missing, "## Load and soak\n\nfigures\n")
    assert missing.read_text() == f"{soak.TITLE}\n\n## Load and soak\n\nfigures\n"
