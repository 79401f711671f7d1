"""Config checking: every mistake names the file, the key and what to do."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from simhelpers import linerec, sim_config

from linerec.daemon.config import ConfigError, load_config, packaged_disclosure


def test_the_simulated_layout_is_a_valid_config(tmp_path: Path) -> None:
    path = sim_config(tmp_path, ("127.0.0.1", 1883))
    config = load_config(path)
    assert [line.name for line in config.line] == ["line1", "line2"]
    assert config.audio.rate == 8000 and config.audio.bitrate == 12000
    assert config.mqtt is not None and config.mqtt.port == 1883
    result = linerec("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "2 line(s)" in result.stdout


def test_secret_is_never_shown(tmp_path: Path) -> None:
    path = sim_config(tmp_path, ("127.0.0.1", 1883))
    path.write_text(path.read_text() + 'username = "pi"\npassword = "hunter2"\n')
    config = load_config(path)
    assert config.mqtt is not None and config.mqtt.password == "hunter2"  # noqa: S105
    assert "hunter2" not in repr(config)


BAD = [
    # (change to the valid file, key in the message, words in the message)
    ("append", "colour = 'red'\n", "line[1].colour", "unknown key"),
    ("replace", ('device_id = "office"', 'device_id = "office"\ncolour = 1'), "colour",
     "unknown key"),
    ("append", "[audio]\nrate = 44100\n", "audio.rate", "use one of 8000, 16000"),
    ("append", "[audio]\nbitrate = 'fast'\n", "audio.bitrate", "whole number"),
    ("append", "[audio]\nperiods = 1\n", "audio.periods", "out of range"),
    ("append", "[audio]\npage_interval_s = true\n", "audio.page_interval_s", "number"),
    ("append", "hook_debounce_ms = 100\nonhook_confirm_ms = 100\n", "line[1].onhook_confirm_ms",
     "at least hook_debounce_ms + one period (120 ms)"),
    ("replace", ('name = "line2"', 'name = "line1"'), "line[1].name", "used twice"),
    ("replace", ('name = "line2"', 'name = "Line 2"'), "line[1].name", "lower-case"),
    ("replace", ("hook_pin = 23", "hook_pin = 17"), "line[1].hook_pin", "already used"),
    ("replace", ("hook_pin = 23", "hook_pin = 99"), "line[1].hook_pin", "out of range"),
    ("replace", ("\nchannel = 1", "\nchannel = 2"), "line[1].channel", "use 0 to 1"),
    ("replace", ("\nchannel = 1", "\nchannel = 0"), "line[1].channel", "already tapped"),
    ("replace", ('capture = "tap"\nchannel = 1', 'capture = "tip"\nchannel = 1'),
     "line[1].capture", "no [[capture]]"),
    ("replace", ('playback = "out"\nplayback_channel = 1', 'playback = "tv"\nplayback_channel = 1'),
     "line[1].playback", "no [[playback]]"),
    ("replace", ("playback_channel = 1", "playback_channel = 2"), "line[1].playback_channel",
     "use 0 to 1"),
    ("replace", ("playback_channel = 1", "playback_channel = 0"), "line[1].playback_channel",
     "already plays into line 'line1'"),
    ("replace", ("ring_pin = 24\n", ""), "line[1].ring_pin", "required"),
    ("replace", ('device_id = "office"', 'device_id = "a/b"'), "device_id", "letters"),
]


@pytest.mark.parametrize(("how", "change", "key", "words"), BAD)
def test_bad_config_names_file_and_key(tmp_path: Path, how: str, change: object, key: str,
                                       words: str) -> None:
    path = sim_config(tmp_path)
    text = path.read_text()
    if how == "append":
        assert isinstance(change, str)
        text += change
    else:
        assert isinstance(change, tuple)
        old, new = change
        assert old in text
        text = text[::-1].replace(old[::-1], new[::-1], 1)[::-1]  # the last occurrence
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.source == str(path) and caught.value.key == key
    assert words in caught.value.problem
    result = linerec("check-config", str(path))
    assert result.returncode == 2
    assert f"{path}: {key}: " in result.stderr and words in result.stderr


def test_disclosure_problems_are_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    path = sim_config(tmp_path, disclosure=missing)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "disclosure[0].parts[0].file"
    assert "not found" in caught.value.problem and str(missing) in caught.value.problem
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all")
    path = sim_config(tmp_path, disclosure=junk)
    with pytest.raises(ConfigError, match="not a readable PCM WAV"):
        load_config(path)
    broken_opus = tmp_path / "broken.opus"
    broken_opus.write_bytes(b"OggS" + bytes(100))
    path = sim_config(tmp_path, disclosure=broken_opus)
    with pytest.raises(ConfigError, match="not a usable Ogg Opus file"):
        load_config(path)
    text = sim_config(tmp_path).read_text().replace('purpose = "service"\n',
                                                    'purpose = "service"\nmax_s = 2.0\n')
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"lasts 6\.\d s with its pauses, over max_s = 2"):
        load_config(path)


POLICY_MISTAKES = [
    (('lawful_basis = "contract"', 'lawful_basis = "because"'), "purpose[0].lawful_basis",
     "use one of contract"),
    (("retention_days = 90", "retention_days = 0"), "purpose[0].retention_days", "out of range"),
    (('purpose = "service"\n', 'purpose = "sales"\n'), "disclosure[0].purpose",
     "no [[purpose]] is named 'sales'"),
    (('language = "en"', 'language = "English"'), "disclosure[0].parts[0].language",
     "ISO 639-1"),
    (('disclosure = "welcome"\n', 'disclosure = "welcom"\n'), "line[1].disclosure",
     "no [[disclosure]] is named 'welcom'"),
    (("led_pin = 25", "led_pin = 25\npolarity_pin = 17"), "line[1].polarity_pin",
     "already used"),
    (("led_pin = 25", 'led_pin = 25\noutbound_disclosure = "x"'), "line[1].outbound_disclosure",
     "no [[disclosure]]"),
    (('disclosure = "welcome"\n', 'disclosure = ""\n'), "line[1].disclosure",
     "name the [[disclosure]]"),
    (("led_pin = 25", "led_pin = 25\nring_window_s = 3.0"), "line[1].ring_window_s",
     "out of range"),
]


@pytest.mark.parametrize(("change", "key", "words"), POLICY_MISTAKES)
def test_purpose_disclosure_and_number_mistakes_are_named(
        tmp_path: Path, change: tuple[str, str], key: str, words: str) -> None:
    path = sim_config(tmp_path)
    old, new = change
    text = path.read_text()
    assert old in text
    path.write_text(text[::-1].replace(old[::-1], new[::-1], 1)[::-1])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key and words in caught.value.problem


def test_number_rules_need_a_hook_filter_that_sees_dial_pulses(tmp_path: Path) -> None:
    rules = '\n[numbers]\nnever_record = ["0201234567"]\n'
    load_config(sim_config(tmp_path, line_extra="hook_debounce_ms = 40", extra=rules))
    path = sim_config(tmp_path, line_extra="hook_debounce_ms = 70", extra=rules)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "line[0].hook_debounce_ms"
    assert "dial pulses" in caught.value.problem
    load_config(sim_config(tmp_path, line_extra="hook_debounce_ms = 70"))  # no rules: fine


def test_number_rules_and_a_missing_purpose_are_checked(tmp_path: Path) -> None:
    path = sim_config(tmp_path, extra='\n[numbers]\nnever_record = ["020-12 34", "abc"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "numbers.never_record[1]" and "'abc'" in caught.value.problem
    path = sim_config(tmp_path, extra='\n[numbers]\nonly_record = "0800*"\n')
    with pytest.raises(ConfigError, match="list of strings"):
        load_config(path)
    text = sim_config(tmp_path).read_text()
    start, end = text.index("[[purpose]]"), text.index("[[disclosure]]")
    path.write_text(text[:start] + text[end:])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "purpose" and "lawful basis" in caught.value.problem


def test_broken_or_missing_files(tmp_path: Path) -> None:
    result = linerec("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "nope.toml" in result.stderr and "not found" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[[line]\nname = 1\n")
    result = linerec("check-config", str(broken))
    assert result.returncode == 2 and "broken.toml" in result.stderr
    assert "not valid TOML" in result.stderr
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    result = linerec("check-config", str(empty))
    assert result.returncode == 2 and "empty.toml: storage: missing" in result.stderr


def test_relative_disclosure_is_taken_from_the_config_folder(tmp_path: Path) -> None:
    path = sim_config(tmp_path)
    (tmp_path / "notice.wav").write_bytes(packaged_disclosure("en").read_bytes())
    path.write_text(path.read_text().replace(f'"{packaged_disclosure("en")}"', '"notice.wav"'))
    assert load_config(path).disclosure[0].parts[0].file == tmp_path / "notice.wav"


def test_the_documented_example_is_a_valid_config(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    disclosure = tmp_path / "disclosure-nl.wav"
    disclosure.write_bytes(packaged_disclosure("nl").read_bytes())
    opus = tmp_path / "disclosure-en.opus"
    subprocess.run(["opusenc", "--quiet", str(packaged_disclosure("en")), str(opus)], check=True)
    path = tmp_path / "linerec.toml"
    path.write_text(example.replace("/etc/linerec/disclosure-nl.wav", str(disclosure))
                    .replace("/etc/linerec/disclosure-en.opus", str(opus)))
    config = load_config(path)
    assert [line.name for line in config.line] == ["line1", "line2"]
    assert config.disclosure[0].languages == ["nl", "en"]
    assert config.numbers.never_record == ("0201234567", "+31 30 *")
    assert config.mqtt is not None and "change-me" not in repr(config.mqtt)


def test_a_wav_header_with_no_sample_rate_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "zero-rate.wav"
    fmt = struct.pack("<HHIIHH", 1, 1, 0, 0, 2, 16)
    data = bytes(320)
    broken.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
                       + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                       + b"data" + struct.pack("<I", len(data)) + data)
    result = linerec("check-config", str(sim_config(tmp_path, disclosure=broken)))
    assert result.returncode == 2, result.stderr
    assert "disclosure[0].parts[0].file" in result.stderr
    assert "sample rate of 0 Hz" in result.stderr


@pytest.mark.parametrize(("mqtt", "key", "words"), [
    ('ca_file = "missing-ca.pem"', "mqtt.ca_file", "does not exist"),
    ('ca_file = "ca.pem"\ncert_file = "ca.pem"', "mqtt.key_file", "both cert_file and key_file"),
    ('cert_file = "ca.pem"\nkey_file = "ca.pem"', "mqtt.ca_file", "set ca_file too"),
    ('topic_prefix = "linerec/#"', "mqtt.topic_prefix", "no '+', '#'"),
    ("reconnect_max_s = 0", "mqtt.reconnect_max_s", "out of range"),
])
def test_mqtt_tls_and_topic_mistakes_are_named(tmp_path: Path, mqtt: str, key: str,
                                               words: str) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    path = sim_config(tmp_path, extra=f'\n[mqtt]\nhost = "broker"\n{mqtt}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key and words in caught.value.problem
