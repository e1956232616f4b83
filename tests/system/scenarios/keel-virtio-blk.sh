#!/bin/sh
# keel-timeout: 300
# virtio-blk over virtio-pci: the kit's data disk read-only (checksums
# verified in the guest, writes refused) and a raw scratch disk the guest
# writes: raw bytes matched by checksum from the host side, then mkfs, write,
# remount and read back.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
. "$KEEL_KIT/kit.env"

scratch=$KEEL_WORKDIR/scratch.img
truncate -s 64M "$scratch"
l2_boot vm --cpus 2 --mem 256 --serial-agent \
  --disk "$KEEL_KIT/$KIT_DATA_DISK" --disk-rw "$scratch"

l2_cmd vm 'cat /sys/block/vda/ro /sys/block/vdb/ro /sys/block/vdb/size'
assert_eq "$(printf '%s' "$L2_OUTPUT" | tr '\n' ' ')" "1 0 131072" "vda ro, vdb rw, vdb sectors"

l2_cmd vm 'mount -o ro /dev/vda /mnt && (cd /mnt && sha256sum -c SHA256SUMS | grep -c ": OK$"); umount /mnt'
want_files=$(wc -l < "$KEEL_KIT/$KIT_DATA_SHA256SUMS")
assert_eq "$L2_OUTPUT" "$want_files" "files verified on the read-only data disk"

l2_cmd vm 'dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null'
[ "$L2_RC" != 0 ] || fail "a write to the read-only disk succeeded"
log "ok: write to the read-only disk refused (rc=$L2_RC)"

# 4 MiB of random bytes at 40 MiB, through the page cache and fsync'd.
l2_cmd vm 'dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null && dd if=/tmp/p of=/dev/vdb bs=1M seek=40 conv=fsync 2>/dev/null && sha256sum < /tmp/p | cut -d" " -f1'
guest_sum=$L2_OUTPUT
assert_match "$guest_sum" '^[0-9a-f]{64}$' "guest checksum"
host_sum=$(dd if="$scratch" bs=1M skip=40 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
assert_eq "$host_sum" "$guest_sum" "host-side checksum of the guest's raw write"
l2_cmd vm 'echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs=1M skip=40 count=4 2>/dev/null | sha256sum | cut -d" " -f1'
assert_eq "$L2_OUTPUT" "$guest_sum" "read back after dropping caches"

# A file system on the first 32 MiB: write, remount, read back.
l2_cmd vm 'mke2fs -q -b 4096 /dev/vdb 8192 >/dev/null && mount /dev/vdb /mnt && dd if=/dev/urandom of=/mnt/f bs=64k count=64 2>/dev/null && sha256sum /mnt/f | cut -d" " -f1 > /tmp/fsum && umount /mnt && echo 3 > /proc/sys/vm/drop_caches && mount /dev/vdb /mnt && sha256sum /mnt/f | cut -d" " -f1 | cmp - /tmp/fsum && umount /mnt && echo FS-OK'
assert_eq "$L2_OUTPUT" "FS-OK" "file written, remounted and read back"

# Discard reaches the device (the guest sees a discard limit).
l2_cmd vm 'cat /sys/block/vdb/queue/discard_max_bytes; blkdiscard -o 50331648 -l 1048576 /dev/vdb && echo DISCARDED'
assert_eq "$(printf '%s' "$L2_OUTPUT" | tail -n 1)" "DISCARDED" "blkdiscard"

l2_send vm keel-exit
l2_wait vm 'KEEL-RESULT rc=' 60 || fail "no KEEL-RESULT after keel-exit"
l2_wait_exit vm 60 || fail "VMM did not exit after the guest powered off"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status"
# The raw bytes are still there after the VMM is gone.
host_sum=$(dd if="$scratch" bs=1M skip=40 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
assert_eq "$host_sum" "$guest_sum" "checksum after the VMM exited"
echo "KEEL-PASS"
