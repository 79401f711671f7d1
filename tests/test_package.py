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


def boot_import(tmp_path: Path, config: str, media: dict[str, bytes] | None = None
                ) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    boot, etc = tmp_path / "boot", tmp_path / "etc"
    boot.mkdir(exist_ok=True)
    etc.mkdir(exist_ok=True)
    (boot / "linerec.toml").write_text(config)
    for name, data in (media or {}).items():
        (boot / "linerec").mkdir(exist_ok=True)
        (boot / "linerec" / name).write_bytes(data)
    result = run(IMPORT, env={
        "LINEREC_BOOT_DIR": str(boot), "LINEREC_CONFIG_DIR": str(etc),
        "LINEREC_COMMAND": str(LINEREC), "LINEREC_GROUP": grp.getgrgid(os.getgid()).gr_name})
    return result, boot, etc


def test_a_config_on_the_boot_partition_is_imported_with_its_recordings(tmp_path: Path) -> None:
    wav = (REPO / "audio/disclosures/en.wav").read_bytes()
    config = EXAMPLE.read_text().replace(
        'parts = [{ language = "nl" }, { language = "en" }]',
        'parts = [{ language = "en", file = "office-en.wav" }]')
    assert "office-en.wav" in config
    result, boot, etc = boot_import(tmp_path, config, {"office-en.wav": wav})
    assert result.returncode == 0, result.stderr
    assert (etc / "linerec.toml").read_text() == config
    assert (etc / "office-en.wav").read_bytes() == wav
    assert (etc / "linerec.toml").stat().st_mode & 0o777 == 0o640
    assert not (boot / "linerec.toml").exists() and (boot / "linerec.toml.imported").exists()
    assert (boot / "linerec.imported" / "office-en.wav").exists()
    assert [p.name for p in etc.iterdir() if p.name.startswith(".import")] == []
    assert run(LINEREC, "check-config", etc / "linerec.toml").returncode == 0


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
    assert ".import" not in report
    assert [p.name for p in etc.iterdir()] == ["linerec.toml"]


def test_nothing_on_the_boot_partition_is_nothing_to_do(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    result = run(IMPORT, env={"LINEREC_BOOT_DIR": str(tmp_path / "boot"),
                              "LINEREC_CONFIG_DIR": str(tmp_path / "missing")})
    assert result.returncode == 0, result.stderr


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
