#!/bin/sh
# keel-timeout: 240
# virtio-console as the guest's console: no serial port at all, the test
# agent talks over hvc0 (keel-vmm --virtio-console stdio), so every command
# and its output crosses the virtio console both ways.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"

l2_boot vm --cpus 1 --mem 256 --serial-agent --console hvc0
l2_cmd vm 'echo hello over hvc0; tty </dev/console; cat /sys/class/tty/console/active'
assert_eq "$(printf '%s' "$L2_OUTPUT" | head -n 1)" "hello over hvc0" "echo over hvc0"
assert_match "$(printf '%s' "$L2_OUTPUT" | tail -n 1)" 'hvc0' "the active console"
# A long line both ways (more than one virtqueue buffer).
long=$(seq 1 800 | tr '\n' ',')
l2_cmd vm "echo $long | wc -c"
assert_eq "$L2_OUTPUT" "$(printf '%s\n' "$long" | wc -c)" "length of a long echoed line"
l2_cmd vm 'seq 1 5000'
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sha256sum | cut -d' ' -f1)" \
  "$(seq 1 5000 | sha256sum | cut -d' ' -f1)" "5000 lines of guest output, byte for byte"

l2_send vm keel-exit
l2_wait vm 'KEEL-RESULT rc=' 60 || fail "no KEEL-RESULT after keel-exit"
l2_wait_exit vm 60 || fail "VMM did not exit after the guest powered off"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status"
echo "KEEL-PASS"
