"""The linerec configuration: one TOML file, checked completely before anything starts."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from linerec.audio.pcm import AudioFileError, audio_seconds
from linerec.daemon.encryption import check_recipient
from linerec.daemon.numbers import plain_number

DEFAULT_CONFIG_PATH = Path("/etc/linerec/linerec.toml")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
"""Line and device names: they appear in MQTT topics, call ids and file names."""

SUPPORTED_RATES = (8000, 16000)
CAPTURE_FORMATS = ("S16_LE", "A_LAW", "MU_LAW")


class ConfigError(ValueError):
    """A config problem; ``str()`` names the file, the key, what is wrong and what to do."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


class Secret(str):
    """A string that never shows itself in reprs or logs."""

    def __repr__(self) -> str:
        return "Secret('********')"


NO_PASSWORD = Secret("")


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"min": lo, "max": hi}


@dataclass(frozen=True)
class AudioConfig:
    rate: int = field(default=8000, metadata={"choices": SUPPORTED_RATES})
    """Sample rate of every capture and playback device (hertz)."""
    period_frames: int = field(default=160, metadata=_range(32, 4096))
    """ALSA period size (frames): the engine's tick; 160 frames is 20 ms at 8 kHz."""
    periods: int = field(default=8, metadata=_range(2, 64))
    """ALSA periods per buffer: 8 x 20 ms, so that the capture thread may stall for 100 ms
    (the engine holding the GIL, say) without an overrun."""
    bitrate: int = field(default=12000, metadata=_range(6000, 64000))
    """Opus bitrate (bits per second)."""
    complexity: int = field(default=9, metadata=_range(0, 10))
    """Opus encoder complexity (0 fastest, 10 best)."""
    page_interval_s: float = field(default=0.8, metadata=_range(0.02, 10.0))
    """Longest time between two Ogg pages written to disk (seconds)."""
    fsync_interval_s: float = field(default=0.8, metadata=_range(0.02, 60.0))
    """Longest stretch of recorded audio between two fdatasync calls: what a power cut
    can lose on top of the page being filled (seconds)."""
    capture_priority: int = field(default=0, metadata=_range(0, 99))
    """SCHED_FIFO priority of the capture threads; 0 keeps normal scheduling. Needs
    LimitRTPRIO (the unit allows 20); without the right it is a logged warning."""
    lock_memory: bool = False
    """mlockall() at start-up, so capture never waits for a page from the SD card. Needs
    LimitMEMLOCK; without the right it is a logged warning."""
    line_delay_ms: int = field(default=20, metadata=_range(0, 500))
    """Delay of the HAT's codec, transformer and line beyond the ALSA buffers: added to
    the time a disclosure needs to be heard before recording may start (milliseconds)."""

    @property
    def line_delay_frames(self) -> int:
        return self.line_delay_ms * self.rate // 1000


@dataclass(frozen=True)
class CaptureConfig:
    name: str
    """Name that lines use to refer to this capture device."""
    device: str
    """ALSA PCM name of the capture device (for example hw:CARD=tapHAT)."""
    channels: int = field(default=1, metadata=_range(1, 32))
    """Channels the device is opened with; each line taps one of them."""
    format: str = field(default="S16_LE", metadata={"choices": CAPTURE_FORMATS})
    """Sample format: S16_LE, or A_LAW / MU_LAW for G.711 ISDN B channels."""


@dataclass(frozen=True)
class PlaybackConfig:
    name: str
    """Name that lines use to refer to this playback device."""
    device: str
    """ALSA PCM name of the line outputs (for example plughw:CARD=tapHAT)."""
    channels: int = field(default=1, metadata=_range(1, 32))
    """Channels it is opened with; each line plays its disclosure into one of them."""


@dataclass(frozen=True)
class LineConfig:
    name: str
    """Name of the line in events, topics and file names."""
    capture: str
    """Name of the [[capture]] device this line is tapped on."""
    playback: str
    """Name of the [[playback]] device whose channel is this line's output."""
    hook_pin: int = field(metadata=_range(0, 53))
    """BCM GPIO of the off-hook sensor."""
    ring_pin: int = field(metadata=_range(0, 53))
    """BCM GPIO of the ring detector."""
    led_pin: int = field(metadata=_range(0, 53))
    """BCM GPIO of the recording LED."""
    disclosure: str
    """Name of the [[disclosure]] played on this line's calls (inbound, and outbound
    unless ``outbound_disclosure`` names another)."""
    channel: int = field(default=0, metadata=_range(0, 31))
    """Channel of the capture device that carries this line (0-based)."""
    playback_channel: int = field(default=0, metadata=_range(0, 31))
    """Channel of the playback device that plays into this line (0-based)."""
    hook_active_high: bool = True
    """True when the hook input reads high while the line is off-hook."""
    ring_active_high: bool = True
    """True when the ring input reads high while the line rings."""
    hook_debounce_ms: int = field(default=40, metadata=_range(0, 500))
    """A hook change shorter than this is contact bounce (milliseconds)."""
    onhook_confirm_ms: int = field(default=800, metadata=_range(100, 2000))
    """On-hook must last this long to end a call; shorter loop breaks are pulse dialling
    or hook-flash (milliseconds)."""
    ring_window_s: float = field(default=6.0, metadata=_range(5.0, 30.0))
    """Off-hook within this time after a ring answers an inbound call (seconds); longer
    than the pause between two rings (4 s in the Netherlands), or a call answered in that
    pause would pass for one the office makes."""
    outbound_disclosure: str = ""
    """Name of the [[disclosure]] for calls this line makes; empty: ``disclosure``."""
    polarity_pin: int | None = field(default=None, metadata=_range(0, 53))
    """BCM GPIO of the line polarity detector, where the HAT has one: the exchange
    reverses the polarity when the far end answers an outbound call."""
    polarity_active_high: bool = True
    """True when the polarity input reads high while the polarity is reversed."""
    answer_timeout_s: float = field(default=60.0, metadata=_range(5.0, 600.0))
    """An outbound call whose answer is not detected within this time after off-hook is
    not recorded: no disclosure could be timed to reach the far end (seconds)."""
    busy_tone_end_s: float = field(default=4.0, metadata=_range(2.0, 60.0))
    """The busy (disconnect) tone heard this long while the handset stays off-hook ends
    the call: the far end hung up (seconds)."""
    verify_min_score: float = field(default=0.3, metadata=_range(0.05, 0.99))
    """Lowest correlation between the played disclosure and what the tap heard on the
    line for the disclosure to count as heard (0 nothing, 1 exactly)."""

    @property
    def disclosure_for(self) -> dict[str, str]:
        """The disclosure's name by call direction."""
        return {"inbound": self.disclosure,
                "outbound": self.outbound_disclosure or self.disclosure}


PULSE_BREAK_MS = 60
"""The loop break of one dial pulse (10 pulses per second, 60 ms break / 40 ms make)."""

LAWFUL_BASES = ("contract", "legitimate_interests", "legal_obligation", "consent",
                "vital_interests", "public_task")
"""GDPR article 6(1) (b), (f), (c), (a), (d), (e)."""
LANGUAGE_PATTERN = re.compile(r"^[a-z]{2,3}$")
NUMBER_PATTERN = re.compile(r"^\+?[0-9*?#ABCD]+$")
"""A phone number or number rule once spaces, dashes, dots and brackets are taken out."""


@dataclass(frozen=True)
class PurposeConfig:
    name: str
    """Name that disclosures refer to."""
    text: str
    """The purpose as the disclosure tells it, for receipts and records of processing."""
    lawful_basis: str = field(metadata={"choices": LAWFUL_BASES})
    """GDPR article 6 basis: contract, legitimate_interests, legal_obligation, consent,
    vital_interests or public_task."""
    retention_days: int = field(metadata=_range(1, 3650))
    """Days a recording made for this purpose is kept; then it is deleted."""


@dataclass(frozen=True)
class DisclosurePart:
    language: str
    """ISO 639-1 code of the language this part speaks (nl, en, ...)."""
    file: Path | None = None
    """WAV or Ogg Opus file, any rate; empty: the example that ships for nl or en."""


@dataclass(frozen=True)
class DisclosureConfig:
    name: str
    """Name that lines refer to."""
    purpose: str
    """Name of the [[purpose]] this disclosure announces."""
    parts: tuple[DisclosurePart, ...]
    """One part per language, played in this order."""
    pause_ms: int = field(default=400, metadata=_range(0, 3000))
    """Silence between two languages (milliseconds)."""
    max_s: float = field(default=30.0, metadata=_range(1.0, 120.0))
    """Longest disclosure accepted, all parts and pauses together (seconds)."""

    @property
    def languages(self) -> list[str]:
        return [part.language for part in self.parts]


@dataclass(frozen=True)
class NumbersConfig:
    never_record: tuple[str, ...] = ()
    """Numbers whose calls play no disclosure and are never recorded (a doctor, the works
    council). ``*`` stands for any digits, ``?`` for one."""
    only_record: tuple[str, ...] = ()
    """When not empty, only calls with these numbers are recorded; the others, and calls
    whose number is unknown, are not."""
    country_code: str = "31"
    """Country calling code of the lines: +31 20 123 and 020 123 are the same number."""


@dataclass(frozen=True)
class MqttConfig:
    host: str
    """Broker host name or address."""
    port: int = field(default=1883, metadata=_range(1, 65535))
    """Broker TCP port."""
    username: str = ""
    """User name; empty for an anonymous connection."""
    password: Secret = NO_PASSWORD
    """Password; never printed."""
    topic_prefix: str = "linerec"
    """First level of every topic."""
    keepalive_s: int = field(default=30, metadata=_range(5, 3600))
    """MQTT keepalive (seconds)."""
    reconnect_max_s: int = field(default=30, metadata=_range(1, 600))
    """Longest wait between two attempts to reach the broker; the wait doubles from 1 s
    (seconds)."""
    ca_file: Path | None = None
    """CA certificate (PEM) of the broker: set, the connection uses TLS."""
    cert_file: Path | None = None
    """Client certificate (PEM), for a broker that asks for one; needs key_file."""
    key_file: Path | None = None
    """Private key (PEM) of cert_file."""
    protocol: str = field(default="3.1.1", metadata={"choices": ("3.1.1", "5")})
    """MQTT version: 5 where the broker speaks it (replies then carry the request's
    correlation data and go to its response topic)."""
    discovery: bool = True
    """Publish Home Assistant MQTT discovery for the lines and the appliance's health."""
    discovery_prefix: str = "homeassistant"
    """Home Assistant's discovery prefix."""


@dataclass(frozen=True)
class StorageGuardConfig:
    low_mb: int = field(default=1024, metadata=_range(0, 10_000_000))
    """Free space on the storage below which retention runs at once and a ``storage_low``
    alarm goes out (megabytes)."""
    floor_mb: int = field(default=256, metadata=_range(0, 10_000_000))
    """Free space below which new calls are not recorded (``storage_full``; the LEDs blink)
    so that the calls already recording can finish (megabytes)."""
    check_interval_s: float = field(default=10.0, metadata=_range(1.0, 600.0))
    """How often free space is measured (seconds)."""


@dataclass(frozen=True)
class EncryptionConfig:
    recipients: tuple[str, ...]
    """age X25519 public keys (age1...) every recording is sealed to; the private keys stay
    off the appliance (`linerec decrypt` opens the recordings elsewhere)."""


@dataclass(frozen=True)
class Config:
    storage: Path
    """Folder where recordings and receipts are written."""
    capture: tuple[CaptureConfig, ...]
    """The ALSA capture devices."""
    playback: tuple[PlaybackConfig, ...]
    """The ALSA playback devices (the line outputs)."""
    line: tuple[LineConfig, ...]
    """The telephone lines."""
    purpose: tuple[PurposeConfig, ...] = ()
    """Why calls are recorded: each disclosure announces one purpose (at least one)."""
    disclosure: tuple[DisclosureConfig, ...] = ()
    """The notices played before recording (at least one)."""
    numbers: NumbersConfig = NumbersConfig()
    """Which numbers are never, or only, recorded."""
    device_id: str = "linerec"
    """This appliance's name in MQTT topics and events."""
    audio: AudioConfig = AudioConfig()
    """Audio format and encoder settings shared by every line."""
    mqtt: MqttConfig | None = None
    """Broker settings; without them the daemon runs and only logs its events."""
    storage_guard: StorageGuardConfig = StorageGuardConfig()
    """Free-space thresholds of the storage."""
    encryption: EncryptionConfig | None = None
    """Encryption at rest: set, each recording is sealed to these public keys when it is
    closed; without it recordings stay plain Ogg Opus."""
    hat: str = ""
    """HAT profile that supplies the devices and each line's pins (generic-2line,
    generic-4line, or a profile file's path); keys set in the config override it."""
    service_led_pin: int | None = field(default=None, metadata=_range(0, 53))
    """BCM GPIO of the appliance's service LED: steady when ready, blinking when degraded."""
    source: str = field(default="<config>", metadata={"internal": True})
    reserved_pins: tuple[int, ...] = field(default=(), metadata={"internal": True})
    """GPIOs the HAT profile's codec holds: no line may use them."""

    def lines_on(self, capture: CaptureConfig) -> tuple[LineConfig, ...]:
        return tuple(line for line in self.line if line.capture == capture.name)

    def playback_by_name(self, name: str) -> PlaybackConfig:
        return next(p for p in self.playback if p.name == name)

    def lines_playing_on(self, playback: PlaybackConfig) -> tuple[LineConfig, ...]:
        return tuple(line for line in self.line if line.playback == playback.name)

    def disclosure_by_name(self, name: str) -> DisclosureConfig:
        return next(d for d in self.disclosure if d.name == name)

    def purpose_by_name(self, name: str) -> PurposeConfig:
        return next(p for p in self.purpose if p.name == name)


def json_schema(cls: type | None = None, *, title: str | None = None) -> dict[str, Any]:
    """The config as a JSON Schema, from the same dataclasses the loader checks against:
    what the retained MQTT ``config`` topic carries (secrets as null) and, with every key
    optional, what ``config/set`` merges in."""
    cls = cls or Config
    hints = get_type_hints(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        properties[f.name] = _schema_of(hints[f.name], f)
        doc = _field_docs(cls).get(f.name)
        if doc:
            properties[f.name]["description"] = doc
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": False}
    if required:
        schema["required"] = required
    if title:
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title,
                  **schema}
    return schema


def _schema_of(hint: Any, f: dataclasses.Field[Any]) -> dict[str, Any]:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        optional = _schema_of(inner[0], f)
        kind = optional.get("type")
        if isinstance(kind, str):
            optional["type"] = [kind, "null"]
        if inner[0] is int:  # a pin: "none" takes away the one a HAT profile sets
            return {"oneOf": [optional, {"const": "none"}]}
        return optional
    if origin is tuple:
        item = get_args(hint)[0]
        items = {"type": "string"} if item is str else json_schema(item)
        return {"type": "array", "items": items}
    if dataclasses.is_dataclass(hint):
        return json_schema(hint)  # type: ignore[arg-type]
    schema: dict[str, Any] = {}
    if hint is bool:
        schema["type"] = "boolean"
    elif hint is int:
        schema["type"] = "integer"
    elif hint is float:
        schema["type"] = "number"
    elif hint is Secret:
        schema["type"] = ["string", "null"]
    else:  # str, Path
        schema["type"] = "string"
    lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
    if choices is not None:
        schema["enum"] = list(choices)
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return schema


def _field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings under the fields, from the source."""
    import ast
    import inspect
    from itertools import pairwise

    docs = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, after in pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def load_config(path: Path) -> Config:
    """Read and check a config file; raises ConfigError naming the file and key."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(source, "(file)", "not found; pass --config PATH") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "(file)", f"cannot be read: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(syntax)", f"not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(source, "(syntax)", "tables or arrays nested too deeply") from exc
    return config_from_dict(data, source=source, base=path.parent)


def config_from_dict(data: dict[str, Any], *, source: str, base: Path) -> Config:
    """Build a checked Config; relative paths are taken from ``base``. A ``hat`` profile
    is filled in first: what the config sets itself wins."""
    reserved: tuple[int, ...] = ()
    if "hat" in data:
        data, reserved = with_hat_profile(data, source, base)
    config = dataclasses.replace(_build(Config, data, source, "", base), source=source,
                                 reserved_pins=reserved)
    _check_references(config)
    return config


def _build(cls: type, data: Any, source: str, where: str, base: Path) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(source, where or "(top level)", "expected a table")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            source,
            _key(where, unknown[0]),
            f"unknown key; known keys here are: {', '.join(sorted(fields))}",
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = _key(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, key, "missing; this key is required")
            continue
        values[name] = _convert(hints[name], data[name], f, source, key, base)
    return cls(**values)


def _convert(
    hint: Any, value: Any, f: dataclasses.Field[Any], source: str, key: str, base: Path
) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        if inner[0] is int and value == "none":
            return None  # TOML has no null: "none" takes away a pin a HAT profile sets
        return _convert(inner[0], value, f, source, key, base)
    if origin is tuple:
        item = get_args(hint)[0]
        if item is str:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(source, key, 'expected a list of strings, like ["a", "b"]')
            return tuple(value)
        if not isinstance(value, list):
            # A TOML header names no index: a [[disclosure.parts]] under the second
            # [[disclosure]] belongs to it.
            header = re.sub(r"\[\d+\]", "", key)
            leaf = key.rsplit(".", 1)[-1]
            raise ConfigError(source, key, f"expected a list of tables: [[{header}]] "
                              f"sections, or {leaf} = [{{ ... }}, {{ ... }}]")
        return tuple(
            _build(item, v, source, f"{key}[{i}]", base) for i, v in enumerate(value)
        )
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key, base)  # type: ignore[arg-type]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected a whole number, got {value!r}")
        return _in_range(value, f, source, key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        return _in_range(float(value), f, source, key)
    if hint in (str, Secret):
        if not isinstance(value, str):
            raise ConfigError(source, key, "expected a string in quotes")
        return _in_range(hint(value), f, source, key)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(source, key, "expected a path in quotes")
        path = Path(value)
        return path if path.is_absolute() else base / path
    raise TypeError(f"no converter for {hint}")  # pragma: no cover - schema bug


def _in_range(value: Any, f: dataclasses.Field[Any], source: str, key: str) -> Any:
    lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
    if isinstance(value, float) and not math.isfinite(value):
        # TOML has nan and inf; NaN compares false with every bound, so it is named here.
        raise ConfigError(source, key, f"{value!r} is not a usable number; use {lo} to {hi}")
    if choices is not None and value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        raise ConfigError(source, key, f"{value!r} is not supported; use one of {allowed}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(source, key, f"{value!r} is out of range; use {lo} to {hi}")
    return value


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _check_references(config: Config) -> None:
    source = config.source

    def fail(key: str, problem: str) -> None:
        raise ConfigError(source, key, problem)

    if not NAME_PATTERN.fullmatch(config.device_id):
        fail("device_id", "use 1-32 lower-case letters, digits, '-' or '_'")
    if not config.line:
        fail("line", "no lines configured; add at least one [[line]] table")
    if config.mqtt is not None:
        _check_mqtt(config.mqtt, fail)
    if config.encryption is not None:
        _check_encryption(config.encryption, fail)
    captures: dict[str, CaptureConfig] = _by_name(config.capture, "capture", fail)
    outputs: dict[str, PlaybackConfig] = _by_name(config.playback, "playback", fail)
    purposes: dict[str, PurposeConfig] = _by_name(config.purpose, "purpose", fail)
    if not purposes:
        fail("purpose", "no purpose configured; add a [[purpose]] table that says why calls "
             "are recorded, on what lawful basis and for how long (docs/CONFIG.md)")
    disclosures: dict[str, DisclosureConfig] = _by_name(config.disclosure, "disclosure", fail)
    for i, disclosure in enumerate(config.disclosure):
        _check_disclosure(disclosure, purposes, source, f"disclosure[{i}]")
    for key in ("never_record", "only_record"):
        for i, rule in enumerate(getattr(config.numbers, key)):
            if not NUMBER_PATTERN.fullmatch(plain_number(rule)):
                fail(f"numbers.{key}[{i}]", f"{rule!r} is not a number rule; use digits, a "
                     "leading +, * for any digits and ? for one digit")
    if not config.numbers.country_code.isdigit():
        fail("numbers.country_code", "use the digits of the country calling code, like \"31\"")
    names: set[str] = set()
    pins: dict[int, str] = {pin: f"a pin of the HAT's codec (profile {config.hat!r} "
                            f"reserves {', '.join(map(str, config.reserved_pins))})"
                            for pin in config.reserved_pins}
    if config.service_led_pin in pins:
        fail("service_led_pin", f"GPIO {config.service_led_pin} is already used as "
             f"{pins[config.service_led_pin]}")
    if config.service_led_pin is not None:
        pins[config.service_led_pin] = "service_led_pin"
    if config.storage_guard.floor_mb > config.storage_guard.low_mb:
        fail("storage_guard.floor_mb", f"{config.storage_guard.floor_mb} is above low_mb "
             f"({config.storage_guard.low_mb}); the floor comes after the low-space alarm")
    taps: dict[tuple[str, int], str] = {}
    plays: dict[tuple[str, int], str] = {}
    playback_tap: dict[str, str] = {}
    for i, line in enumerate(config.line):
        where = f"line[{i}]"
        if not NAME_PATTERN.fullmatch(line.name):
            fail(f"{where}.name", "use 1-32 lower-case letters, digits, '-' or '_'")
        if line.name in names:
            fail(f"{where}.name", f"{line.name!r} is used twice; line names must be unique")
        names.add(line.name)
        tap = captures.get(line.capture)
        if tap is None:
            fail(f"{where}.capture", f"no [[capture]] is named {line.capture!r}")
            continue
        if line.channel >= tap.channels:
            fail(
                f"{where}.channel",
                f"capture {tap.name!r} has {tap.channels} channel(s); use 0 to {tap.channels - 1}",
            )
        if (tap.name, line.channel) in taps:
            fail(f"{where}.channel", f"already tapped by line {taps[(tap.name, line.channel)]!r}")
        taps[(tap.name, line.channel)] = line.name
        player = outputs.get(line.playback)
        if player is None:
            fail(f"{where}.playback", f"no [[playback]] is named {line.playback!r}")
            continue
        if line.playback_channel >= player.channels:
            fail(f"{where}.playback_channel",
                 f"playback {player.name!r} has {player.channels} channel(s); use 0 to "
                 f"{player.channels - 1}")
        if (player.name, line.playback_channel) in plays:
            fail(f"{where}.playback_channel",
                 f"already plays into line {plays[(player.name, line.playback_channel)]!r}")
        plays[(player.name, line.playback_channel)] = line.name
        # One codec, one clock: the disclosure timing assumes the line output and the tap
        # run on the same clock, and lines sharing an output share its timing.
        if playback_tap.setdefault(player.name, tap.name) != tap.name:
            fail(f"{where}.playback",
                 f"playback {player.name!r} already serves lines on capture "
                 f"{playback_tap[player.name]!r}; lines sharing a playback device must be on "
                 "the same capture device")
        for pin_key in ("hook_pin", "ring_pin", "led_pin", "polarity_pin"):
            pin = getattr(line, pin_key)
            if pin is None:  # a HAT without a polarity input
                continue
            if pin in pins:
                fail(f"{where}.{pin_key}", f"GPIO {pin} is already used as {pins[pin]}")
            pins[pin] = f"{line.name}.{pin_key}"
        period_ms = config.audio.period_frames * 1000 / config.audio.rate
        rules = config.numbers.never_record or config.numbers.only_record
        if rules and line.hook_debounce_ms + period_ms > PULSE_BREAK_MS:
            fail(f"{where}.hook_debounce_ms",
                 f"with number rules, hook_debounce_ms + one period ({line.hook_debounce_ms} + "
                 f"{period_ms:g} ms) must be at most {PULSE_BREAK_MS} ms, or the dial pulses "
                 "of a pulse-dialled number pass for contact bounce and no rule sees it")
        if line.onhook_confirm_ms < line.hook_debounce_ms + period_ms:
            fail(f"{where}.onhook_confirm_ms",
                 f"must be at least hook_debounce_ms + one period "
                 f"({line.hook_debounce_ms + period_ms:g} ms), or a hang-up could pass for bounce")
        if not line.disclosure:
            fail(f"{where}.disclosure", "name the [[disclosure]] this line plays")
        for key, name in (("disclosure", line.disclosure),
                          ("outbound_disclosure", line.outbound_disclosure)):
            if name and name not in disclosures:
                fail(f"{where}.{key}", f"no [[disclosure]] is named {name!r}; named: "
                     f"{', '.join(disclosures) or 'none'}")


def _check_mqtt(mqtt: MqttConfig, fail: Callable[[str, str], None]) -> None:
    if not TOPIC_LEVEL.fullmatch(mqtt.topic_prefix):
        fail("mqtt.topic_prefix", "use letters, digits, '-', '_' or '/' between levels; no "
             "'+', '#' or spaces")
    if not TOPIC_LEVEL.fullmatch(mqtt.discovery_prefix):
        fail("mqtt.discovery_prefix", "use letters, digits, '-', '_' or '/' between levels")
    if (mqtt.cert_file is None) != (mqtt.key_file is None):
        fail("mqtt.key_file" if mqtt.key_file is None else "mqtt.cert_file",
             "a client certificate needs both cert_file and key_file")
    if mqtt.cert_file is not None and mqtt.ca_file is None:
        fail("mqtt.ca_file", "a client certificate is only sent over TLS: set ca_file too")
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(mqtt, key)
        if path is not None and not path.is_file():
            fail(f"mqtt.{key}", f"{path} does not exist or is not a file")


def _check_encryption(encryption: EncryptionConfig, fail: Callable[[str, str], None]) -> None:
    if not encryption.recipients:
        fail("encryption.recipients", "give at least one age public key (age1...), or leave "
             "out the [encryption] table to keep recordings unencrypted")
    for i, recipient in enumerate(encryption.recipients):
        try:
            check_recipient(recipient)
        except ValueError as exc:
            fail(f"encryption.recipients[{i}]", str(exc))


def _by_name(tables: tuple[Any, ...], key: str, fail: Callable[[str, str], None]) -> dict[str, Any]:
    """Device tables by their names, which must be well formed and unique."""
    found: dict[str, Any] = {}
    for i, table in enumerate(tables):
        if not NAME_PATTERN.fullmatch(table.name):
            fail(f"{key}[{i}].name", "use 1-32 lower-case letters, digits, '-' or '_'")
        if table.name in found:
            fail(f"{key}[{i}].name", f"{table.name!r} is used twice; names must be unique")
        found[table.name] = table
    return found


PROFILE_KEYS = ("description", "overlay", "config_txt", "reserved_pins", "service_led_pin",
                "capture", "playback", "line")
"""What a HAT profile file may hold (hw/profiles/*.toml)."""
PROFILE_LINE_KEYS = ("name", "capture", "channel", "playback", "playback_channel", "hook_pin",
                     "ring_pin", "led_pin", "polarity_pin", "hook_active_high",
                     "ring_active_high", "polarity_active_high", "hook_debounce_ms",
                     "onhook_confirm_ms")
"""A profile describes wiring only: what decides whether a call is recorded (disclosures,
verification, timeouts) stays in the installer's own config."""


def hat_profiles() -> dict[str, Path]:
    """The HAT profiles that ship with linerec, by name."""
    folder = files("linerec.hw") / "profiles"
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir()
            if entry.name.endswith(".toml")}


def load_hat_profile(name: str, source: str, base: Path) -> dict[str, Any]:
    """A HAT profile's tables, by shipped name or as a path to a profile file."""
    shipped = hat_profiles()
    if name in shipped:
        path = shipped[name]
    elif name.endswith(".toml"):
        path = Path(name) if Path(name).is_absolute() else base / name
    else:
        raise ConfigError(source, "hat", f"no HAT profile {name!r}; use one of "
                          f"{', '.join(sorted(shipped))}, or the path of a profile file "
                          "ending in .toml")
    try:
        profile = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        # ValueError: undecodable text, bad TOML (TOMLDecodeError), a NUL in the path.
        raise ConfigError(source, "hat", f"the HAT profile {path} cannot be read: {exc}; "
                          "give a shipped profile's name or the path of a readable profile "
                          "file") from exc
    _check_profile(profile, path, source)
    return profile


def _check_profile(profile: dict[str, Any], path: Path, source: str) -> None:
    """A profile's own mistakes name the profile file, not the config that uses it."""
    def fail(key: str, problem: str) -> None:
        raise ConfigError(source, "hat", f"the HAT profile {path}: {key}: {problem}")

    for key in sorted(set(profile) - set(PROFILE_KEYS)):
        fail(key, f"unknown key; known keys: {', '.join(PROFILE_KEYS)}")
    for key in ("capture", "playback", "line"):
        tables = profile.get(key, [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            fail(key, f"expected a list of tables ([[{key}]])")
        for i, table in enumerate(tables):
            if not isinstance(table.get("name"), str):
                fail(f"{key}[{i}].name", "missing; every table needs a name")
            if key == "line":
                for extra in sorted(set(table) - set(PROFILE_LINE_KEYS)):
                    fail(f"line[{i}].{extra}", "not a wiring key; a profile's lines may "
                         f"set only {', '.join(PROFILE_LINE_KEYS)}")
    reserved = profile.get("reserved_pins", [])
    if not isinstance(reserved, list) or not all(
            isinstance(pin, int) and not isinstance(pin, bool) for pin in reserved):
        fail("reserved_pins", "expected a list of BCM GPIO numbers")


def with_hat_profile(data: dict[str, Any], source: str, base: Path
                     ) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The config's tables laid over its HAT profile's: devices and lines by name, key by
    key. Each [[line]] of the config takes the profile's line of the same name (the lines
    the installer wired); a line the profile lacks must give its own pins. Also returns
    the pins the profile's codec holds."""
    name = data["hat"]
    if not isinstance(name, str) or not name:
        raise ConfigError(source, "hat", "expected the name of a HAT profile in quotes, "
                          f"like \"generic-2line\"; shipped: {', '.join(sorted(hat_profiles()))}")
    profile = load_hat_profile(name, source, base)
    reserved = tuple(profile.get("reserved_pins", ()))
    merged = dict(data)
    if "service_led_pin" in profile:
        merged.setdefault("service_led_pin", profile["service_led_pin"])
    for key in ("capture", "playback"):
        ours = data.get(key, [])
        if not isinstance(ours, list) or not all(isinstance(t, dict) for t in ours):
            continue  # the loader names the problem
        given = {t["name"]: t for t in ours if isinstance(t.get("name"), str)}
        unnamed = [t for t in ours if not isinstance(t.get("name"), str)]  # the loader says
        merged[key] = [{**table, **given.pop(table["name"], {})}
                       for table in profile.get(key, [])] + list(given.values()) + unnamed
    lines = data.get("line")
    if not isinstance(lines, list) or not all(isinstance(t, dict) for t in lines):
        return merged, reserved
    wired = {line["name"]: line for line in profile.get("line", [])}
    merged["line"] = []
    for i, line in enumerate(lines):
        if not isinstance(line.get("name"), str):
            merged["line"].append(line)  # the loader names what is wrong with it
            continue
        if line.get("name") not in wired and "hook_pin" not in line:
            raise ConfigError(source, f"line[{i}].name",
                              f"{line.get('name')!r} is not a line of the HAT profile "
                              f"{name!r} (it has {', '.join(wired)}); use one of those names, "
                              "or give this line its own capture, playback and pins")
        merged["line"].append({**wired.get(line.get("name"), {}), **line})
    return merged, reserved


def packaged_disclosure(language: str) -> Path:
    """The example disclosure that ships with linerec for a language (generated speech);
    scripts/make-disclosures has its text."""
    return Path(str(files("linerec.audio") / "disclosures" / f"{language}.wav"))


PACKAGED_LANGUAGES = ("en", "nl")


def disclosure_files(disclosure: DisclosureConfig) -> list[Path]:
    """The audio files of a disclosure's parts, in playing order."""
    return [part.file or packaged_disclosure(part.language) for part in disclosure.parts]


def _check_disclosure(disclosure: DisclosureConfig, purposes: dict[str, PurposeConfig],
                      source: str, where: str) -> None:
    if disclosure.purpose not in purposes:
        raise ConfigError(source, f"{where}.purpose",
                          f"no [[purpose]] is named {disclosure.purpose!r}; named: "
                          f"{', '.join(purposes)}")
    if not disclosure.parts:
        raise ConfigError(source, f"{where}.parts", "add at least one part: "
                          'parts = [{ language = "nl", file = "disclosure-nl.wav" }]')
    seconds = disclosure.pause_ms / 1000 * (len(disclosure.parts) - 1)
    for i, part in enumerate(disclosure.parts):
        key = f"{where}.parts[{i}]"
        if not LANGUAGE_PATTERN.fullmatch(part.language):
            raise ConfigError(source, f"{key}.language",
                              f"{part.language!r} is not an ISO 639-1 code like nl or en")
        if part.file is None and part.language not in PACKAGED_LANGUAGES:
            raise ConfigError(source, f"{key}.file", "required: linerec ships example "
                              f"disclosures only for {', '.join(PACKAGED_LANGUAGES)}")
        path = part.file or packaged_disclosure(part.language)
        try:
            seconds += audio_seconds(path)
        except AudioFileError as exc:
            raise ConfigError(source, f"{key}.file", str(exc)) from exc
    if seconds > disclosure.max_s:
        raise ConfigError(source, f"{where}.max_s",
                          f"the disclosure lasts {seconds:.1f} s with its pauses, over "
                          f"max_s = {disclosure.max_s}; shorten it or raise max_s")
