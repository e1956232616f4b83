#!/bin/sh
# keel-timeout: 900
# Benchmark (not a test): wall time from starting the VMM to the guest's
# KEEL-INIT-READY line, keel-vmm against QEMU microvm, same kernel, initrd,
# command line, 1 vCPU and 256 MiB, alternating VMMs for BENCH_RUNS rounds.
# BENCH_CMDLINE adds kernel parameters to both (for experiments).
# L1 is the host here, left at Debian's default: shmem transparent
# hugepages never, THP for anonymous memory on madvise or always. keel-vmm's
# guest RAM is anonymous (the default --memory-backend anon), as QEMU's is,
# so both get 2 MiB pages without host setup. BENCH_SHMEM_THP=advise sets
# L1's shmem setting (what --memory-backend memfd would need); BENCH_KEEL_ARGS
# adds keel-vmm flags (e.g. --memory-backend memfd) for experiments.
# Run through bench/boot-nested.sh, which parses the BENCH lines.
set -euo pipefail
. "$KEEL_SYSTEM_DIR/lib.sh"
. "$KEEL_KIT/kit.env"

runs=${BENCH_RUNS:-5}
echo "${BENCH_SHMEM_THP:-never}" > /sys/kernel/mm/transparent_hugepage/shmem_enabled
log "transparent hugepages: $(cat /sys/kernel/mm/transparent_hugepage/enabled)," \
  "shmem: $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled)"
kernel=${BENCH_KERNEL:-$KIT_VMLINUZ}

boot_once() {
  local vmm=$1 run=$2 dir start end pid
  dir="$KEEL_WORKDIR/$vmm-$run"
  mkdir -p "$dir"
  KEEL_L2_VMM=$vmm
  keel_args=''
  if [ "$vmm" = keel ]; then
    for arg in ${BENCH_KEEL_ARGS:-}; do keel_args="$keel_args --vmm-arg $arg"; done
  fi
  # shellcheck disable=SC2086  # BENCH_CMDLINE is a list of kernel parameters, keel_args of options
  _l2_parse_options --cpus 1 --mem 256 --kernel "$KEEL_KIT/$kernel" \
    ${BENCH_CMDLINE:+--cmdline "$BENCH_CMDLINE"} $keel_args
  mkfifo "$dir/in"
  start=$(_now_cs)
  ( "_l2_exec_$vmm" ) <>"$dir/in" >"$dir/console.log" 2>"$dir/vmm.err" &
  pid=$!
  echo "$pid" >> "$KEEL_WORKDIR/pids"
  until grep -q '^KEEL-INIT-READY' "$dir/console.log"; do
    _pid_alive "$pid" || { cat "$dir/vmm.err"; fail "$vmm exited before the guest's init"; }
    [ $(( $(_now_cs) - start )) -lt 18000 ] || fail "$vmm: no init within 180 s"
    sleep 0.05
  done
  end=$(_now_cs)
  # Guest RAM in 2 MiB pages (anonymous, or shmem for a memfd), to show
  # whether the host's hugepage setting took effect.
  huge_kb=$(awk '/^(AnonHugePages|ShmemPmdMapped):/ { kb += $2 } END { print kb + 0 }' \
    "/proc/$pid/smaps_rollup" 2>/dev/null || echo unknown)
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo "BENCH vmm=$vmm run=$run boot_ms=$(( (end - start) * 10 )) hugepages_kb=$huge_kb"
}

run=1
while [ "$run" -le "$runs" ]; do
  boot_once keel "$run"
  boot_once qemu "$run"
  run=$((run + 1))
done
echo "KEEL-PASS"
