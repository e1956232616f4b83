#!/bin/sh
# keel-timeout: 240
# virtio-rng: the guest's hw_random core picks virtio_rng, and /dev/hwrng
# delivers distinct random blocks.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"

l2_boot vm --cpus 1 --mem 256 --serial-agent --vmm-arg --rng
l2_cmd vm 'cat /sys/class/misc/hw_random/rng_current'
assert_match "$L2_OUTPUT" '^virtio_rng' "current hw_random source"
l2_cmd vm 'dd if=/dev/hwrng bs=4096 count=16 2>/dev/null | wc -c'
assert_eq "$L2_OUTPUT" 65536 "bytes read from /dev/hwrng"
l2_cmd vm 'a=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | sha256sum); b=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | sha256sum); [ "$a" != "$b" ] && echo DIFFERENT'
assert_eq "$L2_OUTPUT" DIFFERENT "two reads differ"
l2_cmd vm 'dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | od -An -v -tx1 | tr -s " " "\n" | grep -c "^00$"'
assert_in_range "$L2_OUTPUT" 0 64 "zero bytes in 4 KiB of hwrng output"

l2_send vm keel-exit
l2_wait vm 'KEEL-RESULT rc=' 60 || fail "no KEEL-RESULT after keel-exit"
l2_wait_exit vm 60 || fail "VMM did not exit after the guest powered off"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status"
echo "KEEL-PASS"
