#!/bin/sh
# keel-timeout: 240
# keel-vmm boots the kit's bzImage (64-bit boot protocol) with 2 vCPUs and ACPI; power-off exits 0.
set -euo pipefail
KEEL_L2_VMM=keel
BOOT_KERNEL=vmlinuz
. "$KEEL_SYSTEM_DIR/common/boot-and-power-off.sh"
