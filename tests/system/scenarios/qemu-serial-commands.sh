#!/bin/sh
# keel-timeout: 240
# Serial console input reaches the guest's agent under QEMU (proves the harness).
set -euo pipefail
KEEL_L2_VMM=qemu
. "$KEEL_SYSTEM_DIR/common/serial-commands.sh"
