#!/bin/sh
# keel-timeout: 300
# qcow2 copy-on-write on a real Linux guest: a guest makes a file system on a
# qcow2 base image made by keel-img; then a second guest runs fsck, reads
# the base's file back and writes and verifies new data through a qcow2
# overlay on that base, while the base stays byte-identical.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
require_binary keel-img >/dev/null

base=$KEEL_WORKDIR/base.qcow2
overlay=$KEEL_WORKDIR/overlay.qcow2
keel-img create -f qcow2 "$base" 64M >/dev/null || fail "keel-img create of the base failed"

# 1. The base: mkfs and one file, written by the guest through qcow2.
l2_boot base --cpus 2 --mem 256 --serial-agent --disk-rw "$base"
l2_cmd base 'mke2fs -q -b 4096 /dev/vda >/dev/null 2>&1 && mount /dev/vda /mnt && dd if=/dev/urandom of=/mnt/a bs=64k count=128 2>/dev/null && sha256sum /mnt/a | cut -d" " -f1 && umount /mnt'
sum_a=$L2_OUTPUT
assert_match "$sum_a" '^[0-9a-f]{64}$' "checksum of the base's file"
l2_cmd base 'e2fsck -f -n /dev/vda >/dev/null 2>&1; echo fsck-rc=$?'
assert_eq "$L2_OUTPUT" "fsck-rc=0" "fsck of the fresh file system on the base"
l2_send base keel-exit
l2_wait_exit base 60 || fail "the base guest's VMM did not exit"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status (base guest)"
keel-img check "$base" >/dev/null || fail "keel-img check finds the base image damaged"
base_sum=$(sha256sum < "$base" | cut -d' ' -f1)

# 2. An overlay on it: fsck, read the old file, write and verify new data.
keel-img create -f qcow2 -b "$base" -F qcow2 "$overlay" >/dev/null ||
  fail "keel-img create of the overlay failed"
l2_boot top --cpus 2 --mem 256 --serial-agent --disk-rw "$overlay"
l2_cmd top 'e2fsck -f -n /dev/vda >/dev/null 2>&1; echo fsck-rc=$?'
assert_eq "$L2_OUTPUT" "fsck-rc=0" "fsck through the overlay"
l2_cmd top 'mount /dev/vda /mnt && sha256sum /mnt/a | cut -d" " -f1'
assert_eq "$L2_OUTPUT" "$sum_a" "the base's file read through the overlay"
l2_cmd top 'dd if=/dev/urandom of=/tmp/b bs=64k count=256 2>/dev/null && cp /tmp/b /mnt/b && dd if=/dev/urandom of=/mnt/a bs=64k count=16 conv=notrunc 2>/dev/null && sync && sha256sum /mnt/a /tmp/b | cut -d" " -f1 | tr "\n" " "'
sums_written=$L2_OUTPUT
l2_cmd top 'umount /mnt && echo 3 > /proc/sys/vm/drop_caches && e2fsck -f -n /dev/vda >/dev/null 2>&1; echo fsck-rc=$?'
assert_eq "$L2_OUTPUT" "fsck-rc=0" "fsck after writing through the overlay"
l2_cmd top 'mount /dev/vda /mnt && sha256sum /mnt/a /mnt/b | cut -d" " -f1 | tr "\n" " "; umount /mnt'
assert_eq "$L2_OUTPUT" "$sums_written" "files written through the overlay read back after a remount"
l2_send top keel-exit
l2_wait_exit top 60 || fail "the overlay guest's VMM did not exit"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status (overlay guest)"

assert_eq "$(sha256sum < "$base" | cut -d' ' -f1)" "$base_sum" "the base image is byte-identical"
keel-img check "$overlay" >/dev/null || fail "keel-img check finds the overlay damaged"
echo "KEEL-PASS"
