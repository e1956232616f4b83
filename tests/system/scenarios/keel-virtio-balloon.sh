#!/bin/sh
# keel-timeout: 600
# virtio-balloon: a guest started with a 128 MiB balloon target (and no
# deflate-on-OOM, so Linux takes the pages out of MemTotal) reports about
# 128 MiB less memory than the same guest with a target of 0, and stays
# usable.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"

mem_total_kb() {
  # MemTotal once it has settled (the driver inflates in the background).
  l2_cmd "$1" 'last=0; for i in $(seq 1 100); do now=$(awk "/^MemTotal:/ { print \$2 }" /proc/meminfo); [ "$now" = "$last" ] && break; last=$now; sleep 0.3; done; echo $now'
  echo "$L2_OUTPUT"
}

l2_boot base --cpus 1 --mem 512 --serial-agent --vmm-arg --balloon --vmm-arg target-mib=0,deflate-on-oom=off
base_kb=$(mem_total_kb base | tail -n 1)
l2_send base keel-exit
l2_wait_exit base 60 || fail "VMM did not exit after the base guest powered off"

l2_boot vm --cpus 1 --mem 512 --serial-agent --vmm-arg --balloon --vmm-arg target-mib=128,deflate-on-oom=off
# Wait until the balloon holds at least the lower bound checked below (the
# driver inflates 1 MiB per round trip; under nested TCG that takes a
# while), then until MemTotal settles, so the check sees the final value.
l2_cmd vm 'i=0; while [ $i -lt 600 ]; do t=$(awk "/^MemTotal:/ { print \$2 }" /proc/meminfo); [ "$t" -le '"$((base_kb - 127 * 1024))"' ] && break; i=$((i+1)); sleep 0.3; done; echo "$i polls, $t kB"' 300
log "inflated to the lower bound after $(printf '%s' "$L2_OUTPUT" | tail -n 1)"
vm_kb=$(mem_total_kb vm | tail -n 1)
log "MemTotal: $base_kb kB without the balloon, $vm_kb kB with a 128 MiB target"
assert_in_range "$((base_kb - vm_kb))" $((127 * 1024)) $((129 * 1024)) "kB taken by the balloon"
# The guest still works with what is left: allocate and touch 200 MiB.
l2_cmd vm 'dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null && echo ALLOC-OK'
assert_eq "$L2_OUTPUT" ALLOC-OK "200 MiB allocation in the ballooned guest"

l2_send vm keel-exit
l2_wait vm 'KEEL-RESULT rc=' 60 || fail "no KEEL-RESULT after keel-exit"
l2_wait_exit vm 60 || fail "VMM did not exit after the guest powered off"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status"
echo "KEEL-PASS"
