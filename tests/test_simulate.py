"""End to end through `linerec simulate`: real alsa-lib (file plugin), gpiozero MockFactory,
real libopus, a real mosquitto broker, and opus-tools to judge the file."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from simhelpers import (
    ISO_MS,
    RATE,
    RECORDED_CALL,
    TOLERANCE,
    Subscriber,
    decode,
    free_port,
    linerec,
    read_wav,
    receipts,
    recordings,
    run_sim,
    sim_config,
    speak,
    step,
    without_ringing,
    write_scenario,
)

from linerec.audio.pcm import load_line_audio
from linerec.daemon.config import packaged_disclosure


def test_inbound_call_is_recorded_after_the_disclosure(
    tmp_path: Path, mosquitto: tuple[str, int], caller_speech: Path
) -> None:
    speech_at, onhook_at = 13.5, 22.0
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(5.5, "offhook")
                              + step(speech_at, "audio", file=str(caller_speech))
                              + step(onhook_at, "onhook"))
    subscriber = Subscriber(*mosquitto)
    try:
        events = run_sim(tmp_path, scenario, sim_config(tmp_path, mosquitto))
        deadline = threading.Event()
        for _ in range(50):
            if len(subscriber.messages) >= len(RECORDED_CALL) + 1:
                break
            deadline.wait(0.1)
    finally:
        subscriber.close()

    # Events: in order, one call, complete schema.
    assert [e["event"] for e in events] == RECORDED_CALL
    assert {e["line"] for e in events} == {"line1"}
    assert len({e["call_id"] for e in events}) == 1
    assert all(ISO_MS.match(e["ts"]) for e in events)
    assert events[0]["direction"] == "inbound"
    # The same events reached the broker, in the same order, on the line's topic.
    # The line rang first: the ringing event, then the call's.
    assert [topic for topic, _ in subscriber.messages] == ["linerec/office/line/line1/event"] * 7
    # Each with the device's sequence number, which consumers use to drop duplicates.
    assert [m.pop("seq") for _, m in subscriber.messages] == list(range(1, 8))
    assert subscriber.messages[0][1]["event"] == "ringing"
    assert [m for _, m in subscriber.messages[1:]] == events

    stopped = events[4]
    opus = Path(stopped["file"])
    assert opus.suffix == ".opus" and opus.parent.parts[-3:] == (
        events[0]["ts"][:4], events[0]["ts"][5:7], events[0]["ts"][8:10])
    assert not list(opus.parent.glob("*.part"))
    assert stopped["bytes"] == opus.stat().st_size

    # opusinfo accepts the file without a warning.
    info = subprocess.run(["opusinfo", str(opus)], capture_output=True, text=True, check=False)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "WARNING" not in info.stdout and "ERROR" not in info.stdout, info.stdout

    # Where the disclosure ended on the line, found from the line audio itself: before the
    # caller speaks, the line carries only the disclosure the daemon played into it.
    line_audio = read_wav(tmp_path / "work" / "line1.line.wav")
    before_speech = line_audio[: round(speech_at * RATE)]
    disclosure = load_line_audio(packaged_disclosure("en"), RATE).astype(np.float64)
    silent_tail = len(disclosure) - 1 - int(np.flatnonzero(disclosure)[-1])
    disclosure_end_on_line = int(np.flatnonzero(before_speech)[-1]) + 1 + silent_tail
    onhook = round(onhook_at * RATE)

    decoded = decode(opus, tmp_path)
    assert abs(len(decoded) - (onhook - disclosure_end_on_line)) <= TOLERANCE

    # Not one sample of the disclosure is in the recording, and the recording is the speech
    # that followed it.
    expected = line_audio[disclosure_end_on_line : disclosure_end_on_line + len(decoded)]
    gap = round(speech_at * RATE) - disclosure_end_on_line
    assert gap > 0.2 * RATE
    assert np.sqrt(np.mean(decoded[: gap - 80] ** 2)) < 30, "audio before the speech leaked in"
    correlation = float(np.dot(decoded, expected)
                        / np.sqrt(np.dot(decoded, decoded) * np.dot(expected, expected)))
    assert correlation > 0.8, correlation

    # What the daemon played into the line is exactly the disclosure.
    played = read_wav(tmp_path / "work" / "line1.played.wav")
    start = events[1]["sample"]
    assert not played[:start].any()
    np.testing.assert_array_equal(played[start : start + len(disclosure)], disclosure)
    assert not played[start + len(disclosure) :].any()
    assert not read_wav(tmp_path / "work" / "line2.played.wav").any()

    receipt = json.loads(opus.with_suffix(".json").read_text())
    assert receipt["call_id"] == events[0]["call_id"]
    assert receipt["disclosure"]["status"] == "completed"
    assert receipt["recording"]["file"] == opus.name
    assert receipt["recording"]["first_sample"] == events[2]["sample"] >= disclosure_end_on_line


def test_onhook_during_disclosure_records_nothing(tmp_path: Path, caller_speech: Path) -> None:
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(5.5, "offhook")
                              + step(6.5, "audio", file=str(caller_speech))
                              + step(8.0, "onhook"), duration=12.0)
    events = run_sim(tmp_path, scenario, sim_config(tmp_path))
    assert [e["event"] for e in events] == [
        "call_started", "disclosure_started", "disclosure_failed", "call_ended"]
    assert "loop opened" in events[2]["reason"]
    assert events[3]["recorded"] is False
    assert recordings(tmp_path) == []
    (receipt,) = receipts(tmp_path)
    assert receipt["disclosure"]["status"] == "failed"
    assert receipt["recording"] is None


def test_outbound_call_hung_up_before_an_answer_is_not_recorded(tmp_path: Path,
                                                                 caller_speech: Path) -> None:
    """Off-hook without ringing: the far end has not answered (no ringback was heard, so
    the speech is not taken as an answer), so no notice can reach it."""
    scenario = write_scenario(tmp_path, step(1.0, "offhook")
                              + step(4.0, "audio", file=str(caller_speech))
                              + step(10.0, "onhook"), duration=12.0)
    events = run_sim(tmp_path, scenario, sim_config(tmp_path))
    assert [e["event"] for e in events] == ["call_started", "disclosure_failed", "call_ended"]
    assert events[0]["direction"] == "outbound"
    assert "before the far end answered" in events[1]["reason"]
    assert recordings(tmp_path) == []
    assert not read_wav(tmp_path / "work" / "line1.played.wav").any()


def test_hook_flash_does_not_end_the_call(tmp_path: Path, caller_speech: Path) -> None:
    """A hook-flash does not end the call; it ends its recording where the loop opened
    (another party who has not heard the notice may come on the line)."""
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(10.0, "audio", file=str(caller_speech))
                              + step(12.0, "onhook") + step(12.3, "offhook")
                              + step(20.0, "onhook"))
    events = run_sim(tmp_path, scenario, sim_config(tmp_path))
    assert [e["event"] for e in events] == RECORDED_CALL
    assert events[-1]["sample"] == 20 * RATE
    assert events[4]["reason"] == "hook_flash" and events[4]["sample"] == 12 * RATE
    decoded = decode(Path(events[4]["file"]), tmp_path)
    assert abs(len(decoded) - (12 * RATE - events[2]["sample"])) <= TOLERANCE


def test_demo_prints_events_and_a_playable_recording(tmp_path: Path) -> None:
    result = linerec("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for kind in [*RECORDED_CALL, "caller_id", "call_answered"]:
        assert kind in result.stdout
    # A call received on line1 and a call made on line2, both recorded.
    assert result.stdout.count("recorded=True") == 2
    paths = [Path(p) for p in re.findall(r"^Recording: (.+\.opus)$", result.stdout, re.M)]
    assert len(paths) == 2
    for path in paths:
        assert path.is_file() and path.is_relative_to(tmp_path / "linerec-sim")
        assert subprocess.run(["opusinfo", str(path)], capture_output=True,
                              check=False).returncode == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[step]]\nat = 1.0\nline = "line9"\ndo = "offhook"\n', "step[0].line"),
        ('[[step]]\nat = 1.0\nline = "line1"\ndo = "jump"\n', "step[0].do"),
        ('[[step]]\nat = 99.0\nline = "line1"\ndo = "offhook"\n', "step[0].at"),
        ('[[step]]\nat = 1.0\nline = "line1"\ndo = "audio"\n', "step[0].file"),
        ('[[step]]\nat = 1.0\nline = "line1"\ndo = "audio"\nfile = "nope.wav"\n', "step[0].file"),
        ('[[step]]\nat = 1.0\nline = "line1"\ndo = "offhook"\ncolour = 1\n', "step[0].colour"),
        ('[[step]]\nat = 1.0\nline = "line1"\ndo = "ring"\nuntil = 0.5\n', "step[0].until"),
        ("speed = 2\n", "speed"),
    ],
)
def test_bad_scenario_is_refused_with_the_key(tmp_path: Path, body: str, message: str) -> None:
    scenario = write_scenario(tmp_path, body, duration=10.0)
    result = linerec("simulate", "--scenario", str(scenario), "--storage", str(tmp_path / "r"))
    assert result.returncode == 2
    assert str(scenario) in result.stderr and message in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_bad_scenario_audio_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "noise.wav").write_bytes(b"RIFF0000WAVEjunk")
    scenario = write_scenario(tmp_path, step(1.0, "audio", file="noise.wav"), duration=5.0)
    result = linerec("simulate", "--scenario", str(scenario), "--storage", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "noise.wav" in result.stderr and "step[0].file" in result.stderr, result.stderr


def test_bad_signal_steps_are_named(tmp_path: Path) -> None:
    for body, key, words in (
            (step(1.0, "dtmf", digits="02x"), "step[0].digits", "digits"),
            (step(1.0, "tone", kind="beep"), "step[0].kind", "'beep' is not one of"),
            (step(1.0, "callerid", number="+31201234567"), "step[0].number", "no +"),
            (step(1.0, "pulse", digits="*1"), "step[0].digits", "0123456789"),
            (step(1.0, "callerid", format="fsk", number="020", name="Łukasz"), "step[0].name",
             "Latin-1"),
            (step(1.0, "callerid", format="fsk", number="020", name=""), "step[0].name",
             "Latin-1")):
        scenario = write_scenario(tmp_path, body, duration=5.0)
        result = linerec("simulate", "--scenario", str(scenario))
        assert result.returncode == 2, result.stderr
        assert key in result.stderr and words in result.stderr, result.stderr


def test_a_call_in_progress_is_closed_cleanly_at_shutdown(tmp_path: Path,
                                                          caller_speech: Path) -> None:
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(10.0, "audio", file=str(caller_speech)), duration=16.0)
    events = run_sim(tmp_path, scenario, sim_config(tmp_path))
    assert [e["event"] for e in events] == RECORDED_CALL
    assert events[-1]["reason"] == "shutdown"
    decoded = decode(Path(events[4]["file"]), tmp_path)
    assert len(decoded) == 16 * RATE - events[2]["sample"]
    (receipt,) = receipts(tmp_path)
    assert receipt["end_reason"] == "shutdown" and receipt["recording"]["bytes"] > 0


def test_records_while_the_broker_is_unreachable(tmp_path: Path, caller_speech: Path) -> None:
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(10.0, "audio", file=str(caller_speech))
                              + step(14.0, "onhook"), duration=15.0)
    events = run_sim(tmp_path, scenario, sim_config(tmp_path, ("127.0.0.1", free_port())))
    assert [e["event"] for e in events] == RECORDED_CALL
    assert len(recordings(tmp_path)) == 1


def test_realtime_paces_the_line_to_the_clock(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, step(0.2, "ring"), duration=2.0)
    started = time.monotonic()
    result = linerec("simulate", "--scenario", str(scenario), "--realtime",
                     "--storage", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    # Only a lower bound: a paced simulation cannot finish before its audio has played.
    assert time.monotonic() - started >= 2.0


@pytest.mark.parametrize("law", ["A_LAW", "MU_LAW"])
def test_an_isdn_line_in_g711_is_recorded(tmp_path: Path, caller_speech: Path,
                                          law: str) -> None:
    config = sim_config(tmp_path)
    config.write_text(config.read_text().replace(
        'device = "hw:CARD=tapHAT"\nchannels = 2',
        f'device = "hw:CARD=tapHAT"\nchannels = 2\nformat = "{law}"'))
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(10.0, "audio", file=str(caller_speech))
                              + step(18.0, "onhook"), duration=19.0)
    events = run_sim(tmp_path, scenario, config)
    assert [e["event"] for e in events] == RECORDED_CALL
    decoded = decode(Path(events[4]["file"]), tmp_path)
    line_audio = read_wav(tmp_path / "work" / "line1.line.wav")
    first = events[2]["sample"]
    expected = line_audio[first : first + len(decoded)]
    correlation = np.dot(decoded, expected) / np.sqrt(np.dot(decoded, decoded)
                                                      * np.dot(expected, expected))
    assert correlation > 0.8, correlation


def test_overlapping_calls_each_hold_only_their_own_line(tmp_path: Path) -> None:
    first = speak("Line one speaking. We would like to order two hundred boxes of paper "
                  "for the office in Utrecht.", tmp_path / "one.wav")
    second = speak("Dit is lijn twee. Ik bel over de factuur van vorige maand, die is "
                   "nog niet betaald.", tmp_path / "two.wav", voice="nl")
    scenario = write_scenario(
        tmp_path,
        step(0.5, "ring") + step(1.0, "offhook") + step(10.0, "audio", file=str(first))
        + step(2.0, "ring", line="line2") + step(3.0, "offhook", line="line2")
        + step(11.0, "audio", line="line2", file=str(second))
        + step(19.0, "onhook") + step(20.0, "onhook", line="line2"), duration=21.0)
    events = run_sim(tmp_path, scenario, sim_config(tmp_path))
    audio = {}
    for line in ("line1", "line2"):
        mine = [e for e in events if e["line"] == line]
        assert [e["event"] for e in mine] == RECORDED_CALL
        decoded = decode(Path(mine[4]["file"]), tmp_path)
        audio[line] = (mine[2]["sample"], decoded)

    def correlation(recording: str, source: str) -> float:
        start, decoded = audio[recording]
        line_audio = read_wav(tmp_path / "work" / f"{source}.line.wav")
        expected = line_audio[start : start + len(decoded)]
        return float(np.dot(decoded, expected)
                     / np.sqrt(np.dot(decoded, decoded) * np.dot(expected, expected) + 1e-9))

    assert correlation("line1", "line1") > 0.8 and correlation("line2", "line2") > 0.8
    assert abs(correlation("line1", "line2")) < 0.1 and abs(correlation("line2", "line1")) < 0.1


def test_an_overrun_is_counted_and_does_not_shift_the_audio_after_it(
        tmp_path: Path, caller_speech: Path) -> None:
    overrun_at, lost = 12.0, 800
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(10.0, "audio", file=str(caller_speech))
                              + step(overrun_at, "overrun", frames=lost)
                              + step(19.0, "onhook"), duration=20.0)
    result = linerec("simulate", "--scenario", str(scenario), "--config",
                     str(sim_config(tmp_path)), "--workdir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    assert f"overrun on capture tap at sample {round(overrun_at * RATE)}" in result.stderr
    events = without_ringing([json.loads(line) for line in result.stdout.splitlines()])
    assert [e["event"] for e in events] == RECORDED_CALL
    first = events[2]["sample"]
    decoded = decode(Path(events[4]["file"]), tmp_path)
    assert len(decoded) == 19 * RATE - first

    (receipt,) = receipts(tmp_path)
    gap = round(overrun_at * RATE)
    assert receipt["recording"]["capture_gaps"] == [
        {"sample": gap, "lost_samples": lost, "cause": "overrun"}]

    line_audio = read_wav(tmp_path / "work" / "line1.line.wav")
    assert not line_audio[gap : gap + lost].any()  # the line lost these frames
    # Silence where the audio was lost (the codec rings a few ms into it)...
    assert np.sqrt(np.mean(decoded[gap - first + 80 : gap - first + lost] ** 2)) < 100
    # ...and what follows is exactly where it was on the line: no shift.
    after = decoded[gap - first + lost :]
    expected = line_audio[gap + lost : gap + lost + len(after)]
    shifts = range(-40, 41)
    scores = [float(np.dot(after[40:-40], expected[40 + s : len(expected) - 40 + s]))
              for s in shifts]
    assert shifts[int(np.argmax(scores))] == 0


def test_a_capture_device_that_goes_away_is_reopened_and_the_recording_ends_there(
        tmp_path: Path, caller_speech: Path) -> None:
    """While the device is gone nobody watches the hook: the caller may have hung up and a
    new call been answered. So the recording ends where the device was lost, the call goes
    on unrecorded, and the device is reopened for the calls that follow."""
    gone_at, gone_for = 12.0, 1.5
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(10.0, "audio", file=str(caller_speech))
                              + step(gone_at, "unplug", seconds=gone_for)
                              + step(19.0, "onhook") + step(20.0, "ring")
                              + step(21.0, "offhook") + step(34.0, "onhook"), duration=35.0)
    result = linerec("simulate", "--scenario", str(scenario), "--config",
                     str(sim_config(tmp_path)), "--workdir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    assert "capture device tap failed" in result.stderr and "tap is back" in result.stderr
    events = without_ringing([json.loads(line) for line in result.stdout.splitlines()])
    (device_error,) = [e for e in events if e["event"] == "error" and e["line"] is None]
    assert "unplugged" in device_error["message"]
    line1 = [e for e in events if e["line"] == "line1"]
    assert [e["event"] for e in line1] == [
        "call_started", "disclosure_started", "disclosure_completed", "recording_started",
        "recording_stopped", "error", "call_ended", *RECORDED_CALL]
    gap, lost = round(gone_at * RATE), round(gone_for * RATE)
    first = line1[2]["sample"]
    assert line1[4]["sample"] == gap
    decoded = decode(Path(line1[4]["file"]), tmp_path)
    assert len(decoded) == gap - first
    assert line1[6]["reason"] == "onhook" and line1[6]["recorded"] is True

    first_call = next(r for r in receipts(tmp_path) if r["call_id"] == line1[0]["call_id"])
    assert first_call["recording"]["capture_gaps"] == [
        {"sample": gap, "lost_samples": lost, "cause": "device"}]
    # The next call records again, on the reopened device.
    second = decode(Path(line1[11]["file"]), tmp_path)
    assert len(second) == 34 * RATE - line1[9]["sample"]


def test_two_lines_disclose_at_once_through_one_output(tmp_path: Path) -> None:
    """Both lines of the two-channel line output answer together: the playback thread mixes
    each disclosure into its own channel, and neither waits for the other."""
    scenario = write_scenario(
        tmp_path, step(0.5, "ring") + step(0.5, "ring", line="line2") + step(1.0, "offhook")
        + step(1.0, "offhook", line="line2") + step(12.0, "onhook")
        + step(12.0, "onhook", line="line2"), duration=13.0)
    events = run_sim(tmp_path, scenario, sim_config(tmp_path))
    disclosure = load_line_audio(packaged_disclosure("en"), RATE).astype(np.float64)
    completed = []
    for line in ("line1", "line2"):
        mine = [e for e in events if e["line"] == line]
        assert [e["event"] for e in mine] == RECORDED_CALL
        start = mine[1]["sample"]
        played = read_wav(tmp_path / "work" / f"{line}.played.wav")
        np.testing.assert_array_equal(played[start : start + len(disclosure)], disclosure)
        assert not played[:start].any() and not played[start + len(disclosure) :].any()
        completed.append(mine[2]["sample"])
    assert completed[0] == completed[1]


def test_a_capture_device_lost_during_the_disclosure_fails_it(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path, step(0.5, "ring") + step(1.0, "offhook")
                              + step(4.0, "unplug", seconds=1.0) + step(14.0, "onhook"),
                              duration=15.0)
    events = run_sim(tmp_path, scenario, sim_config(tmp_path))
    line1 = [e for e in events if e["line"] == "line1"]
    assert [e["event"] for e in line1] == [
        "call_started", "disclosure_started", "disclosure_failed", "call_ended"]
    assert "capture was lost" in line1[2]["reason"]
    assert recordings(tmp_path) == []
