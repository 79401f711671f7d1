#!/bin/bash -e
# Makes Raspberry Pi OS Lite an appliance (image/README.md): the HAT's overlay in config.txt,
# a read-only root with the recordings and the config on the data partition, NTP, volatile
# logs, the hardware watchdog, and the linerec units enabled. SSH follows pi-gen's ENABLE_SSH
# (image/build.sh: off unless LINEREC_SSH=1).
boot="${ROOTFS_DIR}/boot/firmware"

# The HAT profile's config.txt lines (image/build.sh wrote them to files/config.txt), once.
sed -i '/^# linerec HAT profile begin/,/^# linerec HAT profile end/d' "${boot}/config.txt"
cat files/config.txt >>"${boot}/config.txt"
if compgen -G "files/overlays/*.dtbo" >/dev/null; then
	install -m 644 files/overlays/*.dtbo "${boot}/overlays/"
fi

# Read-only root: overlayroot (00-packages-nr) mounts it under a RAM overlay. recurse=0
# leaves the other fstab mounts alone: without it the data partition would be in RAM too,
# and every recording lost at the next power cut. Raspberry Pi OS's first-boot resize is
# dropped: the root stays as built, the data partition after it grows instead.
sed -i -E -e 's/(^| )overlayroot=[^ ]*//g' \
	-e 's# init=/usr/lib/raspberrypi-sys-mods/firstboot##' -e 's/ resize( |$)/\1/' \
	-e 's/^ */overlayroot=tmpfs:recurse=0 /' "${boot}/cmdline.txt"

# The data partition (image/add-data-partition.sh adds it to the image) holds the
# recordings, the MQTT outbox, the config and the NTP clock file.
sed -i '/linerec-data\|\/var\/lib\/linerec/d' "${ROOTFS_DIR}/etc/fstab"
cat files/fstab >>"${ROOTFS_DIR}/etc/fstab"
install -m 755 files/linerec-data-setup "${ROOTFS_DIR}/usr/local/sbin/linerec-data-setup"
install -m 644 files/linerec-data.service "${ROOTFS_DIR}/etc/systemd/system/"
# linerec and the import of the boot partition's config both run on the data partition
# alone. The package's linerec-firstboot.service is only ordered after linerec-data.service
# (on plain Raspberry Pi OS there is none): the drop-in makes it require it here.
for unit in linerec.service linerec-firstboot.service; do
	install -D -m 644 files/linerec-data.conf \
		"${ROOTFS_DIR}/etc/systemd/system/${unit}.d/data-partition.conf"
done
install -D -m 644 files/journald.conf "${ROOTFS_DIR}/etc/systemd/journald.conf.d/linerec.conf"
install -D -m 644 files/watchdog.conf "${ROOTFS_DIR}/etc/systemd/system.conf.d/linerec.conf"

on_chroot <<CHROOT
systemctl enable linerec-data.service linerec-firstboot.service linerec.service
systemctl enable systemd-timesyncd.service
if [ "${ENABLE_SSH:-0}" != 1 ]; then
	systemctl disable ssh.service || true
fi
# Each would write to the root, which is RAM now: a swap file, package lists, the man index.
for unit in dphys-swapfile.service apt-daily.timer apt-daily-upgrade.timer man-db.timer; do
	systemctl disable "\${unit}" 2>/dev/null || true
done
update-initramfs -u -k all
CHROOT
