"""`linerec doctor` on the simulated HAT (alsa-lib file PCMs, gpiozero's mock pins, a real
mosquitto with a password file): all checks pass on a good config, and each check broken
in turn names its problem while the others still run."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from simhelpers import free_port, sim_config, write_scenario
from test_mqtt import Broker, config_for, make_certificates

from linerec.daemon.config import load_config, packaged_disclosure
from linerec.daemon.doctor import (
    CHECKS,
    STARTUP_CHECKS,
    Options,
    UnitSandbox,
    check_alsa,
    check_clock,
    check_disclosures,
    check_gpio,
    check_service_user,
    run_checks,
    startup_checks,
    systemd_sandbox,
)
from linerec.hw.base import HardwareError
from linerec.hw.board import system_clock_synchronised
from linerec.hw.scenario import load_scenario
from linerec.hw.sim import SimulatedHat

ASOUNDRC = """
pcm.tap { type file slave.pcm "null" file "/dev/null" infile "/dev/zero" format "raw" }
pcm.out { type file slave.pcm "null" file "/dev/null" format "raw" }
pcm.two_channels { type multi slaves.a.pcm "null" slaves.a.channels 2
                   bindings.0.slave a bindings.0.channel 0 bindings.1.slave a bindings.1.channel 1 }
pcm.tap_two_channels { type file slave.pcm "two_channels" file "/dev/null" infile "/dev/zero"
                       format "raw" }
"""
"""The HAT's tap and line outputs as alsa-lib file PCMs; ``tap_two_channels`` grants two
channels whatever is asked (a `multi` slave), as a two-line codec would."""


@dataclass
class Appliance:
    """A folder every user may pass (the config and storage go there), the environment of
    the simulated HAT, and, run as root, a mount namespace in which the service user
    `linerec` (``uid``, ``gid``) and the groups `audio` and `gpio` exist (this machine's
    /etc/passwd and /etc/group stay as they are): ``binds``, which a test may add to."""

    folder: Path
    env: dict[str, str]
    binds: dict[str, Path] = field(default_factory=dict)
    """Each path of this machine the doctor sees, with the file or folder it sees there."""
    uid: int = -1
    gid: int = -1

    @property
    def prefix(self) -> list[str]:
        return _mounted(self.binds) if self.binds else []

    def config(self, broker: Broker | None = None, **options: Any) -> Path:
        path = config_for(self.folder, broker, **options) if broker else sim_config(self.folder)
        # The disclosure from the folder, not from the source tree: a clone in /root (0700)
        # would be a folder the service user may not pass, on an appliance too.
        notice = self.folder / "notice-en.wav"
        shutil.copy(packaged_disclosure("en"), notice)
        notice.chmod(0o644)
        path.write_text(path.read_text().replace('"hw:CARD=tapHAT"', '"tap"')
                        .replace('"plughw:CARD=tapHAT"', '"out"')
                        .replace(f'"{packaged_disclosure("en")}"', f'"{notice}"'))
        return path

    def doctor(self, config: Path, *args: str) -> tuple[int, dict[str, str], str]:
        """Exit status, each check's output line by name, and all of stdout."""
        result = subprocess.run([*self.prefix, sys.executable, "-m", "linerec.daemon.cli",
                                 "doctor", "--config", str(config), *args], env=self.env,
                                capture_output=True, text=True, timeout=90, check=False)
        assert "Traceback" not in result.stderr, result.stderr
        lines = {}
        for line in result.stdout.splitlines()[:-1]:
            rest = line.split(maxsplit=1)[1]
            lines[rest.split(":", 1)[0]] = line
        assert list(lines) == list(CHECKS), result.stdout  # every check ran, in order
        return result.returncode, lines, result.stdout


def _made_up_users(folder: Path) -> tuple[dict[str, Path], int, int]:
    """/etc/passwd and /etc/group with the service user and its groups added where missing;
    the binds that show them to the doctor, and the service user's uid and gid."""
    passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
    try:
        uid, gid = pwd.getpwnam("linerec")[2:4]
    except KeyError:
        uid = gid = next(n for n in range(990, 900, -1) if not _taken(n))
        passwd += f"linerec:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n"
        group += f"linerec:x:{uid}:\n"
    added: set[int] = set()
    for name in ("audio", "gpio"):
        try:
            grp.getgrnam(name)
        except KeyError:
            number = next(n for n in range(899, 800, -1) if not _taken(n) and n not in added)
            added.add(number)
            group += f"{name}:x:{number}:\n"
    (folder / "passwd").write_text(passwd)
    (folder / "group").write_text(group)
    binds = {"/etc/passwd": folder / "passwd", "/etc/group": folder / "group"}
    probe = subprocess.run([*_mounted(binds), "id", "linerec"], capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace for a made-up service user: {probe.stderr.strip()}")
    return binds, uid, gid


def _mounted(binds: Mapping[str, Path]) -> list[str]:
    """The command prefix that runs a command in a mount namespace of its own, with each
    path of ``binds`` bind-mounted from what it maps to."""
    mounts = "".join(f'mount --bind "${i}" {target} && ' for i, target in enumerate(binds, 1))
    return ["unshare", "--mount", "sh", "-c", f'{mounts}shift {len(binds)} && exec "$@"', "sh",
            *map(str, binds.values())]


def _taken(number: int) -> bool:
    try:
        pwd.getpwuid(number)
    except KeyError:
        try:
            grp.getgrgid(number)
        except KeyError:
            return False
    return True


@pytest.fixture
def appliance() -> Iterator[Appliance]:
    folder = Path(tempfile.mkdtemp(prefix="linerec-doctor-"))
    try:
        folder.chmod(0o755)
        asoundrc = folder / "asoundrc"
        asoundrc.write_text(ASOUNDRC)
        env = {**os.environ, "ALSA_CONFIG_PATH": f"/usr/share/alsa/alsa.conf:{asoundrc}",
               "GPIOZERO_PIN_FACTORY": "mock"}
        env.pop("JOURNAL_STREAM", None)
        appliance = Appliance(folder, env)
        if os.geteuid() == 0:
            # As root the doctor checks the service user: it must exist, with its storage.
            appliance.binds, appliance.uid, appliance.gid = _made_up_users(folder)
            (folder / "recordings").mkdir(mode=0o750)
            os.chown(folder / "recordings", appliance.uid, appliance.gid)
        yield appliance
    finally:
        shutil.rmtree(folder)


@contextmanager
def running(folder: Path, tls: dict[str, Path] | None = None) -> Iterator[Broker]:
    """test_mqtt's mosquitto, with its password file and ACL, in a folder of its own."""
    folder.mkdir()
    broker = Broker(folder, tls=tls)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def broker(appliance: Appliance) -> Iterator[Broker]:
    with running(appliance.folder / "broker") as broker:
        yield broker


def failed(lines: dict[str, str]) -> list[str]:
    return [name for name, line in lines.items() if line.startswith(("FAIL", "SKIP"))]


def only(check: str) -> list[str]:
    """What fails when only ``check`` is broken: it, and the clock where this machine's
    is not synchronised."""
    unsynchronised = system_clock_synchronised() is False
    return [name for name in CHECKS if name == check or (name == "clock" and unsynchronised)]


def test_all_checks_pass_on_the_simulated_hat(appliance: Appliance, broker: Broker) -> None:
    """Exit 0 only when all pass. The clock is this machine's: adjtimex cannot be faked
    without changing the shared kernel clock, so where it is not synchronised the clock
    alone fails (and the exit status is 1); test_clock_check covers both answers."""
    status, lines, out = appliance.doctor(appliance.config(broker))
    clock = system_clock_synchronised()
    assert failed(lines) == ([] if clock is not False else ["clock"]), out
    assert status == (0 if clock is not False else 1), out
    assert "tap, out open at 8000 Hz" in lines["alsa"]
    assert "6 pin(s) claimed and released" in lines["gpio"]
    assert "user 'linerec' (MQTT 3.1.1)" in lines["broker"]
    assert out.splitlines()[-1] == ("all 8 checks pass" if clock is not False
                                    else "1 of 8 checks did not pass")
    if os.geteuid() == 0:
        # Storage outside /var/lib/linerec is read-only to the unit: a warning, it passes.
        assert lines["service-user"].startswith("WARN service-user: storage = ")
        assert "ProtectSystem=strict" in lines["service-user"]


def test_a_config_that_does_not_load_fails_and_what_needs_none_still_runs(
        appliance: Appliance) -> None:
    config = appliance.config()
    config.write_text(config.read_text() + "\n[audio\nrate = 8000\n")
    status, lines, out = appliance.doctor(config)
    assert status == 1
    assert lines["config"].startswith(f"FAIL config: {config}: (syntax): not valid TOML")
    assert "fix: correct the TOML" in lines["config"]
    assert not lines["service-user"].startswith(("FAIL", "SKIP")), out
    assert lines["clock"].startswith(("OK", "WARN", "FAIL clock: the system clock"))
    for name in ("alsa", "gpio", "disclosures", "storage", "broker"):
        assert lines[name] == f"SKIP {name}: not checked: the config did not load"

    config.write_text(config.read_text().replace("\n[audio\nrate = 8000\n", "")
                      .replace("hook_pin = 23", "hook_pinn = 23"))
    status, lines, out = appliance.doctor(config)
    assert status == 1
    assert f"FAIL config: {config}: line[1].hook_pinn: unknown key" in lines["config"]
    assert f"fix: correct line[1].hook_pinn in {config}" in lines["config"]


@pytest.mark.parametrize(("old", "new", "check", "problem", "fix"), [
    pytest.param('device = "tap"', 'device = "linerec_no_such_pcm"', "alsa",
                 "capture[0].device: ALSA device 'linerec_no_such_pcm' (capture 'tap') cannot "
                 "be opened", "set capture[0].device to one of the names `arecord -L` lists",
                 id="alsa-device-missing"),
    pytest.param('device = "tap"\nchannels = 2', 'device = "tap_two_channels"\nchannels = 3',
                 "alsa", "capture[0].device: ALSA device 'tap_two_channels' (capture 'tap') gave "
                 "8000 Hz, 2 channel(s), S16_LE; it must do 8000 Hz, 3 channel(s)",
                 "correct capture[0].channels", id="alsa-channels"),
    # gpiozero's mock board (a Pi 3B header) refuses BCM 28-53 (and 2 and 3, whose fixed
    # pull-ups a floating input cannot have).
    pytest.param("ring_pin = 24", "ring_pin = 40", "gpio", "line[1].ring_pin: GPIO 40 (line2 "
                 "ring) cannot be used: 40 is not a valid pin name",
                 "set line[1].ring_pin to the BCM GPIO number", id="gpio-pin-not-on-the-board"),
    pytest.param('device_id = "office"', 'device_id = "office"\nservice_led_pin = 41', "gpio",
                 "service_led_pin: GPIO 41 (service LED) cannot be used",
                 "set service_led_pin to the BCM GPIO number", id="gpio-service-led"),
])
def test_a_device_or_pin_that_does_not_work_is_named(appliance: Appliance, old: str, new: str,
                                                     check: str, problem: str,
                                                     fix: str) -> None:
    config = appliance.config()
    config.write_text(config.read_text().replace(old, new))
    status, lines, out = appliance.doctor(config)
    assert status == 1
    assert failed(lines) == only(check), out
    assert lines[check].startswith(f"FAIL {check}: {problem}")
    assert f"fix: {fix}" in lines[check]


def test_an_unplayable_disclosure_is_named(appliance: Appliance, tmp_path: Path) -> None:
    """The config loader decodes every disclosure already, so a config naming a file that
    is not audio fails as the config, naming the part."""
    notice = appliance.folder / "notice.wav"
    notice.write_text("this is not audio\n")
    config = appliance.config()
    config.write_text(config.read_text().replace(
        'file = "', f'file = "{notice}" }}]\n#', 1))
    status, lines, _ = appliance.doctor(config)
    assert status == 1
    assert f"FAIL config: {config}: disclosure[0].parts[0].file: {notice}" in lines["config"]
    assert "fix: correct disclosure[0].parts[0].file" in lines["config"]


def test_the_disclosure_check_decodes_again_what_the_loader_saw(tmp_path: Path) -> None:
    """A file replaced after the config loaded (the daemon's start-up check sees this)."""
    notice = tmp_path / "notice.wav"
    shutil.copy(load_config(sim_config(tmp_path)).disclosure[0].parts[0].file or "", notice)
    config = load_config(sim_config(tmp_path, disclosure=notice))
    assert check_disclosures(config).ok
    notice.write_bytes(b"RIFF....WAVEjunk")
    check = check_disclosures(config)
    assert not check.ok
    assert check.problem.startswith(f"disclosure[0].parts[0].file: {notice}: ")
    assert "sox input.wav -r 8000 -b 16 -c 1" in check.fix


@pytest.mark.parametrize("where", ["file", "proc"])
def test_storage_that_cannot_be_written_is_named(appliance: Appliance, where: str) -> None:
    """Root passes every permission check, so: a folder under a regular file, or in /proc."""
    if where == "file":
        (appliance.folder / "a-file").write_text("")
        storage = appliance.folder / "a-file" / "recordings"
    else:
        storage = Path("/proc/linerec-recordings")
    config = appliance.config()
    config.write_text(config.read_text().replace(f'storage = "{appliance.folder / "recordings"}"',
                                                 f'storage = "{storage}"'))
    status, lines, out = appliance.doctor(config)
    assert status == 1
    assert lines["storage"].startswith(f"FAIL storage: storage = {storage} cannot be written to")
    assert f"fix: set storage in {config} to a folder on a writable disk" in lines["storage"]
    # The others ran; only the service user's rights on that folder fail with it.
    assert set(failed(lines)) - {"clock", "service-user"} == {"storage"}, out
    assert not storage.exists()


def test_storage_with_too_little_free_space_is_named(tmp_path: Path) -> None:
    """Under the storage guard's floor fails, under its low mark warns."""
    above = 10_000_000  # MB: more than this disk has free
    config = load_config(sim_config(
        tmp_path, extra=f"[storage_guard]\nlow_mb = {above}\nfloor_mb = {above}\n"))
    [check] = run_checks(config, None, only=["storage"])
    assert not check.ok
    assert check.problem.startswith(f"storage = {config.storage}: only ")
    assert f"under storage_guard.floor_mb ({above} MB): calls would not be recorded" in \
        check.problem
    assert "export and delete old calls" in check.fix
    config = load_config(sim_config(
        tmp_path, extra=f"[storage_guard]\nlow_mb = {above}\nfloor_mb = 0\n"))
    [check] = run_checks(config, None, only=["storage"])
    assert check.ok and check.status == "WARN"
    assert f"under storage_guard.low_mb ({above} MB)" in check.problem


def test_a_broker_that_is_not_there_is_named(appliance: Appliance) -> None:
    config = appliance.config()
    port = free_port()
    config.write_text(config.read_text() + f'\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n')
    status, lines, out = appliance.doctor(config)
    assert status == 1
    assert failed(lines) == only("broker"), out
    assert lines["broker"].startswith(
        f"FAIL broker: mqtt.host, mqtt.port: nothing listens on 127.0.0.1:{port}")
    assert "fix: start the broker (systemctl start mosquitto)" in lines["broker"]


def test_a_broker_refusing_the_password_is_named(appliance: Appliance, broker: Broker) -> None:
    config = appliance.config(broker, password="not-the-secret")  # noqa: S106
    status, lines, out = appliance.doctor(config)
    assert status == 1
    assert failed(lines) == only("broker"), out
    assert lines["broker"].startswith(f"FAIL broker: mqtt.username, mqtt.password: the broker "
                                      f"127.0.0.1:{broker.port} refused user 'linerec'")
    assert f"fix: correct mqtt.username and mqtt.password in {config}" in lines["broker"]
    assert "not-the-secret" not in out  # the password is never printed


def test_a_broker_acl_that_lets_linerec_write_but_not_read_its_topics_is_named(
        appliance: Appliance, broker: Broker) -> None:
    """Over MQTT 3.1.1 an event counts as delivered once it comes back on linerec's own
    subscription: with write but no read, every event would wait in the outbox."""
    acl = broker.folder / "acl"
    acl.write_text(acl.read_text().replace("topic readwrite linerec/office/#",
                                           "topic write linerec/office/#"))
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)  # mosquitto reads its ACL again
    time.sleep(0.5)
    status, lines, out = appliance.doctor(appliance.config(broker))
    assert status == 1
    assert failed(lines) == only("broker"), out
    assert lines["broker"].startswith(
        f"FAIL broker: mqtt: 127.0.0.1:{broker.port} accepted user 'linerec', but a message "
        "to linerec/office/doctor did not come back"), out
    assert "fix: let user 'linerec' read and write linerec/office/# in the broker's ACL" \
        in lines["broker"]


def test_a_broker_certificate_from_another_ca_is_named(appliance: Appliance) -> None:
    ours, theirs = appliance.folder / "ours", appliance.folder / "theirs"
    ours.mkdir()
    theirs.mkdir()
    tls = make_certificates(ours)
    with running(appliance.folder / "tls-broker", tls) as broker:
        config = appliance.config(broker, tls={**tls, "ca": make_certificates(theirs)["ca"]})
        status, lines, out = appliance.doctor(config)
    assert status == 1
    assert lines["broker"].startswith(f"FAIL broker: mqtt.ca_file: the TLS connection to "
                                      f"127.0.0.1:{broker.port} failed: self-signed "
                                      "certificate in certificate chain"), out
    assert "fix: mqtt.ca_file must be the CA that signed the broker's certificate" in out


def test_a_service_user_that_does_not_exist_is_named(appliance: Appliance) -> None:
    status, lines, out = appliance.doctor(appliance.config(), "--user",
                                          "linerec-no-such-user")
    assert status == 1
    assert failed(lines) == only("service-user"), out
    assert lines["service-user"].startswith(
        "FAIL service-user: the service user 'linerec-no-such-user' does not exist")
    assert "fix: create it: useradd --system" in lines["service-user"]


def test_json_output_carries_the_same_verdicts(appliance: Appliance) -> None:
    config = appliance.config()
    config.write_text(config.read_text().replace("ring_pin = 24", "ring_pin = 40"))
    result = subprocess.run([*appliance.prefix, sys.executable, "-m", "linerec.daemon.cli",
                             "doctor", "--config", str(config), "--json"], env=appliance.env,
                            capture_output=True, text=True, timeout=90, check=False)
    assert result.returncode == 1
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    assert list(checks) == list(CHECKS)
    assert checks["gpio"]["status"] == "fail" and not checks["gpio"]["ok"]
    assert checks["gpio"]["problem"].startswith("line[1].ring_pin: GPIO 40")
    assert checks["alsa"]["status"] == "ok" and checks["alsa"]["problem"] is None


def test_clock_check() -> None:
    """The clock cannot be unsynchronised for real without changing this shared machine's
    kernel clock: the check is given the kernel's answer instead (the hardware edge)."""
    check = check_clock(lambda: False)
    assert not check.ok and check.status == "FAIL"
    assert check.problem.startswith("the system clock is not synchronised (NTP)")
    assert check.fix.startswith("enable NTP: timedatectl set-ntp true")
    cannot_tell = check_clock(lambda: None)
    assert cannot_tell.ok and cannot_tell.status == "WARN"
    assert check_clock(lambda: True).line() == \
        "OK   clock: the system clock is synchronised (NTP)"


def test_a_device_node_the_service_user_cannot_open_is_named(appliance: Appliance) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this machine")
    node = appliance.folder / "pcmC0D0c"
    if os.geteuid() == 0:
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(116, 24))
    else:
        node.touch(mode=0o600)
    check = check_service_user(None, Options(user="nobody", groups=(),
                                             device_nodes={str(node): "audio"}))
    assert not check.ok
    assert check.problem.startswith(f"{node}: nobody may not read and write {node} (owner ")
    assert check.problem.endswith("mode 0600)")
    assert f"chgrp audio {node} && chmod g+rw {node}" in check.fix
    assert nobody.pw_uid != os.geteuid()


def test_a_missing_group_of_the_unit_is_named(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    check = check_service_user(None, Options(user=me, groups=("linerec-no-such-group",),
                                             device_nodes={}))
    assert not check.ok
    assert check.problem.startswith("group 'linerec-no-such-group' does not exist: the unit "
                                    "gives the service the groups")



@pytest.mark.parametrize(("state", "recordings", "denied"), [
    pytest.param("linerec", "root", True, id="root-owned-recordings"),
    pytest.param("linerec", None, False, id="recordings-not-there-yet"),
    pytest.param(None, None, False, id="state-directory-not-there-yet"),
    pytest.param("root", "root", False, id="state-directory-not-yet-the-users"),
])
def test_storage_below_the_state_directory_is_checked_as_systemd_leaves_it(
        appliance: Appliance, state: str | None, recordings: str | None, denied: bool) -> None:
    """systemd makes /var/lib/linerec (StateDirectory=) the service user's, and what is in
    it only when the folder itself was not the user's: a root-owned 0700 recordings/ in a
    folder that already is stays out of the service's reach (its start-up check says "not
    writable"). The doctor sees a /var/lib of the test's own, in its mount namespace."""
    if os.geteuid() != 0:
        pytest.skip("needs root: folders of another owner, and a mount namespace")
    var_lib = appliance.folder / "var-lib"
    var_lib.mkdir(mode=0o755)
    if state is not None:
        (var_lib / "linerec").mkdir(mode=0o755)
        if state == "linerec":
            os.chown(var_lib / "linerec", appliance.uid, appliance.gid)
    if recordings is not None:
        (var_lib / "linerec" / "recordings").mkdir(mode=0o700)  # e.g. sudo linerec ...
    appliance.binds["/var/lib"] = var_lib
    storage = "/var/lib/linerec/recordings"
    config = appliance.config()
    config.write_text(config.read_text().replace(f'storage = "{appliance.folder / "recordings"}"',
                                                 f'storage = "{storage}"'))
    status, lines, out = appliance.doctor(config)
    if denied:
        assert status == 1
        assert failed(lines) == only("service-user"), out
        assert lines["service-user"].startswith(
            f"FAIL service-user: storage = {storage}: linerec may not write in {storage} "
            "(owner root, group root, mode 0700)")
        assert f"fix: chown -R linerec: {storage}," in lines["service-user"]
    else:
        assert failed(lines) == only(""), out
        assert "storage =" not in lines["service-user"]  # the config's folder still warns
    assert (var_lib / "linerec" / "recordings").exists() == (recordings is not None)


@pytest.mark.parametrize("hat", ["my-hat.toml", "absolute"])
def test_a_hat_profile_file_the_service_user_cannot_read_is_named(appliance: Appliance,
                                                                  hat: str) -> None:
    """The loader reads a profile file named by `hat` at every start, as the service user;
    a shipped profile's name is no file of the config's."""
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this machine")
    profile = appliance.folder / "my-hat.toml"
    profile.write_text('description = "the installer\'s own HAT"\n')
    profile.chmod(0o600)
    config_file = appliance.config()
    named = str(profile) if hat == "absolute" else hat
    config_file.write_text(f'hat = "{named}"\n' + config_file.read_text())
    options = Options(user="nobody", groups=(), device_nodes={}, unit_sandbox=lambda: None)
    check = check_service_user(load_config(config_file), options)
    assert not check.ok
    assert check.problem.startswith(f"hat: nobody may not read {profile} (owner ")
    assert "mode 0600)" in check.problem
    assert "let nobody read it (chgrp nobody FILE && chmod g+r FILE)" in check.fix
    profile.chmod(0o644)
    assert "hat:" not in check_service_user(load_config(config_file), options).problem
    config_file.write_text(config_file.read_text().replace(named, "generic-2line"))
    check = check_service_user(load_config(config_file), options)
    assert "hat:" not in check.problem and "read 2 file(s)" in check.detail


def test_storage_outside_the_state_directory_is_judged_by_the_units_sandbox(
        tmp_path: Path) -> None:
    """Where systemd answers, storage its sandbox keeps read-only fails (the config's
    folder warns); where it cannot, both warn that the service will fail to write there
    unless a drop-in adds ReadWritePaths=."""
    config = load_config(sim_config(tmp_path))
    storage = config.storage
    me = pwd.getpwuid(os.geteuid()).pw_name

    def check(sandbox: UnitSandbox | None) -> Any:
        return check_service_user(config, Options(user=me, groups=(), device_nodes={},
                                                  unit_sandbox=lambda: sandbox))

    cannot_tell = check(None)
    assert cannot_tell.status == "WARN"
    assert cannot_tell.problem.startswith(
        f"storage = {storage}: outside /var/lib/linerec: under the unit's ProtectSystem=strict "
        f"the service will fail to write there unless a drop-in adds ReadWritePaths={storage}")
    assert f"the config's folder {tmp_path} (settings changed over MQTT are saved there): " \
        "outside /etc/linerec: " in cannot_tell.problem
    assert cannot_tell.fix.startswith(f"systemctl edit linerec, add ReadWritePaths={storage} "
                                      "under [Service]")
    read_only = check(UnitSandbox("strict", (Path("/srv/calls"),)))
    assert read_only.status == "FAIL"
    assert read_only.problem.startswith(
        f"storage = {storage}: outside /var/lib/linerec, and the unit as systemd has it "
        "(ProtectSystem=strict, ReadWritePaths= /srv/calls) keeps it read-only: the service "
        "will fail to write there; the config's folder")
    assert check(UnitSandbox("strict", (tmp_path,))).line().startswith("OK   service-user:")
    assert check(UnitSandbox("full", ())).status == "OK"  # a drop-in loosened it
    assert UnitSandbox("full", ()).writable(Path("/etc/linerec")) is False


def test_systemd_is_asked_for_the_units_sandbox(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What `systemctl show` says of the installed unit, drop-ins included; nothing where
    systemd does not answer or has no such unit. systemctl stands in for systemd, which
    does not run here."""
    systemctl = tmp_path / "systemctl"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    answers = {"loaded": "LoadState=loaded\nProtectSystem=strict\n"
               "ReadWritePaths=-/srv/calls /mnt/usb\n",
               "not-found": "LoadState=not-found\nProtectSystem=no\nReadWritePaths=\n"}
    for state, answer in answers.items():
        systemctl.write_text(f"#!/bin/sh\nprintf '{answer}'\n")
        systemctl.chmod(0o755)
        sandbox = systemd_sandbox()
        assert sandbox == (UnitSandbox("strict", (Path("/srv/calls"), Path("/mnt/usb")))
                           if state == "loaded" else None)
    systemctl.write_text("#!/bin/sh\necho 'System has not been booted with systemd' >&2\n"
                         "exit 1\n")
    assert systemd_sandbox() is None
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert systemd_sandbox() is None


class BusyHat:
    """The real HAT's devices while the service holds them (the hardware edge)."""

    def open_capture(self, capture: Any, audio: Any) -> Any:
        raise HardwareError(f"ALSA device {capture.device!r} (capture {capture.name!r}) cannot "
                            "be opened: Device or resource busy [hw:CARD=tapHAT]")

    def open_playback(self, playback: Any, audio: Any) -> Any:
        raise HardwareError(f"ALSA device {playback.device!r} (playback {playback.name!r}) "
                            "cannot be opened: Device or resource busy [plughw:CARD=tapHAT]")

    def _busy(self, line: Any) -> Any:
        raise OSError("GPIO busy")  # lgpio's error, which gpiozero does not wrap

    hook_sensor = ring_sensor = polarity_sensor = recording_led = service_led = _busy


def test_devices_in_use_say_the_service_may_be_running(tmp_path: Path) -> None:
    config = load_config(sim_config(tmp_path))
    alsa = check_alsa(config, BusyHat())  # type: ignore[arg-type]
    assert alsa.problem.startswith("capture[0].device: ALSA device 'hw:CARD=tapHAT' (capture "
                                   "'tap') cannot be opened: Device or resource busy")
    assert "; playback[0].device: " in alsa.problem
    assert alsa.fix.startswith("in use: is the linerec service running? Stop it first "
                               "(systemctl stop linerec)")
    gpio = check_gpio(config, BusyHat())  # type: ignore[arg-type]
    assert gpio.problem.startswith("line[0].hook_pin: GPIO 17 cannot be used: GPIO busy")
    assert gpio.fix == alsa.fix


def test_run_checks_on_the_simulated_hat_object_all_pass(tmp_path: Path) -> None:
    """The same checks through the simulator's Hat, in this process, with a synchronised
    clock: every one passes (warnings pass)."""
    config = load_config(sim_config(tmp_path))
    scenario = load_scenario(write_scenario(tmp_path, "", 1.0),
                             [line.name for line in config.line])
    hat = SimulatedHat(config, scenario, workdir=tmp_path / "work")
    me = pwd.getpwuid(os.geteuid()).pw_name
    try:
        checks = run_checks(config, hat, options=Options(
            user=me, groups=(), clock_synchronised=lambda: True))
    finally:
        hat.close()
    assert [check.name for check in checks] == list(CHECKS)
    assert all(check.ok for check in checks), [c.line() for c in checks if not c.ok]


def test_startup_checks_are_the_ones_without_devices(tmp_path: Path) -> None:
    config = load_config(sim_config(tmp_path))
    checks = startup_checks(config)
    assert [check.name for check in checks] == list(STARTUP_CHECKS)
    by_name = {check.name: check for check in checks}
    assert by_name["disclosures"].ok and by_name["storage"].ok
    assert not (tmp_path / "recordings").exists()  # created to test, removed again
