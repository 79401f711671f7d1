"""`linerec doctor`: checks the appliance end to end and says in plain words what to fix."""

from __future__ import annotations

import contextlib
import glob
import grp
import logging
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any, Protocol

from linerec.audio.pcm import AudioFileError
from linerec.daemon.config import (
    Config,
    ConfigError,
    LineConfig,
    disclosure_files,
    hat_profiles,
    load_config,
)
from linerec.daemon.disclosure import DisclosureLibrary
from linerec.daemon.runtime import StorageError, check_storage
from linerec.daemon.storage_guard import MB
from linerec.hw.base import HardwareError, Hat
from linerec.hw.board import system_clock_synchronised

logger = logging.getLogger(__name__)

CHECKS = ("config", "alsa", "gpio", "disclosures", "storage", "clock", "broker", "service-user")
"""Every check, in the order they run and are reported."""
STARTUP_CHECKS = ("disclosures", "storage", "clock", "service-user")
"""What the daemon checks at start: nothing that needs its devices (it opens them right
after and names a device that fails) nor a second connection to the broker."""
WITHOUT_CONFIG = ("clock", "service-user")
"""What can still be checked when the config does not load."""

"""Free space below this on the storage's disk fails the storage check (MB)."""
BROKER_TIMEOUT_S = 5.0
"""How long the broker check waits for the connection and its CONNACK (seconds)."""

SERVICE_USER = "linerec"
"""The unit's User=."""
SERVICE_GROUPS = ("audio", "gpio")
"""The unit's SupplementaryGroups=: systemd gives the service these groups whether or not
/etc/group lists the user in them, and refuses to start it when one does not exist."""
DEVICE_NODES: Mapping[str, str] = {"/dev/snd/controlC*": "audio", "/dev/snd/pcmC*": "audio",
                                   "/dev/gpiochip*": "gpio"}
"""The device nodes the service opens, each with the group that should give it the right."""
STATE_DIRECTORY = Path("/var/lib/linerec")
"""The unit's StateDirectory=: systemd creates it for the service and makes it the service
user's (what is below it only when it was not the user's: then systemd changes the owner of
everything in it); with ProtectSystem=strict, the rest of the file system is read-only to the
service unless a drop-in adds ReadWritePaths=."""
CONFIGURATION_DIRECTORY = Path("/etc/linerec")
"""The unit's ConfigurationDirectory=: writable to the service (settings changed over MQTT
are saved there), but left with the owner it has."""

SERVICE_RUNNING = ("in use: is the linerec service running? Stop it first (systemctl stop "
                   "linerec), run linerec doctor, then start it again (systemctl start linerec)")

_R, _W, _X = os.R_OK, os.W_OK, os.X_OK


@dataclass(frozen=True)
class Check:
    """One check's outcome. ``ok`` with a ``problem`` is a warning: it passes."""

    name: str
    ok: bool
    problem: str = ""
    """What is wrong, naming the file, key, device or pin."""
    fix: str = ""
    """What to do about it."""
    detail: str = ""
    """What was checked and found, for a check that passed."""
    skipped: bool = False
    """Not run, because the config did not load (it does not pass either)."""

    @property
    def status(self) -> str:
        if self.skipped:
            return "SKIP"
        if not self.ok:
            return "FAIL"
        return "WARN" if self.problem else "OK"

    def line(self) -> str:
        """``OK   alsa: ...`` or ``FAIL gpio: ... — fix: ...``"""
        fix = f" — fix: {self.fix}" if self.fix else ""
        return f"{self.status:<4} {self.name}: {self.problem or self.detail}{fix}"

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status.lower(), "ok": self.ok,
                "problem": self.problem or None, "fix": self.fix or None,
                "detail": self.detail or None}


@dataclass(frozen=True)
class UnitSandbox:
    """The installed unit's file-system protection as systemd has it, drop-ins included."""

    protect_system: str
    """ProtectSystem= as systemctl shows it: strict in the unit linerec ships."""
    read_write_paths: tuple[Path, ...] = ()
    """ReadWritePaths=: what stays writable below a protected part of the file system."""

    def writable(self, path: Path) -> bool:
        """Whether the unit lets the service write at ``path`` (its StateDirectory= and
        ConfigurationDirectory= aside, which are the caller's to know)."""
        protected = {"strict": ("/",), "full": ("/usr", "/boot", "/efi", "/etc"),
                     "yes": ("/usr", "/boot", "/efi")}.get(self.protect_system, ())
        return _below(path, self.read_write_paths) or not _below(path, map(Path, protected))

    def describe(self) -> str:
        paths = " ".join(map(str, self.read_write_paths)) or "none"
        return f"ProtectSystem={self.protect_system}, ReadWritePaths= {paths}"


def systemd_sandbox(unit: str = "linerec.service") -> UnitSandbox | None:
    """``systemctl show`` of the installed unit's ProtectSystem= and ReadWritePaths=; None
    where systemd cannot tell: no systemctl, systemd not running, the unit not installed."""
    try:
        result = subprocess.run(["systemctl", "show", "-p", "LoadState", "-p", "ProtectSystem",
                                 "-p", "ReadWritePaths", unit],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    values = dict(line.partition("=")[::2] for line in result.stdout.splitlines())
    if result.returncode != 0 or values.get("LoadState") != "loaded":
        return None
    # An entry may start with - (ignored when missing) or + (below RootDirectory=).
    return UnitSandbox(values.get("ProtectSystem", ""), tuple(
        Path(entry.lstrip("-+")) for entry in values.get("ReadWritePaths", "").split()))


def _below(path: Path, tops: Iterable[Path]) -> bool:
    """``path`` is one of ``tops`` or lies below one."""
    return any(path == top or top in path.parents for top in tops)


@dataclass(frozen=True)
class Options:
    """What the checks look for; the defaults are the appliance's."""

    user: str | None = None
    """The user whose rights are checked; None: the service user when run as root, else
    this process itself (the daemon, as systemd runs it)."""
    groups: tuple[str, ...] = SERVICE_GROUPS
    """The groups systemd adds to the service user's."""
    device_nodes: Mapping[str, str] = field(default_factory=lambda: dict(DEVICE_NODES))
    """Device node patterns the service opens, each with the group meant to give access."""
    clock_synchronised: Callable[[], bool | None] = system_clock_synchronised
    """Asks the kernel whether NTP has synchronised the clock (None: cannot tell)."""
    broker_timeout_s: float = BROKER_TIMEOUT_S
    unit_sandbox: Callable[[], UnitSandbox | None] = systemd_sandbox
    """Asks systemd where the installed unit may write (None: cannot tell)."""


@dataclass(frozen=True)
class _Finding:
    problem: str
    fix: str
    warning: bool = False


def _verdict(name: str, findings: list[_Finding], detail: str) -> Check:
    """A check's findings as one Check: failures first, then warnings."""
    findings = sorted(findings, key=lambda f: f.warning)
    fixes = list(dict.fromkeys(f.fix for f in findings if f.fix))
    return Check(name, ok=all(f.warning for f in findings),
                 problem="; ".join(f.problem for f in findings), fix="; ".join(fixes),
                 detail=detail)


# ---- the checks -------------------------------------------------------------------------


def check_alsa(config: Config, hat: Hat) -> Check:
    """Each ALSA device a line uses opens at the configured rate, channels and format, and
    closes again."""
    devices: list[tuple[str, str, str, Callable[[], _Closable]]] = [
        *((f"capture[{i}]", "arecord -L", capture.device,
           partial(hat.open_capture, capture, config.audio))
          for i, capture in enumerate(config.capture) if config.lines_on(capture)),
        *((f"playback[{i}]", "aplay -L", playback.device,
           partial(hat.open_playback, playback, config.audio))
          for i, playback in enumerate(config.playback) if config.lines_playing_on(playback))]
    findings: list[_Finding] = []
    opened = []
    for key, lister, device, open_device in devices:
        found = _open_and_close(key, lister, open_device)
        findings += found
        opened += [] if found else [device]
    return _verdict("alsa", findings, f"{', '.join(opened)} open at {config.audio.rate} Hz "
                    "with their channels and format")


class _Closable(Protocol):
    def close(self) -> None: ...


def _open_and_close(key: str, lister: str, open_device: Callable[[], _Closable]) -> list[_Finding]:
    try:
        open_device().close()
    except Exception as exc:  # the adapter's and alsa-lib's errors alike: all are findings
        message = str(exc)
        if "busy" in message.lower():
            fix = SERVICE_RUNNING
        elif "it must do" in message:
            fix = (f"correct {key}.channels (and [audio] rate) to what the device does, or "
                   f"set {key}.device to a plughw: device, which converts")
        else:
            fix = (f"set {key}.device to one of the names `{lister}` lists; is the HAT "
                   "seated and its overlay in /boot/firmware/config.txt?")
        return [_Finding(f"{key}.device: {message}", fix)]
    return []


def check_gpio(config: Config, hat: Hat) -> Check:
    """Each line's hook, ring, polarity and LED pin, and the service LED's, can be claimed;
    each is released again."""
    claims: tuple[tuple[str, Callable[[LineConfig], _Closable | None]], ...] = (
        ("hook_pin", hat.hook_sensor), ("ring_pin", hat.ring_sensor),
        ("polarity_pin", hat.polarity_sensor), ("led_pin", hat.recording_led))
    pins: list[tuple[str, int, Callable[[], _Closable | None]]] = [
        (f"line[{i}].{key}", getattr(line, key), partial(claim, line))
        for i, line in enumerate(config.line) for key, claim in claims
        if getattr(line, key) is not None]
    if config.service_led_pin is not None:
        pins.append(("service_led_pin", config.service_led_pin,
                     partial(hat.service_led, config.service_led_pin)))
    findings: list[_Finding] = []
    for key, pin, claim_pin in pins:
        try:
            device = claim_pin()
        except Exception as exc:  # gpiozero's pin factories raise their own errors
            what = str(exc) if isinstance(exc, HardwareError) else \
                f"GPIO {pin} cannot be used: {exc}"
            fix = SERVICE_RUNNING if "busy" in str(exc).lower() else (
                f"set {key} to the BCM GPIO number the HAT wires this input or LED to (0-27 "
                "on the 40-pin header; the HAT's documentation lists them)")
            findings.append(_Finding(f"{key}: {what}", fix))
            continue
        if device is not None:
            device.close()
    return _verdict("gpio", findings, f"{len(pins)} pin(s) claimed and released")


def check_disclosures(config: Config) -> Check:
    """Each disclosure decodes to line audio, parts and pauses within its max_s, as it
    would at a call."""
    library = DisclosureLibrary(config, config.audio.rate)
    findings: list[_Finding] = []
    played = []
    for i, disclosure in enumerate(config.disclosure):
        try:
            prepared = library.prepare(disclosure.name)
        except AudioFileError as exc:
            key, fix = f"disclosure[{i}].max_s", "shorten the disclosure or raise max_s"
            for j, path in enumerate(disclosure_files(disclosure)):
                if str(exc).startswith(f"{path}:"):
                    key = f"disclosure[{i}].parts[{j}].file"
                    fix = (f"record it as WAV or Ogg Opus (sox input.wav -r 8000 -b 16 -c 1 "
                           f"{path}) or correct the path; docs/CONFIG.md, 'Recording your "
                           "own disclosure'")
            findings.append(_Finding(f"{key}: {exc}", fix))
            continue
        played.append(f"{prepared.name} {len(prepared.audio) / config.audio.rate:.1f} s")
    return _verdict("disclosures", findings, f"decoded: {', '.join(played)}")


def check_storage_space(config: Config) -> Check:
    """The storage folder can be created and written to, and its disk has room: under the
    storage guard's floor fails (calls would not be recorded), under its low mark warns. A
    folder this check had to create is removed again: the daemon creates it as its own
    user."""
    storage = config.storage
    created = [folder for folder in (storage, *storage.parents) if not folder.exists()]
    try:
        check_storage(storage)
        free = shutil.disk_usage(storage).free
    except StorageError as exc:
        return Check("storage", False,
                     problem=f"storage = {storage} cannot be written to: {exc.__cause__ or exc}",
                     fix=f"set storage in {config.source} to a folder on a writable disk "
                     f"(the appliance's is {STATE_DIRECTORY}/recordings), or fix the folder's "
                     "owner and permissions")
    finally:
        for folder in created:  # deepest first; rmdir leaves anything with content alone
            with contextlib.suppress(OSError):
                folder.rmdir()
    guard = config.storage_guard
    make_room = ("make room on that disk: export and delete old calls (linerec recordings "
                 "export / delete), shorten [[purpose]] retention_days, or move storage to a "
                 "larger disk")
    if free < guard.floor_mb * MB:
        return Check("storage", False,
                     problem=f"storage = {storage}: only {free // MB} MB free, under "
                     f"storage_guard.floor_mb ({guard.floor_mb} MB): calls would not be "
                     "recorded", fix=make_room)
    if free < guard.low_mb * MB:
        return Check("storage", True,
                     problem=f"storage = {storage}: only {free // MB} MB free, under "
                     f"storage_guard.low_mb ({guard.low_mb} MB)", fix=make_room)
    return Check("storage", True, detail=f"{storage} writable, {free / 1e9:.1f} GB free")


def check_clock(clock_synchronised: Callable[[], bool | None]) -> Check:
    """NTP has synchronised the system clock: receipts and events carry its time. Cannot
    tell (no adjtimex) is a warning: receipts then say clock_synchronised null."""
    synchronised = clock_synchronised()
    if synchronised:
        return Check("clock", True, detail="the system clock is synchronised (NTP)")
    if synchronised is None:
        return Check("clock", True, problem="cannot tell whether the system clock is "
                     "synchronised (the kernel does not answer adjtimex)",
                     fix="check by hand: timedatectl shows 'System clock synchronized: yes'")
    return Check("clock", False, problem="the system clock is not synchronised (NTP): the "
                 "times in receipts and events may be wrong",
                 fix="enable NTP: timedatectl set-ntp true, and let the appliance reach an NTP "
                 "server (timedatectl timesync-status shows how it goes)")


def check_broker(config: Config, timeout_s: float = BROKER_TIMEOUT_S) -> Check:
    """The broker accepts a connection with the config's host, port, TLS and credentials,
    and lets linerec read and write its own topics."""
    mqtt = config.mqtt
    if mqtt is None:
        return Check("broker", True, detail="no [mqtt] table: events go to the journal only")
    from linerec.daemon.mqtt import probe_broker  # paho only where a broker is set

    base = f"{mqtt.topic_prefix}/{config.device_id}"
    outcome, said = probe_broker(mqtt, f"linerec-{config.device_id}-doctor", timeout_s,
                                 echo_topic=f"{base}/doctor")
    where = f"{mqtt.host}:{mqtt.port}"
    source = config.source
    who = f"user {mqtt.username!r}" if mqtt.username else "an anonymous connection"
    if outcome == "connected":
        tls = ", TLS" if mqtt.ca_file else ""
        return Check("broker", True, detail=f"{where} accepted {who} (MQTT {mqtt.protocol}{tls})")
    if outcome == "refused-credentials" and mqtt.username:
        problem = f"mqtt.username, mqtt.password: the broker {where} refused {who}: {said}"
        fix = (f"correct mqtt.username and mqtt.password in {source}, or give the broker "
               f"that user (mosquitto_passwd /etc/mosquitto/passwd {mqtt.username}) and "
               "the right to its topics (docs/MQTT.md)")
    elif outcome == "refused-credentials":
        problem = f"mqtt.username: the broker {where} refused {who}: {said}"
        fix = f"set mqtt.username and mqtt.password in {source} to a user of the broker"
    elif outcome == "no-echo":
        problem = (f"mqtt: {where} accepted {who}, but a message to {base}/doctor did not "
                   f"come back ({said}): the broker's ACL keeps linerec from reading or "
                   "writing its own topics, and events would wait in the outbox")
        fix = (f"let {who} read and write {base}/# in the broker's ACL "
               "(docs/MQTT.md)")
    elif outcome == "refused":
        problem = f"mqtt: the broker {where} refused the connection: {said}"
        fix = ('set mqtt.protocol = "3.1.1"' if "protocol" in said.lower()
               else "the broker's log says why")
    elif outcome == "no-listener":
        problem = f"mqtt.host, mqtt.port: nothing listens on {where} ({said})"
        fix = (f"start the broker (systemctl start mosquitto), or correct mqtt.host and "
               f"mqtt.port in {source}")
    elif outcome == "unknown-host":
        problem = f"mqtt.host: {mqtt.host!r} is not a known host name ({said})"
        fix = f"correct mqtt.host in {source}, or the appliance's DNS"
    elif outcome == "tls":
        problem = f"mqtt.ca_file: the TLS connection to {where} failed: {said}"
        fix = ("mqtt.ca_file must be the CA that signed the broker's certificate, and that "
               f"certificate must name {mqtt.host}; a broker that asks for a client "
               "certificate must trust mqtt.cert_file")
    elif outcome == "closed":
        problem = f"mqtt: {where} closed the connection before it answered ({said})"
        fix = ("does the broker expect TLS (set mqtt.ca_file) or a client certificate "
               "(mqtt.cert_file, mqtt.key_file)? Its log says why")
    else:  # no-answer, unreachable
        problem = f"mqtt.host: {where} cannot be reached: {said}"
        fix = (f"check mqtt.host and mqtt.port in {source}, the network and any firewall "
               "between the appliance and the broker")
    return Check("broker", False, problem=problem, fix=fix)


# ---- the service user's rights ------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    name: str
    uid: int
    gid: int
    """The primary group: the unit's Group=, which systemd gives its StateDirectory=."""
    gids: frozenset[int]
    service: bool
    """The service user as systemd runs it (else this process's own credentials)."""


def check_service_user(config: Config | None, options: Options | None = None) -> Check:
    """The user the daemon runs as exists, has the groups the unit gives it, and can open
    the device nodes, read the config, disclosure and certificate files and write the
    storage folder. Rights are worked out from owner, group and mode (ACLs are not read)."""
    options = options or Options()
    findings: list[_Finding] = []
    identity = _identity(options, findings)
    if identity is None:
        return _verdict("service-user", findings, "")
    nodes = 0
    for pattern, group in options.device_nodes.items():
        for node in sorted(glob.glob(pattern)):
            nodes += 1
            denied = _denied(identity, Path(node), _R | _W)
            if denied:
                findings.append(_Finding(
                    f"{node}: {denied}",
                    f"give the node to group {group} with read and write for the group (the "
                    f"udev rules of Raspberry Pi OS do): chgrp {group} {node} && chmod g+rw "
                    f"{node}, and a udev rule so that it lasts"))
    files = _files_read(config) if config is not None else []
    for key, path in files:
        denied = _denied(identity, path, _R)
        if denied:
            findings.append(_Finding(
                f"{key}: {denied}",
                f"let {identity.name} read it (chgrp {identity.name} FILE && chmod g+r FILE), "
                "and pass every folder above it (x)"))
    if config is not None:
        sandbox = cache(options.unit_sandbox)  # systemctl once, and only when needed
        findings += _folder_rights(identity, f"storage = {config.storage}", config.storage,
                                   STATE_DIRECTORY, sandbox, systemd_owns=True, warning=False)
        if Path(config.source).is_file():
            # config/set over MQTT saves the config beside itself (a new file, renamed).
            folder = Path(config.source).parent
            findings += _folder_rights(identity, f"the config's folder {folder} (settings "
                                       "changed over MQTT are saved there)", folder,
                                       CONFIGURATION_DIRECTORY, sandbox, systemd_owns=False,
                                       warning=True)
    detail = (f"{'the service user ' if identity.service else 'this process, as '}"
              f"{identity.name} (uid {identity.uid}) can use {nodes} device node(s) and read "
              f"{len(files)} file(s)" + (f", and write {config.storage}" if config else ""))
    return _verdict("service-user", findings, detail)


def _identity(options: Options, findings: list[_Finding]) -> _Identity | None:
    if options.user is None and os.geteuid() != 0:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return _Identity(name, uid, os.getegid(), frozenset({os.getegid(), *os.getgroups()}),
                         False)
    name = options.user or SERVICE_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        findings.append(_Finding(
            f"the service user {name!r} does not exist",
            f"create it: useradd --system --user-group --no-create-home --shell "
            f"/usr/sbin/nologin {name} (the appliance image does), or name the user the "
            "service runs as with --user"))
        return None
    gids = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)}
    for group in options.groups:
        try:
            gids.add(grp.getgrnam(group).gr_gid)
        except KeyError:
            findings.append(_Finding(
                f"group {group!r} does not exist: the unit gives the service the groups "
                f"{', '.join(options.groups)} (SupplementaryGroups=), and systemd does not "
                "start it without them",
                f"groupadd --system {group}, and give it the device nodes it stands for"))
    return _Identity(name, entry.pw_uid, entry.pw_gid, frozenset(gids), True)


def _files_read(config: Config) -> list[tuple[str, Path]]:
    """The files the daemon reads, each with the key that names it."""
    source = Path(config.source)
    files = [("config", source)] if source.is_file() else []
    if config.hat and config.hat not in hat_profiles():  # a profile file, not a shipped name
        # The loader reads it again at every start, relative to the config's folder.
        hat = Path(config.hat)
        files.append(("hat", hat if hat.is_absolute() else source.parent / hat))
    for i, disclosure in enumerate(config.disclosure):
        files += [(f"disclosure[{i}].parts[{j}].file", path)
                  for j, path in enumerate(disclosure_files(disclosure))]
    if config.mqtt is not None:
        files += [(f"mqtt.{key}", path) for key in ("ca_file", "cert_file", "key_file")
                  if (path := getattr(config.mqtt, key)) is not None]
    return files


def _folder_rights(identity: _Identity, what: str, folder: Path, unit_directory: Path,
                   sandbox: Callable[[], UnitSandbox | None], *, systemd_owns: bool,
                   warning: bool) -> list[_Finding]:
    """The folder (or the nearest one above it that exists, in which it will be created)
    takes new files from the user; and, for the service, lies where the unit's
    ProtectSystem=strict lets it write."""
    inside = _below(folder, [unit_directory])
    existing = next(above for above in (folder, *folder.parents) if above.exists())
    findings = []
    chowned = None
    if identity.service and inside and systemd_owns:
        if existing in unit_directory.parents:
            return []  # systemd creates the unit's directory as the user's, the daemon the rest
        # systemd changes the owner of what is in the directory only when the directory
        # itself is not the user's; else what is there keeps its owner and mode.
        info = unit_directory.stat()
        if (info.st_uid, info.st_gid) != (identity.uid, identity.gid):
            chowned = unit_directory
    denied = _denied(identity, existing, _W | _X, owned_below=chowned) if existing.is_dir() \
        else f"{existing} is not a folder"
    if denied:
        recursive = "-R " if existing == folder and systemd_owns else ""
        findings.append(_Finding(f"{what}: {denied}", f"chown {recursive}{identity.name}: "
                                 f"{existing}, or use a folder the user may write",
                                 warning=warning))
    if identity.service and not inside:
        findings += _sandboxed(what, folder, unit_directory, sandbox(), warning=warning)
    return findings


def _sandboxed(what: str, folder: Path, unit_directory: Path, sandbox: UnitSandbox | None, *,
               warning: bool) -> list[_Finding]:
    """A folder outside the unit's own directory. Where systemd answers, one its sandbox
    keeps read-only fails (only warns with ``warning``); where it cannot, a warning: the
    doctor cannot see drop-ins on its own."""
    fix = (f"systemctl edit linerec, add ReadWritePaths={folder} under [Service] (the folder "
           "must exist when the service starts) and systemctl restart linerec; or move it "
           f"below {unit_directory}")
    if sandbox is None:
        return [_Finding(
            f"{what}: outside {unit_directory}: under the unit's ProtectSystem=strict the "
            f"service will fail to write there unless a drop-in adds ReadWritePaths={folder} "
            "(whether one does, only a running systemd can tell)", fix, warning=True)]
    if sandbox.writable(folder):
        return []
    return [_Finding(f"{what}: outside {unit_directory}, and the unit as systemd has it "
                     f"({sandbox.describe()}) keeps it read-only: the service will fail to "
                     "write there", fix, warning=warning)]


def _denied(identity: _Identity, path: Path, want: int, *,
            owned_below: Path | None = None) -> str:
    """Why ``identity`` may not do ``want`` to ``path`` (and pass every folder above it), or
    an empty string when it may. What is in ``owned_below`` (and it) is taken as the user's:
    systemd will make it so."""
    steps = [*((folder, _X) for folder in reversed(path.parents)), (path, want)]
    for target, bits in steps:
        try:
            info = target.stat()
        except OSError as exc:
            return f"{target} cannot be looked at: {exc.strerror}"
        owned = owned_below is not None and _below(target, [owned_below])
        if not _allowed(identity, info, bits, owned=owned):
            verb = {_X: "pass through", _R: "read", _R | _W: "read and write",
                    _W | _X: "write in"}[bits]
            return f"{identity.name} may not {verb} {target} ({_describe(info)})"
    return ""


def _allowed(identity: _Identity, info: os.stat_result, want: int, *,
             owned: bool = False) -> bool:
    if identity.uid == 0:
        return True
    if owned or info.st_uid == identity.uid:
        granted = info.st_mode >> 6
    elif info.st_gid in identity.gids:
        granted = info.st_mode >> 3
    else:
        granted = info.st_mode
    return granted & want == want


def _describe(info: os.stat_result) -> str:
    def name(lookup: Callable[[int], Any], number: int) -> str:
        try:
            return str(lookup(number)[0])
        except KeyError:
            return str(number)

    return (f"owner {name(pwd.getpwuid, info.st_uid)}, group {name(grp.getgrgid, info.st_gid)}, "
            f"mode {stat.S_IMODE(info.st_mode):04o}")


# ---- running them -------------------------------------------------------------------------


def run_checks(config: Config, hat: Hat | None, *, only: Collection[str] = CHECKS,
               options: Options | None = None) -> list[Check]:
    """The checks named in ``only``, in CHECKS order, on a config that loaded. The devices
    are opened through ``hat`` (the real PiHat, or the simulated one); without one, the
    ALSA and GPIO checks are reported as not run."""
    options = options or Options()
    runs: dict[str, Callable[[], Check]] = {
        "config": lambda: Check("config", True, detail=f"{config.source}: "
                                f"{len(config.line)} line(s): "
                                f"{', '.join(line.name for line in config.line)}"),
        "alsa": lambda: check_alsa(config, hat) if hat else _not_run("alsa", "no HAT given"),
        "gpio": lambda: check_gpio(config, hat) if hat else _not_run("gpio", "no HAT given"),
        "disclosures": lambda: check_disclosures(config),
        "storage": lambda: check_storage_space(config),
        "clock": lambda: check_clock(options.clock_synchronised),
        "broker": lambda: check_broker(config, options.broker_timeout_s),
        "service-user": lambda: check_service_user(config, options),
    }
    return [_run(name, runs[name]) for name in CHECKS if name in only]


def startup_checks(config: Config) -> list[Check]:
    """The daemon's checks at start (STARTUP_CHECKS), as the process systemd started."""
    return run_checks(config, None, only=STARTUP_CHECKS)


def diagnose(path: Path, open_hat: Callable[[Config], Hat],
             options: Options | None = None) -> list[Check]:
    """``linerec doctor``: load the config, then run every check. A config that does not
    load is the failed config check; the checks that need no config still run."""
    options = options or Options()
    try:
        config = load_config(path)
    except ConfigError as exc:
        if exc.key == "(file)":
            fix = "pass the config file with --config FILE (default /etc/linerec/linerec.toml)"
        elif exc.key == "(syntax)":
            fix = f"correct the TOML at the line and column named in {exc.source}"
        else:
            fix = (f"correct {exc.key} in {exc.source} (docs/CONFIG.md); linerec "
                   "check-config checks it again")
        failed = Check("config", False, problem=str(exc), fix=fix)
        runs: dict[str, Callable[[], Check]] = {
            "clock": lambda: check_clock(options.clock_synchronised),
            "service-user": lambda: check_service_user(None, options),
        }
        return [failed, *(_run(name, runs[name]) if name in runs else
                          _not_run(name, "the config did not load") for name in CHECKS[1:])]
    hat = open_hat(config)
    try:
        return run_checks(config, hat, options=options)
    finally:
        hat.close()


def report(checks: list[Check]) -> str:
    """One line per check, then the count."""
    failed = [check for check in checks if not check.ok]
    last = (f"{len(failed)} of {len(checks)} checks did not pass" if failed
            else f"all {len(checks)} checks pass")
    return "\n".join([*(check.line() for check in checks), last])


def _run(name: str, run: Callable[[], Check]) -> Check:
    try:
        return run()
    except Exception as exc:  # a check that breaks must not hide the others
        logger.exception("the %s check failed", name)
        return Check(name, False, problem=f"the check itself failed: {exc!r}",
                     fix="report this as a bug in linerec")


def _not_run(name: str, why: str) -> Check:
    return Check(name, False, problem=f"not checked: {why}", skipped=True)
