#!/bin/sh
# keel-timeout: 240
# The kit's bzImage boots under QEMU/KVM with 2 vCPUs to the test agent (proves the harness).
set -euo pipefail
KEEL_L2_VMM=qemu
BOOT_KERNEL=vmlinuz
. "$KEEL_SYSTEM_DIR/common/boot-and-power-off.sh"
