#!/usr/bin/env bash
# virtio-blk device path against fio on the same page-cached raw file.
# blk_bench (bench/blk/blk_bench.cc) drives the Blk device in process;
# fio runs io_uring at the same queue depth with buffered I/O. Each phase
# runs both, one after the other, and prints IOPS, MB/s and keel/fio.
# Goal: keel ≥ 0.8 × fio on every phase.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: bench/blk.sh [--seconds S] [--size-mib N] [--file PATH] [--runs N]

  --seconds S    run time of each phase, each side (default 10)
  --size-mib N   size of the test file (default 1024); it must fit in RAM
  --file PATH    the test file (default /var/tmp/keel-blk-bench.img; made
                 from random bytes if missing or of another size)
  --runs N       repeat the whole comparison N times (default 1)
Needs build/bench/blk_bench (scripts/build.sh) and fio (scripts/setup.sh).
USAGE
}

seconds=10
size_mib=1024
file=/var/tmp/keel-blk-bench.img
runs=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --size-mib) size_mib=$2; shift 2 ;;
    --file) file=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "blk.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
bench=${KEEL_BUILD_DIR:-$root/build}/bench/blk_bench
[[ -x $bench ]] || { echo "blk.sh: $bench missing; run scripts/build.sh" >&2; exit 1; }
command -v fio >/dev/null || { echo "blk.sh: fio missing; run scripts/setup.sh" >&2; exit 1; }

size_bytes=$((size_mib << 20))
if [[ ! -f $file || $(stat -c %s "$file") -ne $size_bytes ]]; then
  echo "blk.sh: writing $size_mib MiB of random data to $file" >&2
  dd if=/dev/urandom of="$file" bs=1M count="$size_mib" status=none
fi

# name, fio --rw, block size
phases=("randread-4k randread 4k" "seqread-1m read 1M" "seqwrite-1m write 1M")

fio_run() {  # rw bs -> "iops mbps"
  # invalidate=0 keeps the page cache (fio drops it by default);
  # gtod_reduce and norandommap trim fio's own per-I/O work.
  fio --name=blk --filename="$file" --size="$size_bytes" --ioengine=io_uring --iodepth=32 \
      --direct=0 --invalidate=0 --norandommap --randrepeat=0 --gtod_reduce=1 \
      --rw="$1" --bs="$2" --time_based --runtime="$seconds" --output-format=json 2>/dev/null |
    python3 -c '
import json, sys
job = json.load(sys.stdin)["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
print("%.0f %.1f" % (side["iops"], side["bw_bytes"] / 1e6))'
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r) $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# file $file ($size_mib MiB), depth 32, $seconds s per phase and side"
printf '%-12s %12s %10s %12s %10s %8s\n' phase keel_iops keel_MB/s fio_iops fio_MB/s keel/fio
for ((run = 1; run <= runs; run++)); do
  for phase in "${phases[@]}"; do
    read -r name rw bs <<<"$phase"
    cat "$file" >/dev/null  # page-cached for both sides
    line=$("$bench" --file "$file" --seconds "$seconds" --depth 32 --phase "$name")
    keel_iops=$(sed -n 's/.*iops=\([0-9.]*\).*/\1/p' <<<"$line")
    keel_mbps=$(sed -n 's/.*mbps=\([0-9.]*\).*/\1/p' <<<"$line")
    errors=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$line")
    [[ $errors == 0 ]] || echo "blk.sh: $name: $errors requests failed" >&2
    read -r fio_iops fio_mbps <<<"$(fio_run "$rw" "$bs")"
    ratio=$(python3 -c "print(f'{$keel_iops / $fio_iops:.2f}')")
    printf '%-12s %12s %10s %12s %10s %8s\n' "$name" "$keel_iops" "$keel_mbps" "$fio_iops" \
      "$fio_mbps" "$ratio"
  done
done
