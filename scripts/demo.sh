#!/usr/bin/env bash
# Keel's main job, end to end on a fresh Debian 12 machine: install what is
# missing, build, build the guest kit, and boot a real Linux guest with its
# serial console on this terminal.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/demo.sh [--vmm keel|qemu] [--cpus N] [--memory MiB]

Boots the Debian cloud kernel with Keel's guest kit and shows the guest's
serial console here. Where this host has VT-x/AMD-V (/dev/kvm backed by
kvm_intel or kvm_amd) the guest runs directly on it; elsewhere (no /dev/kvm,
or a PVM /dev/kvm that cannot boot a stock kernel) it runs inside a nested
L1 Linux under QEMU's TCG emulator with emulated AMD-V, which is slower
(about a minute). The script says which it chose and why.
With a terminal on stdin you get the guest's shell; type 'poweroff -f' to end.

  --vmm keel|qemu   the VMM that runs the guest (default: keel)
  --cpus N          guest vCPUs (default 2)
  --memory MiB      guest memory (default 512)
USAGE
}

args=(--vmm keel)
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --vmm|--cpus|--memory)
      [[ $# -ge 2 ]] || { echo "demo.sh: $1 needs a value" >&2; exit 2; }
      args+=("$1" "$2"); shift 2 ;;
    *) echo "demo.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

"$KEEL_ROOT/scripts/setup.sh"
keel_build "$KEEL_ROOT/build"
"$KEEL_ROOT/scripts/kit/build-kit.sh" "$KEEL_ROOT/build/kit"
exec python3 "$KEEL_ROOT/tests/system/harness.py" demo --kit "$KEEL_ROOT/build/kit" \
  --binary "$KEEL_ROOT/build/src/vmm/keel-vmm" --out "$KEEL_ROOT/build/demo" "${args[@]}"
