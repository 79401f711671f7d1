#!/bin/bash -e
# Installs the linerec package that image/build.sh built for arm64 (files/), with its
# dependencies from the Raspberry Pi OS archive, and the site config if build.sh was given
# one; either way the config is checked here, by the arm64 linerec itself.
deb=$(basename files/linerec_*_arm64.deb)
install -m 644 "files/${deb}" "${ROOTFS_DIR}/tmp/${deb}"
on_chroot <<CHROOT
apt-get install -y "/tmp/${deb}"
rm -f "/tmp/${deb}"
CHROOT

if [ -f files/linerec.toml ]; then
	install -m 640 files/linerec.toml "${ROOTFS_DIR}/etc/linerec/linerec.toml"
fi
on_chroot <<CHROOT
chgrp linerec /etc/linerec/linerec.toml
/opt/linerec/bin/linerec check-config /etc/linerec/linerec.toml
CHROOT

# What the data partition's config folder starts from (linerec-data-setup copies it once).
install -d "${ROOTFS_DIR}/usr/local/share/linerec/factory-config"
cp -a "${ROOTFS_DIR}/etc/linerec/." "${ROOTFS_DIR}/usr/local/share/linerec/factory-config/"
