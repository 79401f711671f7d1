#!/usr/bin/env bash
# Appends the data partition to an image that pi-gen made (boot + root):
#
#   image/add-data-partition.sh IMAGE [SIZE_MIB]
#
# Partition 3, ext4 labelled linerec-data, SIZE_MIB large (default 256), with the folders
# the appliance mounts from it (config/, timesync/). linerec-data-setup grows it to the end
# of the card at the first boot. Works on the image file alone: no loop device, no mount,
# so it runs as any user on any architecture.
set -euo pipefail

image=${1:?usage: add-data-partition.sh IMAGE [SIZE_MIB]}
size_mib=${2:-256}
label=linerec-data

partitions=$(sfdisk --dump "$image" | grep -c 'start=')
if [ "$partitions" != 2 ]; then
    echo "add-data-partition: $image has $partitions partitions; expected pi-gen's two" \
        "(boot, root)" >&2
    exit 1
fi

# After the root, on a MiB boundary, to the end of the added space (sfdisk alone would take
# the first free gap, which on pi-gen's images lies before the boot partition).
read -r root_start root_sectors < <(sfdisk --dump "$image" \
    | sed -n 's/.*start= *\([0-9]*\), *size= *\([0-9]*\).*/\1 \2/p' | tail -n 1)
start=$(((root_start + root_sectors + 2047) / 2048 * 2048))
sectors=$((size_mib * 2048))
truncate -s $(((start + sectors) * 512)) "$image"
echo "start=$start, size=$sectors, type=83" \
    | sfdisk --quiet --append --no-reread --no-tell-kernel "$image"

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -m 0755 "$tree/config" "$tree/timesync"
mkfs.ext4 -q -F -T default -b 4096 -L "$label" -d "$tree" \
    -E "offset=$((start * 512)),root_owner=0:0" "$image" "$((sectors / 2))k"
echo "add-data-partition: $image: partition 3, $((sectors / 2048)) MiB, ext4 '$label'"
