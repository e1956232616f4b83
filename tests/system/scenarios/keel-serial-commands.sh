#!/bin/sh
# keel-timeout: 240
# keel-vmm carries serial console input to the guest's agent and its output back.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/common/serial-commands.sh"
