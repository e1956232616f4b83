#!/usr/bin/env bash
# Linux boot-to-init, keel-vmm vs QEMU microvm, side by side in one L1 of the
# nested harness (bench/nested/boot-to-init.sh). Prints each run and the
# medians. Usage: [BENCH_CMDLINE="kernel params"] bench/boot-nested.sh [RUNS]
# (default 5 rounds; BENCH_CMDLINE is added to both VMMs' command line)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=${1:-5}
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "boot-nested.sh: RUNS must be a positive number" >&2; exit 2; }
"$root/scripts/build.sh" >/dev/null
"$root/scripts/kit/build-kit.sh" "$root/build/kit" >/dev/null
out="$root/build/bench/boot-nested"
rm -rf "$out"
KEEL_SCENARIO_DIR="$root/bench/nested" python3 "$root/tests/system/harness.py" run \
  --kit "$root/build/kit" --binary "$root/build/src/vmm/keel-vmm" --scenario boot-to-init \
  --env "BENCH_RUNS=$runs" --env "BENCH_CMDLINE=${BENCH_CMDLINE:-}" --out "$out" \
  --timeout 1500 >&2
python3 - "$out/boot-to-init.log" <<'PY'
import re, statistics, sys
times = {}
for line in open(sys.argv[1]):
    m = re.search(r"BENCH vmm=(\w+) run=(\d+) boot_ms=(\d+)", line)
    if m:
        times.setdefault(m.group(1), []).append(int(m.group(3)))
if set(times) != {"keel", "qemu"}:
    sys.exit(f"boot-nested: missing results in {sys.argv[1]}: {times}")
for vmm in ("keel", "qemu"):
    print(f"{vmm:5} runs (ms): {' '.join(map(str, times[vmm]))}  median {statistics.median(times[vmm]):.0f}")
ratio = statistics.median(times["keel"]) / statistics.median(times["qemu"])
print(f"keel/qemu median boot-to-init: {ratio:.2f}")
PY
