#!/bin/sh
# keel-timeout: 240
# The test agent takes its scenario from a virtio disk (keel.disk): the
# scenario disk built from qemu-scenario-disk.disk/ mounts the kit's
# data.ext4 (a second virtio disk) and verifies it against SHA256SUMS.
set -euo pipefail
. "$KEEL_SYSTEM_DIR/lib.sh"
. "$KEEL_KIT/kit.env"

scenario_disk=$KEEL_ASSETS/qemu-scenario-disk.ext4
l2_boot vm --cpus 1 --mem 256 \
  --disk "$scenario_disk" --disk "$KEEL_KIT/$KIT_DATA_DISK" \
  --cmdline "keel.disk=LABEL=keel-scenario"

l2_wait vm 'DATA-VERIFIED ' 120 || fail "the disk scenario did not verify the data disk"
want_files=$(wc -l < "$KEEL_KIT/$KIT_DATA_SHA256SUMS")
assert_eq "$L2_LINE" "DATA-VERIFIED files=$want_files" "files verified on data.ext4"
l2_wait vm 'KEEL-RESULT rc=' 60 || fail "no KEEL-RESULT marker"
assert_eq "$L2_LINE" "KEEL-RESULT rc=0" "disk scenario result"
ok_lines=$(tr -d '\r' < "$KEEL_WORKDIR/vm/console.log" | grep -c ': OK$' || true)
assert_eq "$ok_lines" "$want_files" "sha256sum -c lines reporting OK"
l2_wait_exit vm 60 || fail "VMM did not exit after the guest powered off"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status"
echo "KEEL-PASS"
