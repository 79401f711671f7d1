"""The Debian package's and the image's own files, checked on this machine in seconds; the
package built and installed into a Debian root is scripts/check-package (make check-package)."""

from __future__ import annotations

import grp
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINEREC = Path(sys.executable).parent / "linerec"
EXAMPLE = REPO / "packaging" / "linerec.example.toml"
IMPORT = REPO / "packaging" / "import-boot-config"
STAGE_FILES = REPO / "image" / "stage-linerec" / "01-appliance" / "files"


def run(*command: str | Path, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          check=False, env=None if env is None else {**os.environ, **env})


def test_the_example_config_passes_check_config() -> None:
    result = run(LINEREC, "check-config", EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert 'storage = "/var/lib/linerec/recordings"' in EXAMPLE.read_text()


@pytest.mark.parametrize("gpio_exists", [False, True], ids=["debian", "raspberry-pi-os"])
def test_sysusers_makes_the_service_user_in_audio_and_gpio(tmp_path: Path,
                                                           gpio_exists: bool) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\naudio:x:29:\n"
                               + ("gpio:x:997:admin\n" if gpio_exists else ""))
    for _ in range(2):  # an upgrade runs it again
        result = run("systemd-sysusers", f"--root={tmp_path}", REPO / "systemd/linerec.sysusers")
        assert result.returncode == 0, result.stderr
    users = [line.split(":") for line in (etc / "passwd").read_text().splitlines()]
    (linerec,) = [u for u in users if u[0] == "linerec"]
    assert linerec[5:] == ["/var/lib/linerec", "/usr/sbin/nologin"]
    groups = {line.split(":")[0]: line.split(":") for line in
              (etc / "group").read_text().splitlines()}
    assert set(groups) == {"root", "audio", "gpio", "linerec"}
    assert groups["audio"][3] == "linerec"
    assert "linerec" in groups["gpio"][3].split(",")
    if gpio_exists:
        assert groups["gpio"][2] == "997" and "admin" in groups["gpio"][3].split(",")


def unit_with_exec(tmp_path: Path, unit: Path, executable: Path) -> Path:
    """The unit with its ExecStart pointed at the file in this tree (verify wants it to exist)."""
    text = unit.read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    copy = tmp_path / unit.name
    copy.write_text(text.replace(line, f"ExecStart={executable}"))
    return copy


@pytest.mark.parametrize("unit, executable", [
    (REPO / "packaging/linerec-firstboot.service", IMPORT),
    (STAGE_FILES / "linerec-data.service", STAGE_FILES / "linerec-data-setup"),
], ids=["linerec-firstboot", "linerec-data"])
def test_the_added_units_verify(tmp_path: Path, unit: Path, executable: Path) -> None:
    result = run("systemd-analyze", "verify", unit_with_exec(tmp_path, unit, executable))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_in_the_image_the_import_requires_the_data_partition(tmp_path: Path) -> None:
    """The image's drop-in: without linerec-data.service the import does not run (it would
    import into the RAM overlay, delete the source and lose the config at the next boot)."""
    unit = unit_with_exec(tmp_path, REPO / "packaging/linerec-firstboot.service", IMPORT)
    drop_in = tmp_path / "linerec-firstboot.service.d" / "data-partition.conf"
    drop_in.parent.mkdir()
    drop_in.write_text((STAGE_FILES / "linerec-data.conf").read_text())
    result = run("systemd-analyze", "verify", unit)
    assert result.returncode != 0 and "linerec-data.service not found" in result.stderr
    unit_with_exec(tmp_path, STAGE_FILES / "linerec-data.service",
                   STAGE_FILES / "linerec-data-setup")
    result = run("systemd-analyze", "verify", unit)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    stage_run = (STAGE_FILES.parent / "01-run.sh").read_text()
    assert "for unit in linerec.service linerec-firstboot.service; do" in stage_run
    assert '"${ROOTFS_DIR}/etc/systemd/system/${unit}.d/data-partition.conf"' in stage_run


WAV = (REPO / "audio/disclosures/en.wav").read_bytes()
OTHER_WAV = (REPO / "audio/disclosures/nl.wav").read_bytes()


def with_disclosure_file(config: str, file: str) -> str:
    text = config.replace('parts = [{ language = "nl" }, { language = "en" }]',
                          f'parts = [{{ language = "en", file = "{file}" }}]')
    assert f'file = "{file}"' in text
    return text


def run_import(tmp_path: Path, command: Path = LINEREC) -> subprocess.CompletedProcess[str]:
    """import-boot-config on tmp_path/boot and tmp_path/etc, staging in tmp_path/run (the
    unit's RuntimeDirectory=)."""
    (tmp_path / "run").mkdir(mode=0o700, exist_ok=True)
    return run(IMPORT, env={
        "LINEREC_BOOT_DIR": str(tmp_path / "boot"), "LINEREC_CONFIG_DIR": str(tmp_path / "etc"),
        "LINEREC_COMMAND": str(command), "LINEREC_GROUP": grp.getgrgid(os.getgid()).gr_name,
        "RUNTIME_DIRECTORY": str(tmp_path / "run")})


def boot_import(tmp_path: Path, config: str, media: dict[str, bytes] | None = None,
                command: Path = LINEREC) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    boot, etc = tmp_path / "boot", tmp_path / "etc"
    boot.mkdir(exist_ok=True)
    etc.mkdir(exist_ok=True)
    (boot / "linerec.toml").write_text(config)
    for name, data in (media or {}).items():
        (boot / "linerec" / name).parent.mkdir(parents=True, exist_ok=True)
        (boot / "linerec" / name).write_bytes(data)
    # As Raspberry Pi OS mounts the FAT boot partition: everything 0755, for every user.
    for path in [boot, *boot.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)
    return run_import(tmp_path, command), boot, etc


def assert_nothing_left_over(tmp_path: Path) -> None:
    assert [p.name for p in (tmp_path / "etc").iterdir() if p.name.startswith(".import")] == []
    assert list((tmp_path / "run").iterdir()) == []


def test_a_config_on_the_boot_partition_is_imported_with_its_recordings(tmp_path: Path) -> None:
    config = with_disclosure_file(EXAMPLE.read_text(), "office-en.wav")
    result, boot, etc = boot_import(tmp_path, config, {"office-en.wav": WAV,
                                                       "notes/readme.txt": b"notes"})
    assert result.returncode == 0, result.stderr
    assert (etc / "linerec.toml").read_text() == config
    assert (etc / "office-en.wav").read_bytes() == WAV
    assert (etc / "notes" / "readme.txt").read_bytes() == b"notes"
    # root:linerec (here: the test's own user and group), as postinst installs the config;
    # not the FAT's 0755 with its execute bits.
    for path, mode in [("linerec.toml", 0o640), ("office-en.wav", 0o640), ("notes", 0o750),
                       ("notes/readme.txt", 0o640)]:
        found = (etc / path).stat()
        assert (found.st_mode & 0o7777, found.st_uid, found.st_gid) == (
            mode, os.getuid(), os.getgid()), path
    assert list(boot.iterdir()) == []
    assert_nothing_left_over(tmp_path)
    assert run(LINEREC, "check-config", etc / "linerec.toml").returncode == 0


def test_the_password_does_not_stay_on_the_boot_partition(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    # What an earlier version left: the imported config, renamed, with its password.
    (boot / "linerec.toml.imported").write_text('[mqtt]\npassword = "old-secret"\n')
    (boot / "linerec.imported").mkdir()
    (boot / "linerec.imported" / "office-en.wav").write_bytes(WAV)
    config = EXAMPLE.read_text() + '\n[mqtt]\nhost = "broker"\npassword = "new-secret"\n'
    result, boot, etc = boot_import(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert "new-secret" in (etc / "linerec.toml").read_text()
    assert (etc / "linerec.toml").stat().st_mode & 0o777 == 0o640
    assert list(boot.iterdir()) == []
    assert "secret" not in result.stdout + result.stderr

    # A boot partition with only an earlier version's copy: the unit runs for it too.
    (boot / "linerec.toml.imported").write_text('[mqtt]\npassword = "old-secret"\n')
    result = run_import(tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(boot.iterdir()) == []
    assert (etc / "linerec.toml").read_text() == config
    unit = (REPO / "packaging/linerec-firstboot.service").read_text().splitlines()
    assert "ConditionPathExists=|/boot/firmware/linerec.toml.imported" in unit


def test_a_disclosure_named_with_a_leading_dot_is_imported(tmp_path: Path) -> None:
    old = EXAMPLE.read_text()
    assert boot_import(tmp_path, old)[0].returncode == 0
    config = with_disclosure_file(old, ".welcome.wav")
    result, boot, etc = boot_import(tmp_path, config, {".welcome.wav": WAV})
    assert result.returncode == 0, result.stderr
    assert (etc / "linerec.toml").read_text() == config
    assert (etc / ".welcome.wav").read_bytes() == WAV
    assert (etc / ".welcome.wav").stat().st_mode & 0o777 == 0o640
    assert list(boot.iterdir()) == []
    assert run(LINEREC, "check-config", etc / "linerec.toml").returncode == 0
    assert_nothing_left_over(tmp_path)


def test_a_config_that_fails_in_place_is_rolled_back(tmp_path: Path) -> None:
    old = with_disclosure_file(EXAMPLE.read_text(), "office-en.wav")
    assert boot_import(tmp_path, old, {"office-en.wav": WAV})[0].returncode == 0
    etc = tmp_path / "etc"
    (etc / "notes").mkdir()
    (etc / "notes" / "old.txt").write_text("old")
    # A checker that passes the staging copy and fails the config in /etc/linerec, saying
    # which file it was given each time.
    log = tmp_path / "checked"
    checker = tmp_path / "checker"
    checker.write_text(f"""#!/bin/sh
echo "$2" >>{log}
case $2 in
    {etc}/*) echo "linerec: $2: broken in place" >&2; exit 2 ;;
esac
exec {LINEREC} "$@"
""")
    checker.chmod(0o755)
    new = with_disclosure_file(old.replace("retention_days = 90", "retention_days = 30"),
                               "office-en.wav")
    result, boot, etc = boot_import(tmp_path, new, {
        "office-en.wav": OTHER_WAV, "added.wav": WAV, "notes/new.txt": b"new"}, checker)
    assert result.returncode == 1
    staging, in_place = log.read_text().splitlines()
    assert staging.startswith(f"{tmp_path}/run/") and in_place == f"{etc}/linerec.toml"
    assert (etc / "linerec.toml").read_text() == old
    assert (etc / "office-en.wav").read_bytes() == WAV
    assert sorted(p.name for p in etc.iterdir()) == ["linerec.toml", "notes", "office-en.wav"]
    assert [p.name for p in (etc / "notes").iterdir()] == ["old.txt"]
    assert (boot / "linerec.toml").read_text() == new
    assert "broken in place" in (boot / "linerec.toml.error").read_text()
    assert "broken in place" in result.stderr
    assert_nothing_left_over(tmp_path)


def test_links_planted_in_etc_are_replaced_not_followed(tmp_path: Path) -> None:
    outside, etc = tmp_path / "outside", tmp_path / "etc"
    (outside / "folder").mkdir(parents=True)
    (outside / "victim").write_text("untouched")
    etc.mkdir()
    for name, target in [("linerec.toml", outside / "victim"),
                         ("office-en.wav", outside / "victim"), ("notes", outside / "folder")]:
        (etc / name).symlink_to(target)
    config = with_disclosure_file(EXAMPLE.read_text(), "office-en.wav")
    result, _, etc = boot_import(tmp_path, config, {"office-en.wav": WAV,
                                                    "notes/readme.txt": b"notes"})
    assert result.returncode == 0, result.stderr
    assert (outside / "victim").read_text() == "untouched"
    assert list((outside / "folder").iterdir()) == []
    for name in ("linerec.toml", "office-en.wav", "notes"):
        assert not (etc / name).is_symlink()
    assert (etc / "linerec.toml").read_text() == config
    assert (etc / "notes" / "readme.txt").read_bytes() == b"notes"


def test_a_link_on_the_boot_partition_is_refused(tmp_path: Path) -> None:
    old = EXAMPLE.read_text()
    assert boot_import(tmp_path, old)[0].returncode == 0
    boot = tmp_path / "boot"
    (boot / "linerec").mkdir()
    (boot / "linerec" / "office-en.wav").symlink_to("/etc/hostname")
    result, boot, etc = boot_import(tmp_path, with_disclosure_file(old, "office-en.wav"))
    assert result.returncode == 1
    assert (etc / "linerec.toml").read_text() == old
    assert [p.name for p in etc.iterdir()] == ["linerec.toml"]
    report = (boot / "linerec.toml.error").read_text()
    assert f"{boot}/linerec/office-en.wav is neither a file nor a folder" in report
    assert_nothing_left_over(tmp_path)


def test_a_bad_config_on_the_boot_partition_changes_nothing_and_says_why(tmp_path: Path) -> None:
    good = EXAMPLE.read_text()
    assert boot_import(tmp_path, good)[0].returncode == 0
    result, boot, etc = boot_import(tmp_path, good.replace("retention_days = 90",
                                                           "retention_days = 0"))
    assert result.returncode == 1
    assert (etc / "linerec.toml").read_text() == good
    assert (boot / "linerec.toml").exists()
    report = (boot / "linerec.toml.error").read_text()
    assert f"{boot}/linerec.toml" in report and "retention_days" in report
    assert ".import" not in report and "linerec-import" not in report
    assert [p.name for p in etc.iterdir()] == ["linerec.toml"]
    assert_nothing_left_over(tmp_path)


def test_nothing_on_the_boot_partition_is_nothing_to_do(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    result = run(IMPORT, env={"LINEREC_BOOT_DIR": str(tmp_path / "boot"),
                              "LINEREC_CONFIG_DIR": str(tmp_path / "missing")})
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "boot").iterdir()) == []


def hat_config_txt(profile: Path) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, REPO / "image/hat-config-txt.py", profile)


def test_the_image_takes_the_hat_overlay_from_the_profile(tmp_path: Path) -> None:
    profile = tmp_path / "generic-2line.toml"
    profile.write_text('overlay = "example-codec"\n'
                       'config_txt = """\ndtparam=i2s=on\ndtoverlay=example-codec\n"""\n')
    result = hat_config_txt(profile)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "# linerec HAT profile begin: generic-2line", "[all]", "dtparam=i2s=on",
        "dtoverlay=example-codec", "# linerec HAT profile end"]

    profile.write_text('overlay = "example-codec"\n')
    result = hat_config_txt(profile)
    assert result.returncode == 2 and "generic-2line.toml: config_txt" in result.stderr
    result = hat_config_txt(tmp_path / "generic-4line.toml")
    assert result.returncode == 2 and "there are: generic-2line" in result.stderr


def test_the_shipped_hat_profiles_give_config_txt_lines() -> None:
    profiles = sorted((REPO / "hw/profiles").glob("*.toml"))
    assert len(profiles) >= 2
    for profile in profiles:
        result = hat_config_txt(profile)
        assert result.returncode == 0, result.stderr
        assert any(line.startswith("dtoverlay=") for line in result.stdout.splitlines())


@pytest.mark.skipif(platform.machine() == "aarch64", reason="an arm64 machine may build it")
def test_the_image_build_refuses_to_run_off_arm64(tmp_path: Path) -> None:
    result = run("bash", REPO / "image/build.sh", env={"LINEREC_WORK": str(tmp_path / "work")})
    assert result.returncode == 1
    assert "arm64" in result.stderr and "qemu" in result.stderr
    assert not (tmp_path / "work").exists()


def test_every_shell_script_is_found_by_the_linter() -> None:
    """scripts/lint-shell finds scripts by their first line: the maintainer scripts and the
    image's stage are among them (ShellCheck itself runs in make lint-shell)."""
    listed = run(REPO / "scripts/lint-shell", "--list")
    assert listed.returncode == 0, listed.stderr
    names = set(listed.stdout.split())
    for expected in ("packaging/postinst", "packaging/prerm", "packaging/postrm",
                     "packaging/import-boot-config", "scripts/build-deb",
                     "scripts/check-package", "image/build.sh", "image/add-data-partition.sh",
                     "image/stage-linerec/prerun.sh", "image/stage-linerec/00-install/01-run.sh",
                     "image/stage-linerec/01-appliance/01-run.sh",
                     "image/stage-linerec/01-appliance/files/linerec-data-setup", ".ci/run"):
        assert expected in names
