#!/usr/bin/env bash
# qcow2 on the virtio-blk device path: against raw on the same device path,
# and against `qemu-img bench` on the same image at the same queue depth.
# blk_bench (bench/blk/blk_bench.cc) drives keel's Blk device in process over
# a raw file (io_uring) or a qcow2 image (Qcow2Image, as keel-vmm serves it).
# Goals: qcow2 >= 0.9 x raw; keel >= 1.0 x qemu-img bench.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: bench/qcow2.sh [--seconds S] [--size-mib N] [--dir DIR] [--runs N]

  --seconds S    run time of each timed keel phase (default 5); qemu-img
                 bench gets the request count keel completed in that time
  --size-mib N   virtual size of the images (default 1024); must fit in RAM
  --dir DIR      where the images live (default /var/tmp/keel-qcow2-bench):
                 raw.img (random bytes), full.qcow2 (qemu-img convert of it:
                 every cluster allocated), fresh-*.qcow2 and fresh-raw.img
                 (made empty before each allocating phase, so every write
                 allocates, in qcow2 and in the file system alike)
  --runs N       repeat both tables N times (default 1); in the first table
                 each side is timed twice (odd runs raw, qcow2, qcow2, raw;
                 even runs the other way round) and averaged
Needs build/bench/blk_bench (scripts/build.sh) and qemu-img (qemu-utils).
USAGE
}

seconds=5
size_mib=1024
dir=/var/tmp/keel-qcow2-bench
runs=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --size-mib) size_mib=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "qcow2.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
bench=${KEEL_BUILD_DIR:-$root/build}/bench/blk_bench
[[ -x $bench ]] || { echo "qcow2.sh: $bench missing; run scripts/build.sh" >&2; exit 1; }
command -v qemu-img >/dev/null || { echo "qcow2.sh: qemu-img missing (qemu-utils)" >&2; exit 1; }

mkdir -p "$dir"
raw=$dir/raw.img
full=$dir/full.qcow2
size_bytes=$((size_mib << 20))
if [[ ! -f $raw || $(stat -c %s "$raw") -ne $size_bytes ]]; then
  echo "qcow2.sh: writing $size_mib MiB of random data to $raw" >&2
  dd if=/dev/urandom of="$raw" bs=1M count="$size_mib" status=none
  rm -f "$full"
fi
# -S 0: every cluster allocated even where raw.img holds zeroes, which it
# does wherever an earlier run's write phases went (blk_bench writes zeroes).
[[ -f $full ]] || qemu-img convert -S 0 -f raw -O qcow2 "$raw" "$full"

fresh() {  # a new empty qcow2 image of the same size -> its path
  local path=$dir/fresh-$1.qcow2
  rm -f "$path"
  qemu-img create -q -f qcow2 "$path" "$size_bytes"
  echo "$path"
}

fresh_raw() {  # a new sparse raw image of the same size -> its path
  # The raw side of an allocating row: its writes allocate the file's
  # blocks too, as a fresh raw disk's first writes do. Against raw.img
  # (every block allocated and cached) the row timed block allocation on
  # one side only.
  local path=$dir/fresh-raw.img
  rm -f "$path"
  truncate -s "$size_bytes" "$path"
  echo "$path"
}

# Before every timed run: write back what the previous one dirtied (and the
# images just made), so that no run pays for another's writeback; then wait
# until the kernel reports no dirty or writeback pages left (sync returns
# when this process's view is clean, other flushers may still be busy).
settle() {
  sync
  local i
  for ((i = 0; i < 50; ++i)); do
    awk '/^(Dirty|Writeback):/ { n += $2 } END { exit !(n < 1024) }' /proc/meminfo && return 0
    sleep 0.1
  done
}

# Puts files in the page cache in the same state: dropped (clean pages only,
# hence the sync), then read back whole by one reader. The state matters as
# much as the format: how a file's pages were cached decides the size of
# their folios, and ext4 walks every 4 KiB block of a folio on each buffered
# write into it, so 4 KiB writes into a file read in by `cat` (large folios)
# ran ~5x slower than into one read 4 KiB at a time (bench/RESULTS.md).
recache() {
  sync
  local f
  for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done
  cat "$@" >/dev/null
}

keel() {  # format file phase [step [requests]] -> "iops mbps"
  settle
  local args=(--format "$1" --file "$2" --phase "$3" --depth 32 --seconds "$seconds")
  [[ -n ${4:-} ]] && args+=(--step "$4")
  [[ -n ${5:-} ]] && args+=(--requests "$5" --seconds 600)
  local line errors
  line=$("$bench" "${args[@]}")
  errors=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$line")
  [[ $errors == 0 ]] || echo "qcow2.sh: keel $3 on $2: $errors requests failed" >&2
  echo "$(sed -n 's/.*iops=\([0-9.]*\).*/\1/p' <<<"$line") $(sed -n 's/.*mbps=\([0-9.]*\).*/\1/p' <<<"$line")"
}

qemu_bench() {  # cache file bytes step count write(0/1) -> iops
  settle
  local args=(-f qcow2 -t "$1" -c "$5" -d 32 -s "$3" -S "$4")
  [[ $6 == 1 ]] && args+=(-w)
  local out
  out=$(qemu-img bench "${args[@]}" "$2")
  python3 -c "
import re, sys
t = float(re.search(r'Run completed in ([0-9.]+) seconds', sys.argv[1]).group(1))
print('%.0f' % ($5 / t))" "$out"
}

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

# One pass over the disk: every request of a fresh image allocates (4k
# requests 68 KiB apart each start a new 64 KiB cluster).
step_4k=69632
pass_4k=$(((size_bytes - 4096) / step_4k + 1))
pass_1m=$((size_bytes >> 20))

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r) $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# images in $dir ($size_mib MiB), depth 32, keel $seconds s per timed phase; $(qemu-img --version | head -1)"
for ((run = 1; run <= runs; run++)); do
  echo
  echo "## keel device path: qcow2 against raw (full: every cluster allocated; alloc: a fresh"
  echo "## qcow2 image, one pass in which every request allocates, against a fresh sparse raw"
  echo "## file on the same offsets; each side timed twice, A B B A, and averaged)"
  printf '%-18s %10s %10s %11s %11s %10s\n' phase raw_iops raw_MB/s qcow2_iops qcow2_MB/s qcow2/raw
  # name phase qcow2-image [step requests]
  rows=("randread-4k randread-4k full"
        "randwrite-4k randwrite-4k full"
        "seqread-1m seqread-1m full"
        "seqwrite-1m seqwrite-1m full"
        "alloc-write-4k randwrite-4k fresh $step_4k $pass_4k"
        "alloc-write-1m seqwrite-1m fresh 1048576 $pass_1m")
  for row in "${rows[@]}"; do
    read -r name phase image step requests <<<"$row"
    # Each side is timed twice, in the order A B B A (odd runs: A is raw,
    # even runs: qcow2), each time after the same recache (and on a new
    # image for the alloc rows), and the two figures averaged: whichever
    # side went first after the previous row's phase swung the ratio by up
    # to 0.45 when each was timed once.
    sides=(raw qcow2 qcow2 raw)
    ((run % 2 == 1)) || sides=(qcow2 raw raw qcow2)
    raw_sum=0 raw_mb_sum=0 q_sum=0 q_mb_sum=0
    for side in "${sides[@]}"; do
      recache "$raw" "$full"  # page-cached alike for every side
      if [[ $side == raw ]]; then
        raw_path=$raw
        [[ $image == fresh ]] && raw_path=$(fresh_raw)
        read -r iops mbps <<<"$(keel raw "$raw_path" "$phase" "${step:-}" "${requests:-}")"
        raw_sum=$(python3 -c "print($raw_sum + $iops)")
        raw_mb_sum=$(python3 -c "print($raw_mb_sum + $mbps)")
      else
        path=$full
        [[ $image == fresh ]] && path=$(fresh keel)
        read -r iops mbps <<<"$(keel qcow2 "$path" "$phase" "${step:-}" "${requests:-}")"
        q_sum=$(python3 -c "print($q_sum + $iops)")
        q_mb_sum=$(python3 -c "print($q_mb_sum + $mbps)")
      fi
    done
    read -r raw_iops raw_mbps q_iops q_mbps <<<"$(python3 -c "
print('%.0f %.1f %.0f %.1f' % ($raw_sum / 2, $raw_mb_sum / 2, $q_sum / 2, $q_mb_sum / 2))")"
    printf '%-18s %10s %10s %11s %11s %10s\n' "$name" "$raw_iops" "$raw_mbps" "$q_iops" "$q_mbps" \
      "$(ratio "$q_iops" "$raw_iops")"
  done

  echo
  echo "## keel against qemu-img bench, same qcow2 image, depth 32, same offsets (4k: 68 KiB"
  echo "## apart; 1m: sequential; wrapping at the end); fresh: one pass, every request allocates"
  printf '%-16s %10s %12s %8s %14s %9s\n' case keel_iops qemu_wb_iops keel/wb qemu_none_iops \
    keel/none
  # name image bytes step write phase
  cases=("read-4k-full full 4096 $step_4k 0 randread-4k"
         "write-4k-full full 4096 $step_4k 1 randwrite-4k"
         "write-4k-fresh fresh 4096 $step_4k 1 randwrite-4k"
         "read-1m-full full 1048576 1048576 0 seqread-1m"
         "write-1m-full full 1048576 1048576 1 seqwrite-1m"
         "write-1m-fresh fresh 1048576 1048576 1 seqwrite-1m")
  for c in "${cases[@]}"; do
    read -r name image bytes step write phase <<<"$c"
    recache "$full"
    if [[ $image == fresh ]]; then
      count=$pass_4k
      [[ $bytes == 1048576 ]] && count=$pass_1m
      read -r keel_iops _ <<<"$(keel qcow2 "$(fresh keel)" "$phase" "$step" "$count")"
      wb=$(qemu_bench writeback "$(fresh qemu-wb)" "$bytes" "$step" "$count" "$write")
      none=$(qemu_bench none "$(fresh qemu-none)" "$bytes" "$step" "$count" "$write")
    else
      read -r keel_iops _ <<<"$(keel qcow2 "$full" "$phase" "$step")"
      # keel's request count in its time, capped so that qemu-img bench
      # -t none (O_DIRECT, far slower here) ends in tens of seconds.
      cap=200000
      [[ $bytes == 1048576 ]] && cap=20000
      count=$(python3 -c "print(max(1000, min($cap, int($keel_iops * $seconds))))")
      wb=$(qemu_bench writeback "$full" "$bytes" "$step" "$count" "$write")
      none=$(qemu_bench none "$full" "$bytes" "$step" "$count" "$write")
    fi
    printf '%-16s %10s %12s %8s %14s %9s\n' "$name" "$keel_iops" "$wb" "$(ratio "$keel_iops" "$wb")" \
      "$none" "$(ratio "$keel_iops" "$none")"
  done
done
rm -f "$dir"/fresh-*.qcow2 "$dir"/fresh-raw.img
