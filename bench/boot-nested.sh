#!/usr/bin/env bash
# Linux boot-to-init, keel-vmm vs QEMU microvm, side by side in one L1 of the
# nested harness (bench/nested/boot-to-init.sh). Prints each run and the
# medians. Usage: [BENCH_CMDLINE="kernel params"] [BENCH_KEEL_ARGS="keel-vmm flags"]
# [BENCH_SHMEM_THP=never|advise] bench/boot-nested.sh [RUNS]
# (default 5 rounds; BENCH_CMDLINE is added to both VMMs' command line; L1's
# shmem hugepage setting stays at Debian's default, never, unless set)
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
  --env "BENCH_RUNS=$runs" --env "BENCH_CMDLINE=${BENCH_CMDLINE:-}" \
  --env "BENCH_KEEL_ARGS=${BENCH_KEEL_ARGS:-}" \
  --env "BENCH_SHMEM_THP=${BENCH_SHMEM_THP:-never}" --out "$out" \
  --timeout 1500 >&2
python3 - "$out/boot-to-init.log" <<'PY'
import re, statistics, sys
# When L1 dies mid-run the harness reruns the scenario in a fresh L1 and the
# log holds every attempt: count only the last one.
runs = {}
for line in open(sys.argv[1]):
    if line.startswith("# attempt "):
        runs = {}
    m = re.search(r"BENCH vmm=(\w+) run=(\d+) boot_ms=(\d+)", line)
    if m:
        runs[(m.group(1), int(m.group(2)))] = int(m.group(3))
times = {}
for (vmm, run), ms in sorted(runs.items()):
    times.setdefault(vmm, []).append(ms)
if set(times) != {"keel", "qemu"}:
    sys.exit(f"boot-nested: missing results in {sys.argv[1]}: {times}")
for vmm in ("keel", "qemu"):
    print(f"{vmm:5} runs (ms): {' '.join(map(str, times[vmm]))}  median {statistics.median(times[vmm]):.0f}")
ratio = statistics.median(times["keel"]) / statistics.median(times["qemu"])
print(f"keel/qemu median boot-to-init: {ratio:.2f}")
PY
