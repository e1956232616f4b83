#!/usr/bin/env bash
# Regenerates src/vmm/hot-functions.txt, the symbol ordering file keel-vmm is
# linked with (src/vmm/CMakeLists.txt): every function keel-vmm runs to start
# bench/startup_memory.py's tiny guest, spin it and stop on SIGTERM, with and
# without --api-socket (one GET served), as valgrind's callgrind saw them.
# lld lays these functions out next to each other, so the text a running VMM
# faults in (64 KiB at a time, fault-around) holds little code it never runs.
# A stale list costs only resident memory: symbols no longer there are
# ignored, new ones are laid out after the list. Needs /dev/kvm and valgrind.
# Usage: [KEELCTL=PATH] bench/hot-functions.sh [KEEL_VMM] [GUEST_ELF]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keel=${1:-$root/build/src/vmm/keel-vmm}
guest=${2:-$root/build/tests/guest/pvh_check.elf}
keelctl=${KEELCTL:-$root/build/src/keelctl/keelctl}
for file in "$keel" "$guest" "$keelctl"; do
  [[ -x "$file" || -f "$file" ]] || { echo "hot-functions.sh: $file not found (build first)" >&2; exit 2; }
done
command -v valgrind >/dev/null || { echo "hot-functions.sh: valgrind is not installed" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

profile() {  # NAME [keel-vmm arguments...]
  local name=$1 pid
  shift
  valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/$name.out" \
    "$keel" --kernel "$guest" --cmdline "pvh-test s" --memory 256 --cpus 1 --serial none \
    --debug-exit "$@" >"$work/$name.log" 2>&1 &
  pid=$!
  sleep 5  # valgrind runs start-up ~50x slower than native
  if [[ $name == api ]]; then
    "$keelctl" --socket "$work/api.sock" vm info >/dev/null ||
      { echo "hot-functions.sh: the API did not answer" >&2; kill "$pid"; exit 1; }
  fi
  sleep 1
  kill -TERM "$pid"
  wait "$pid" || { cat "$work/$name.log" >&2; echo "hot-functions.sh: keel-vmm failed" >&2; exit 1; }
}
profile spin
profile api --api-socket "$work/api.sock"

# callgrind names a function once, on its first fn= or cfn= line; addresses
# without a symbol and valgrind's own "(below main)" are not functions.
out="$root/src/vmm/hot-functions.txt"
cat "$work"/*.out | sed -nE 's/^c?fn=\([0-9]+\) (.*)$/\1/p' | sed -E "s/'[0-9]+$//" |
  grep -vE '^(0x[0-9a-f]+|\(below main\))$' | LC_ALL=C sort -u > "$out"
echo "hot-functions.sh: $(wc -l < "$out") functions in $out"
