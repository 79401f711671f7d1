#!/bin/bash -e
# pi-gen: the linerec stage starts from the root that stage2 (Raspberry Pi OS Lite) left.
if [ ! -d "${ROOTFS_DIR}" ]; then
	copy_previous
fi
