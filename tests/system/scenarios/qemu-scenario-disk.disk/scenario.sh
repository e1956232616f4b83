#!/bin/sh
# Runs inside the L2 guest, started by the test agent from the disk labelled
# keel-scenario (keel.disk=LABEL=keel-scenario). Verifies the kit's data disk.
set -eu
echo "scenario from disk at $KEEL_DISK_DIR"
data_dev=$(findfs LABEL=keel-data)
echo "data disk is $data_dev"
mkdir -p /mnt/data
mount -t ext4 -o ro "$data_dev" /mnt/data
cd /mnt/data
sha256sum -c SHA256SUMS
echo "DATA-VERIFIED files=$(wc -l < SHA256SUMS)"
cd /
umount /mnt/data
