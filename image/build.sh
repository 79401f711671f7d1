#!/usr/bin/env bash
# Builds the linerec appliance image (image/README.md): Raspberry Pi OS Lite (bookworm,
# 64-bit) made by pi-gen at a pinned tag, plus the stage image/stage-linerec, plus the data
# partition. Runs on an arm64 Debian 12 or Raspberry Pi OS machine (a Raspberry Pi 4 or 5 will
# do), as root; it refuses to run anywhere else, and it never sets up CPU emulation.
#
#   sudo image/build.sh
#
# Settings, from the environment:
#   LINEREC_HAT=generic-2line   HAT profile: hw/profiles/<name>.toml gives the config.txt lines
#   LINEREC_CONFIG=FILE         site config to ship as the factory config (checked in the build);
#                               without it, the package's example
#   LINEREC_ADMIN_PASSWORD=...  password of the console user `admin`; without it a random one,
#                               written beside the image
#   LINEREC_SSH=1               SSH on (off by default); LINEREC_SSH_KEY="ssh-ed25519 ..." is
#                               then admin's key, and passwords are refused over SSH
#   LINEREC_TIMEZONE=Europe/Amsterdam
#   LINEREC_DATA_MIB=256        the data partition in the image; it grows to the card at boot
#   LINEREC_WORK=build/image    pi-gen's checkout and work folder (about 12 GB) and the result
#   PIGEN_REF=2025-05-13-raspios-bookworm-arm64   the pi-gen tag to build from
set -euo pipefail

machine=$(uname -m)
userland=$(dpkg --print-architecture 2>/dev/null || echo unknown)
if [ "$machine" != aarch64 ] || [ "$userland" != arm64 ]; then
    cat >&2 <<EOF
image/build.sh: this machine is $machine ($userland userland); the image is built only
on an arm64 Debian 12 or Raspberry Pi OS (bookworm, 64-bit) machine, such as a Raspberry Pi 4
or 5. It does not set up qemu or binfmt emulation to build elsewhere. Here, build the Debian
package for this machine (scripts/build-deb) or run its checks (make check-package).
EOF
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "image/build.sh: pi-gen needs root: run it with sudo" >&2
    exit 1
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
hat=${LINEREC_HAT:-generic-2line}
site_config=${LINEREC_CONFIG:-}
ssh=${LINEREC_SSH:-0}
ssh_key=${LINEREC_SSH_KEY:-}
timezone=${LINEREC_TIMEZONE:-Europe/Amsterdam}
data_mib=${LINEREC_DATA_MIB:-256}
work=${LINEREC_WORK:-$repo/build/image}
pigen_ref=${PIGEN_REF:-2025-05-13-raspios-bookworm-arm64}
pigen=$work/pi-gen
out=$work/out
profile=$repo/hw/profiles/$hat.toml
case $work in
    *' '*) echo "image/build.sh: LINEREC_WORK must have no spaces (debootstrap)" >&2; exit 1 ;;
esac
if [ -n "$site_config" ] && [ ! -f "$site_config" ]; then
    echo "image/build.sh: LINEREC_CONFIG=$site_config: no such file" >&2
    exit 1
fi
mkdir -p "$work" "$out"
config_txt=$(python3 "$repo/image/hat-config-txt.py" "$profile")

echo "image/build.sh: the Debian package (arm64)"
deb=$("$repo/scripts/build-deb" --out "$work/deb")

echo "image/build.sh: pi-gen $pigen_ref"
"$repo/scripts/install-system-packages" git xz-utils fdisk e2fsprogs
if [ ! -d "$pigen/.git" ] || [ "$(git -C "$pigen" describe --tags 2>/dev/null)" != "$pigen_ref" ]; then
    rm -rf "$pigen"
    git clone --quiet --depth 1 --branch "$pigen_ref" https://github.com/RPi-Distro/pi-gen.git \
        "$pigen"
fi
# pi-gen's own list of what it needs, one "tool[:package]" a line.
mapfile -t needs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/.*://' "$pigen/depends")
"$repo/scripts/install-system-packages" "${needs[@]}"

stage=$pigen/stage-linerec
rm -rf "$stage"
cp -a "$repo/image/stage-linerec" "$stage"
mkdir -p "$stage/00-install/files" "$stage/01-appliance/files/overlays"
cp "$deb" "$stage/00-install/files/"
if [ -n "$site_config" ]; then
    cp "$site_config" "$stage/00-install/files/linerec.toml"
fi
printf '%s\n' "$config_txt" >"$stage/01-appliance/files/config.txt"
# A profile whose overlay Raspberry Pi OS does not ship carries its .dtbo beside it.
# (`overlay` is the dtoverlay line or the overlay's name.)
overlay=$(python3 -c 'import sys, tomllib
overlay = tomllib.load(open(sys.argv[1], "rb")).get("overlay", "")
print(overlay.removeprefix("dtoverlay=").split(",")[0].strip())' "$profile")
if [ -n "$overlay" ] && [ -f "$repo/hw/profiles/$overlay.dtbo" ]; then
    cp "$repo/hw/profiles/$overlay.dtbo" "$stage/01-appliance/files/overlays/"
fi
touch "$pigen/stage2/SKIP_IMAGES"
rm -f "$pigen"/stage{0,1,2}/SKIP

password=${LINEREC_ADMIN_PASSWORD:-}
if [ -z "$password" ]; then
    password=$(python3 -c 'import secrets; print(secrets.token_urlsafe(12))')
    generated_password=1
fi
{
    printf '%s=%q\n' \
        IMG_NAME linerec \
        RELEASE bookworm \
        TARGET_HOSTNAME linerec \
        TIMEZONE_DEFAULT "$timezone" \
        FIRST_USER_NAME admin \
        FIRST_USER_PASS "$password" \
        DISABLE_FIRST_BOOT_USER_RENAME 1 \
        ENABLE_SSH "$ssh" \
        DEPLOY_COMPRESSION none \
        STAGE_LIST "stage0 stage1 stage2 stage-linerec"
    if [ -n "$ssh_key" ]; then
        printf '%s=%q\n' PUBKEY_SSH_FIRST_USER "$ssh_key" PUBKEY_ONLY_SSH 1
    fi
} >"$pigen/config"
chmod 600 "$pigen/config"

echo "image/build.sh: pi-gen (log: $work/pi-gen.log)"
(cd "$pigen" && ./build.sh -c config) 2>&1 | tee "$work/pi-gen.log"
built=$(find "$pigen/deploy" -name '*linerec*.img' -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)
if [ -z "$built" ]; then
    echo "image/build.sh: pi-gen made no image; see $work/pi-gen.log" >&2
    exit 1
fi

image=$out/$(basename "$built")
mv "$built" "$image"
"$repo/image/add-data-partition.sh" "$image" "$data_mib"
rm -f "$image.xz"
xz -T0 "$image"
(cd "$out" && sha256sum "$(basename "$image").xz" >"$(basename "$image").xz.sha256")
if [ "${generated_password:-0}" = 1 ]; then
    (umask 077 && printf '%s\n' "$password" >"$image.admin-password")
    echo "image/build.sh: the console user admin's password is in $image.admin-password"
fi
echo "image/build.sh: $image.xz, in $((SECONDS / 60)) min"
