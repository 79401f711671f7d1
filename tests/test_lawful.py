"""Lawful recording end to end on the simulated HAT: direction, caller id and dialled
numbers, answer detection, number rules, busy tone, and the receipt that shows it all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from simhelpers import (
    RATE,
    RECORDED_CALL,
    TOLERANCE,
    decode,
    read_wav,
    receipts,
    recordings,
    run_sim,
    sim_config,
    speak,
    step,
    write_scenario,
)

from linerec.audio.ogg import parse_opus_tags, read_pages


@pytest.fixture(scope="module")
def far_end(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The far end answering an outbound call, then talking."""
    return speak("Hello, you are speaking with the garage. How can I help you today? "
                 "Your car will be ready on Friday afternoon.",
                 tmp_path_factory.mktemp("farend") / "answer.wav")


def kinds(events: list[dict[str, Any]], line: str = "line1") -> list[str]:
    return [e["event"] for e in events if e["line"] == line]


def only(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in events if e["event"] == kind]
    assert len(found) == 1, (kind, [e["event"] for e in events])
    return found[0]


def tags_of(opus: Path) -> dict[str, str]:
    return parse_opus_tags(read_pages(opus.read_bytes())[1].packets[0])


def test_inbound_with_dtmf_clip_records_the_callers_number(tmp_path: Path,
                                                          caller_speech: Path) -> None:
    # Dutch DTMF CLIP comes before the first ring.
    body = (step(0.3, "callerid", number="0201234567") + step(1.5, "ring")
            + step(6.5, "offhook") + step(15.0, "audio", file=str(caller_speech))
            + step(22.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 24.0), sim_config(tmp_path))
    assert kinds(events) == ["caller_id", *RECORDED_CALL]
    assert only(events, "caller_id")["number"] == "0201234567"
    assert only(events, "call_started")["direction"] == "inbound"
    [receipt] = receipts(tmp_path)
    assert receipt["number"] == {"value": "0201234567", "source": "clip_dtmf", "name": None,
                                 "unknown_reason": None}
    assert receipt["disclosure"]["verification"]["score"] > 0.9
    [opus] = recordings(tmp_path)
    assert tags_of(opus)["CALLER"] == "0201234567"


def test_ringing_is_an_event_and_a_missed_call_says_so(tmp_path: Path) -> None:
    body = (step(0.5, "ring", until=7.0) + step(14.0, "ring") + step(19.5, "offhook")
            + step(30.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 32.0), sim_config(tmp_path),
                     ringing=True)
    assert kinds(events) == ["ringing", "ringing_stopped", "ringing", *RECORDED_CALL]
    first, stopped = events[0], events[1]
    assert first["sample"] == pytest.approx(0.5 * RATE, abs=160) and first["call_id"] is None
    # Missed: no ring came within ring_window_s (6 s) after the last burst ended (6.5 s).
    assert stopped["sample"] == pytest.approx(12.5 * RATE, abs=160)


def test_inbound_with_fsk_caller_id_between_the_first_rings(tmp_path: Path) -> None:
    # ETSI FSK after the first ring (1 s on), before the second (at 5.5 s).
    body = (step(0.5, "ring") + step(2.2, "callerid", format="fsk", number="+31201234567",
                                     name="Garage Jansen")
            + step(6.0, "offhook") + step(18.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 20.0), sim_config(tmp_path))
    assert kinds(events) == ["caller_id", *RECORDED_CALL]
    [receipt] = receipts(tmp_path)
    assert receipt["number"]["value"] == "+31201234567"
    assert receipt["number"]["source"] == "clip_fsk"
    assert receipt["number"]["name"] == "Garage Jansen"


def test_withheld_number_is_recorded_with_the_reason(tmp_path: Path) -> None:
    body = (step(0.3, "callerid", absence="private") + step(1.5, "ring")
            + step(6.5, "offhook") + step(18.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 20.0), sim_config(tmp_path))
    assert kinds(events) == ["caller_id", *RECORDED_CALL]
    [receipt] = receipts(tmp_path)
    assert receipt["number"]["value"] is None
    assert receipt["number"]["unknown_reason"] == "private"


def test_outbound_dtmf_dialling_answered_when_ringback_stops_and_speech_follows(
        tmp_path: Path, far_end: Path) -> None:
    # Calls the office makes have their own disclosure (per line and direction).
    config = sim_config(tmp_path, line_extra='outbound_disclosure = "outgoing"', extra=(
        '\n[[disclosure]]\nname = "outgoing"\npurpose = "service"\n'
        'parts = [{ language = "nl" }]\n'))
    body = (step(0.5, "offhook") + step(0.6, "tone", kind="dial", until=1.4)
            + step(1.5, "dtmf", digits="0201234567")
            + step(4.0, "tone", kind="ringback", until=10.2)
            + step(10.4, "audio", file=str(far_end)) + step(30.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 32.0), config)
    assert kinds(events) == ["call_started", "call_answered", *RECORDED_CALL[1:]]
    assert only(events, "disclosure_started")["disclosure"] == "outgoing"
    answered = only(events, "call_answered")
    assert answered["answered_by"] == "ringback_then_speech"
    # Speech began at 10.4 s; detection needs about 200 ms of it.
    assert 10.4 * RATE <= answered["sample"] <= 10.9 * RATE
    started = only(events, "disclosure_started")
    assert started["sample"] == answered["sample"]
    [receipt] = receipts(tmp_path)
    assert receipt["direction"] == "outbound"
    assert receipt["number"]["value"] == "0201234567"
    assert receipt["number"]["source"] == "dialled_dtmf"
    assert receipt["disclosure"]["id"] == "outgoing"
    assert receipt["disclosure"]["languages"] == ["nl"]
    # Nothing before the far end answered and heard the notice is in the recording.
    [opus] = recordings(tmp_path)
    recorded = decode(opus, tmp_path)
    first = only(events, "recording_started")["sample"]
    assert abs(len(recorded) - (30.0 * RATE - first)) <= TOLERANCE
    assert tags_of(opus)["DIALLED"] == "0201234567"


def test_outbound_pulse_dialling_answered_by_polarity_reversal(tmp_path: Path,
                                                               far_end: Path) -> None:
    # line2 of this config has a polarity input: the answer is the reversal, not speech.
    config = sim_config(tmp_path, line_extra="")
    text = config.read_text().replace('led_pin = 25\n', 'led_pin = 25\npolarity_pin = 5\n')
    config.write_text(text)
    body = (step(0.5, "offhook", line="line2") + step(1.0, "pulse", line="line2",
                                                       digits="0612")
            + step(5.5, "tone", line="line2", kind="ringback", until=12.0)
            + step(12.0, "answer", line="line2")
            + step(12.5, "audio", line="line2", file=str(far_end))
            + step(30.0, "onhook", line="line2"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 32.0), config)
    assert kinds(events, "line2") == ["call_started", "call_answered", *RECORDED_CALL[1:]]
    answered = only(events, "call_answered")
    assert answered["answered_by"] == "polarity_reversal"
    assert 12.0 * RATE <= answered["sample"] <= 12.0 * RATE + 2 * 160
    [receipt] = receipts(tmp_path)
    assert receipt["number"]["value"] == "0612"
    assert receipt["number"]["source"] == "dialled_pulse"
    # The pulses (loop breaks of 60 ms) did not end the call: one call, one recording.
    assert len(recordings(tmp_path)) == 1


def test_outbound_never_answered_is_not_recorded(tmp_path: Path) -> None:
    config = sim_config(tmp_path, line_extra="answer_timeout_s = 8.0")
    body = (step(0.5, "offhook") + step(1.0, "dtmf", digits="0201234567")
            + step(3.0, "tone", kind="ringback", until=14.0) + step(14.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 16.0), config)
    assert kinds(events) == ["call_started", "disclosure_failed", "call_ended"]
    failed = only(events, "disclosure_failed")
    assert "answer_timeout_s" in failed["reason"]
    assert failed["sample"] == pytest.approx(8.5 * RATE, abs=160)
    assert recordings(tmp_path) == []
    assert not read_wav(tmp_path / "work" / "line1.played.wav").any()
    # What was dialled is in the receipt all the same, with why nothing was recorded.
    [receipt] = receipts(tmp_path)
    assert receipt["number"]["value"] == "0201234567"
    assert receipt["number"]["source"] == "dialled_dtmf"
    assert receipt["disclosure"]["status"] == "failed"
    assert receipt["answered"] is None


def test_far_end_hanging_up_during_the_disclosure_is_not_recorded(tmp_path: Path) -> None:
    """The busy tone hides under the disclosure's own echo: the line listens on after the
    disclosure before it records, and the tone it then hears fails the call."""
    body = (step(0.5, "ring") + step(5.5, "offhook") + step(9.0, "tone", kind="busy", until=30.0)
            + step(28.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 30.0), sim_config(tmp_path))
    assert kinds(events) == ["call_started", "disclosure_started", "disclosure_failed",
                             "call_ended"]
    assert "busy tone" in only(events, "disclosure_failed")["reason"]
    assert only(events, "call_ended")["reason"] == "busy_tone"
    assert recordings(tmp_path) == []
    [receipt] = receipts(tmp_path)
    assert receipt["recording"] is None
    assert receipt["disclosure"]["played_s"] > 5.0


def test_off_hook_after_a_missed_call_that_hears_dial_tone_is_outbound(
        tmp_path: Path, far_end: Path) -> None:
    """The caller gave up after one ring; the office picks up to make a call within the
    ring window: dial tone says it is a call the office makes, so the notice waits for the
    far end's answer instead of playing into the dial tone."""
    body = (step(0.5, "ring", until=1.6) + step(5.0, "offhook")
            + step(5.05, "tone", kind="dial", until=6.5) + step(6.6, "dtmf", digits="0612345678")
            + step(9.0, "tone", kind="ringback", until=14.2)
            + step(14.4, "audio", file=str(far_end)) + step(32.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 34.0), sim_config(tmp_path))
    assert kinds(events) == ["call_started", "call_answered", *RECORDED_CALL[1:]]
    assert only(events, "call_started")["direction"] == "outbound"
    assert only(events, "disclosure_started")["sample"] >= 14.4 * RATE
    [receipt] = receipts(tmp_path)
    assert receipt["number"]["value"] == "0612345678"


def test_dial_tone_that_comes_late_is_caught(tmp_path: Path, far_end: Path) -> None:
    """Dial tone 0.35 s after the off-hook is still heard before the notice plays; one that
    comes only after the notice has started is heard after it, and fails the call."""
    for delay, direction in ((0.35, "outbound"), (1.5, "inbound")):
        folder = tmp_path / str(delay)
        folder.mkdir()
        body = (step(0.5, "ring", until=1.6) + step(5.0, "offhook")
                + step(5.0 + delay, "tone", kind="dial", until=22.0)
                + step(22.0, "dtmf", digits="0612345678")
                + step(24.0, "tone", kind="ringback", until=29.0) + step(30.0, "onhook"))
        events = run_sim(folder, write_scenario(folder, body, 32.0), sim_config(folder))
        assert only(events, "call_started")["direction"] == direction
        assert "recording_started" not in kinds(events)
        assert recordings(folder) == []
        if direction == "inbound":
            assert "dial tone or ringback" in only(events, "disclosure_failed")["reason"]


def test_a_high_voice_at_the_answer_is_not_dial_tone(tmp_path: Path) -> None:
    """A child's or a high voice sits near 425 Hz: speech is an answered call all the same."""
    import subprocess

    low = speak("Goedemiddag, met Sanne.", tmp_path / "voice.wav", voice="nl+f3")
    high = tmp_path / "high.wav"
    subprocess.run(["sox", str(low), "-r", "8000", str(high), "pitch", "500"], check=True)
    body = (step(0.5, "ring") + step(5.5, "offhook") + step(5.55, "audio", file=str(high))
            + step(24.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 26.0), sim_config(tmp_path))
    assert only(events, "call_started")["direction"] == "inbound"
    assert kinds(events) == RECORDED_CALL


def test_the_far_end_answering_during_the_first_ringback_burst(tmp_path: Path,
                                                              far_end: Path) -> None:
    body = (step(0.5, "offhook") + step(1.0, "dtmf", digits="0201234567")
            + step(3.0, "tone", kind="ringback", until=3.6)
            + step(3.7, "audio", file=str(far_end)) + step(24.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 26.0), sim_config(tmp_path))
    assert kinds(events) == ["call_started", "call_answered", *RECORDED_CALL[1:]]
    assert only(events, "call_answered")["sample"] < 4.2 * RATE


def test_a_line_already_reversed_at_off_hook_is_not_taken_as_answered(tmp_path: Path) -> None:
    """Only a change of polarity after off-hook is an answer (a line wired the other way
    round reads reversed from the start)."""
    config = sim_config(tmp_path)
    config.write_text(config.read_text().replace(
        'led_pin = 25\n', 'led_pin = 25\npolarity_pin = 5\nanswer_timeout_s = 8.0\n'))
    body = (step(0.2, "answer", line="line2") + step(0.5, "offhook", line="line2")
            + step(1.0, "dtmf", line="line2", digits="0201234567")
            + step(12.0, "onhook", line="line2"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 14.0), config)
    assert kinds(events, "line2") == ["call_started", "disclosure_failed", "call_ended"]
    assert "answer_timeout_s" in only(events, "disclosure_failed")["reason"]
    assert recordings(tmp_path) == []


def test_a_caller_id_does_not_carry_over_to_another_call(tmp_path: Path) -> None:
    body = (step(0.3, "callerid", number="0201234567") + step(3.0, "offhook")
            + step(4.5, "onhook") + step(6.0, "ring") + step(11.0, "offhook")
            + step(22.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 24.0), sim_config(tmp_path))
    assert [e["direction"] for e in events if e["event"] == "call_started"] == [
        "outbound", "inbound"]
    inbound = next(r for r in receipts(tmp_path) if r["direction"] == "inbound")
    assert inbound["number"]["value"] is None
    assert inbound["number"]["unknown_reason"] == "no caller id received"


def test_never_record_number_plays_no_disclosure_and_records_nothing(tmp_path: Path) -> None:
    config = sim_config(tmp_path, extra='\n[numbers]\nnever_record = ["+31 20 123 45*"]\n')
    body = (step(0.3, "callerid", number="0201234567") + step(1.5, "ring")
            + step(6.5, "offhook") + step(18.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 20.0), config)
    assert kinds(events) == ["caller_id", "call_started", "call_ended"]
    assert only(events, "caller_id")["number"] is None  # not even in the events
    assert only(events, "call_ended")["rule"] == "never_record"
    assert not read_wav(tmp_path / "work" / "line1.played.wav").any()
    assert recordings(tmp_path) == []
    [receipt] = receipts(tmp_path)
    assert receipt["rule"] == "never_record"
    assert receipt["number"]["value"] is None
    assert "never_record" in receipt["number"]["unknown_reason"]
    assert receipt["disclosure"]["status"] == "not_played"
    assert "201234567" not in (tmp_path / "recordings").joinpath(
        next((tmp_path / "recordings").rglob("*.json"))).read_text()


def test_only_record_list_skips_other_and_unknown_numbers(tmp_path: Path) -> None:
    config = sim_config(tmp_path, extra='\n[numbers]\nonly_record = ["0800*"]\n')
    body = (step(0.5, "ring") + step(5.5, "offhook") + step(12.0, "onhook")
            + step(13.0, "callerid", number="0800123456") + step(14.0, "ring")
            + step(19.0, "offhook") + step(33.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 35.0), config)
    ended = [e for e in events if e["event"] == "call_ended"]
    assert [e["rule"] for e in ended] == ["not_in_only_record", None]
    assert [e["recorded"] for e in ended] == [False, True]
    assert len(recordings(tmp_path)) == 1


def test_busy_tone_held_ends_the_call_while_the_handset_stays_off_hook(
        tmp_path: Path, caller_speech: Path) -> None:
    body = (step(0.5, "ring") + step(5.5, "offhook")
            + step(14.0, "audio", file=str(caller_speech))
            + step(24.0, "tone", kind="busy", until=60.0) + step(58.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 60.0), sim_config(tmp_path))
    assert kinds(events) == RECORDED_CALL
    ended = only(events, "call_ended")
    assert ended["reason"] == "busy_tone"
    # The recording ends where the busy tone began, not where it was confirmed.
    stopped = only(events, "recording_stopped")
    assert stopped["sample"] == pytest.approx(24.0 * RATE, abs=0.1 * RATE)
    assert ended["sample"] < 30.0 * RATE
    [receipt] = receipts(tmp_path)
    assert receipt["end_reason"] == "busy_tone"
    assert receipt["recording"]["end_sample"] == stopped["sample"]


def test_hook_flash_mid_call_keeps_one_call_and_one_recording(tmp_path: Path,
                                                             caller_speech: Path) -> None:
    """One call, one recording: the flash does not end the call, and the recording ends
    where the loop opened, since call waiting or a transfer may bring on a party who did
    not hear the notice (the call goes on unrecorded)."""
    body = (step(0.5, "ring") + step(5.5, "offhook") + step(14.0, "audio", file=str(caller_speech))
            + step(17.0, "flash", ms=300) + step(24.0, "onhook"))
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 26.0), sim_config(tmp_path))
    assert kinds(events) == RECORDED_CALL
    assert only(events, "call_ended")["sample"] == 24.0 * RATE
    stopped = only(events, "recording_stopped")
    assert stopped["reason"] == "hook_flash" and stopped["sample"] == 17.0 * RATE
    [opus] = recordings(tmp_path)
    recorded = decode(opus, tmp_path)
    first = only(events, "recording_started")["sample"]
    assert abs(len(recorded) - (17.0 * RATE - first)) <= TOLERANCE
    [receipt] = receipts(tmp_path)
    assert receipt["recording"]["stop_reason"] == "hook_flash"


def test_receipt_names_purpose_disclosure_and_retention(tmp_path: Path) -> None:
    body = step(0.5, "ring") + step(5.5, "offhook") + step(16.0, "onhook")
    run_sim(tmp_path, write_scenario(tmp_path, body, 18.0), sim_config(tmp_path))
    [receipt] = receipts(tmp_path)
    assert receipt["purpose"]["lawful_basis"] == "contract"
    assert receipt["purpose"]["retention_days"] == 90
    assert receipt["retention_until"] > receipt["started_at"][:10]
    disclosure = receipt["disclosure"]
    assert disclosure["id"] == "welcome"
    assert disclosure["languages"] == ["en"]
    assert len(disclosure["parts"][0]["sha256"]) == 64
    assert disclosure["status"] == "completed"
    assert disclosure["verification"]["score"] >= disclosure["verification"]["threshold"]
    assert receipt["clock_synchronised"] in (True, False, None)
    assert receipt["recording"]["sha256"]
    assert receipt["chain"]["seq"] == 1


def test_a_bilingual_opus_disclosure_plays_both_parts(tmp_path: Path) -> None:
    import subprocess

    from linerec.daemon.config import packaged_disclosure

    opus = tmp_path / "nl.opus"
    subprocess.run(["opusenc", "--quiet", str(packaged_disclosure("nl")), str(opus)], check=True)
    config = sim_config(tmp_path)
    config.write_text(config.read_text().replace(
        'parts = [{ language = "en"',
        f'pause_ms = 500\nparts = [{{ language = "nl", file = "{opus}" }}, {{ language = "en"'))
    body = step(0.5, "ring") + step(5.5, "offhook") + step(26.0, "onhook")
    events = run_sim(tmp_path, write_scenario(tmp_path, body, 28.0), config)
    assert kinds(events) == RECORDED_CALL
    started = only(events, "disclosure_started")
    assert started["languages"] == ["nl", "en"]
    played = read_wav(tmp_path / "work" / "line1.played.wav")
    nonzero = np.flatnonzero(played)
    seconds = (nonzero[-1] - nonzero[0]) / RATE
    assert seconds == pytest.approx(7.84 + 0.5 + 6.55, abs=0.3)
