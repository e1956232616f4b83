#!/bin/sh
# keel-timeout: 600
# Diagnostic (not a test): boots the same guest once under each VMM (1 vCPU,
# 256 MiB, the benchmark's command line) and prints the guest's dmesg, its
# interrupt counts and clocksource after init, and keel-vmm's exit counts, so
# the kernel's own timestamps can be compared phase by phase.
# Run: KEEL_SCENARIO_DIR=bench/nested tests/system/harness.py run ... --scenario boot-dmesg
set -euo pipefail
. "$KEEL_SYSTEM_DIR/lib.sh"

# BENCH_SHMEM_THP (experiments): the value to write to L1's
# /sys/kernel/mm/transparent_hugepage/shmem_enabled first.
if [ -n "${BENCH_SHMEM_THP:-}" ]; then
  echo "$BENCH_SHMEM_THP" > /sys/kernel/mm/transparent_hugepage/shmem_enabled
fi
log "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled), shmem: $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled)"
# With initcall_debug in BENCH_CMDLINE, only initcalls slower than 5 ms are kept.
script=$(cat <<'GUEST'
dmesg | awk '!/calling / && !(/initcall .* returned .* after [0-9]+ usecs/ && $(NF-1) < 5000)'
cat /proc/interrupts
cat /sys/devices/system/clocksource/clocksource0/current_clocksource
GUEST
)
for vmm in keel qemu; do
  KEEL_L2_VMM=$vmm KEEL_VMM_LOG_LEVEL=info l2_boot "dmesg-$vmm" --cpus 1 --mem 256 \
    --cmdline "keel.cmd=$(printf '%s\n' "$script" | b64 -) ${BENCH_CMDLINE:-}"
  grep -E 'Rss|Huge|PmdMapped' "/proc/$(cat "$(_vm_dir "dmesg-$vmm")/pid")/smaps_rollup" | sed "s/^/[$vmm-smaps] /" || true
  l2_wait "dmesg-$vmm" 'KEEL-RESULT' 300 || fail "$vmm: no KEEL-RESULT"
  l2_wait_exit "dmesg-$vmm" 60 || true
  sed "s/^/[$vmm] /" "$(_vm_dir "dmesg-$vmm")/console.log"
  sed "s/^/[$vmm-err] /" "$(_vm_dir "dmesg-$vmm")/vmm.err"
done
echo "KEEL-PASS"
