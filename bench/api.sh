#!/usr/bin/env bash
# Control API latency: p50/p99 of GET /api/v1/vm (state) and of PUT
# pause/resume with 1 to 64 concurrent clients, each on its own kept-alive
# connection (bench/api/api_bench.cc), against a keel-vmm running an idle
# tiny guest (pvh_check.elf, `pvh-test h`: prints, then halts with
# interrupts off, so its vCPU sleeps in KVM) on the host's /dev/kvm.
# Goal: p99 ≤ 1 ms for a GET.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: bench/api.sh [--requests N] [--clients "1 2 4 ..."] [--operation get|pause-resume]

  --requests N     requests per client at each client count (default 2000)
  --clients LIST   client counts (default "1 2 4 8 16 32 64")
  --operation OP   only this operation (default: get, then pause-resume)
Needs build/src/vmm/keel-vmm, build/bench/api_bench and
build/tests/guest/pvh_check.elf (scripts/build.sh), and a usable /dev/kvm.
USAGE
}

requests=2000
clients="1 2 4 8 16 32 64"
operation=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --requests) requests=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --operation) operation=(--operation "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "api.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
build=${KEEL_BUILD_DIR:-$root/build}
vmm=$build/src/vmm/keel-vmm
bench=$build/bench/api_bench
guest=$build/tests/guest/pvh_check.elf
for file in "$vmm" "$bench" "$guest"; do
  [[ -e $file ]] || { echo "api.sh: $file missing; run scripts/build.sh" >&2; exit 1; }
done

dir=$(mktemp -d /tmp/keel-api-bench.XXXXXX)
socket=$dir/api.sock
"$vmm" --kernel "$guest" --cmdline "pvh-test h" --memory 64 --no-acpi --serial none \
  --api-socket "$socket" &
vmm_pid=$!
cleanup() {
  kill "$vmm_pid" 2>/dev/null || true
  wait "$vmm_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 100); do
  [[ -S $socket ]] && break
  sleep 0.05
done
[[ -S $socket ]] || { echo "api.sh: keel-vmm did not open $socket" >&2; exit 1; }

echo "# $(date -u +%FT%TZ) $(uname -r), $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
# shellcheck disable=SC2086  # the client counts are separate words
"$bench" --socket "$socket" --requests "$requests" --clients $clients "${operation[@]}"
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
