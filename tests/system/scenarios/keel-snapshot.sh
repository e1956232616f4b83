#!/bin/sh
# keel-timeout: 600
# Snapshot and restore of a real Linux guest with a virtio-blk disk and a
# virtio-net NIC (on a tap keel-vmm puts on a bridge this scenario makes in
# L1): a shell loop in the guest counts in /tmp/counter and another writes,
# rereads (caches dropped) and compares disk blocks; the VM is paused,
# snapshotted with keelctl, stopped, and a new keel-vmm --restore must go
# on with the same processes and the same /tmp (guest RAM), the counter
# continuing from where it was rather than starting over, the disk loop
# going on without a mismatch, data written before the snapshot reading
# back from the disk, new disk writes landing in the image, and L1 still
# reaching the guest over the network.
# With a virtio-balloon (32 MiB target) and a virtio-vsock: the balloon
# still holds its pages after the restore (the guest's MemTotal and the
# restored keel-vmm's actual_mib unchanged), and a vsock echo server the
# guest started before the snapshot takes a new host connection after it
# (the restored device resets the transport; listeners survive that).
# Then the restored VM is snapshotted again onto the same file and restored
# once more, the counter still going on.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
. "$KEEL_SYSTEM_DIR/common/disk-loop.sh"
require_binary keelctl >/dev/null
. "$KEEL_KIT/kit.env"
tool=$KEEL_KIT/$KIT_VSOCK_TOOL
[ -x "$tool" ] || fail "the kit has no $KIT_VSOCK_TOOL"
uds=$KEEL_WORKDIR/vsock.sock

sock=$KEEL_WORKDIR/api.sock
snap=$KEEL_WORKDIR/vm.snap
ctl() { keelctl --socket "$sock" "$@"; }
# Until the restored keel-vmm answers its API (vm info in $KEEL_WORKDIR/info).
wait_for_restored_api() { l2_wait_answer vm "$KEEL_WORKDIR/info" ctl vm info; }

scratch=$KEEL_WORKDIR/scratch.img
truncate -s 64M "$scratch"
bridge=keelsnapbr0
l1_bridge "$bridge" 10.78.0.1/24

l2_boot vm --mem 256 --serial-agent --disk-rw "$scratch" --vmm-arg "--api-socket=$sock" \
  --vmm-arg --net --vmm-arg "tap=keelsnap0,mac=52:54:00:78:00:02,bridge=$bridge" \
  --vmm-arg --balloon --vmm-arg target-mib=32,deflate-on-oom=off \
  --vmm-arg --vsock --vmm-arg "cid=7,socket=$uds"
l2_cmd vm 'cat /sys/block/vda/size'
assert_eq "$L2_OUTPUT" 131072 "the scratch disk is vda, 64 MiB"
l2_cmd vm 'ip link set eth0 up && ip addr add 10.78.0.2/24 dev eth0 && echo NET-UP'
assert_eq "$L2_OUTPUT" NET-UP "guest network configured"
ping -c 3 -W 5 10.78.0.2 >/dev/null || fail "L1 cannot ping the guest before the snapshot"

disk_loop_start vm "the snapshot"

# The balloon inflates to its target (1 MiB a round trip under TCG).
deadline=$(_deadline_cs 300)
until ctl --json vm devices | grep -q '"actual_mib": *"32"'; do
  [ "$(_now_cs)" -lt "$deadline" ] || fail "the balloon never reached 32 MiB: $(ctl --json vm devices)"
  sleep 1
done
l2_cmd vm 'awk "/^MemTotal:/ { print \$2 }" /proc/meminfo'
memtotal_before=$L2_OUTPUT
assert_match "$memtotal_before" '^[0-9]+$' "MemTotal with the balloon inflated"
l2_cmd vm 'keel-vsock listen 5000 >/tmp/vsock.log 2>&1 & for i in $(seq 1 50); do grep -q LISTENING /tmp/vsock.log && break; sleep 0.1; done; cat /tmp/vsock.log'
assert_eq "$L2_OUTPUT" "KEEL-VSOCK-LISTENING 5000" "the guest's vsock echo server before the snapshot"

l2_cmd vm 'echo kept-in-tmp > /tmp/kept; (i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/counter.pid; echo started'
assert_eq "$L2_OUTPUT" started "counter started"
sleep 3
l2_cmd vm 'cat /tmp/counter /tmp/counter.pid /tmp/diskcount /tmp/disk.pid'
before=$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)
counter_pid=$(printf '%s\n' "$L2_OUTPUT" | sed -n 2p)
disk_before=$(printf '%s\n' "$L2_OUTPUT" | sed -n 3p)
disk_pid=$(printf '%s\n' "$L2_OUTPUT" | sed -n 4p)
assert_match "$disk_before" '^[0-9]+$' "disk loop iterations before the snapshot"
assert_match "$disk_pid" '^[0-9]+$' "disk loop PID"
assert_match "$before" '^[0-9]+$' "counter before the snapshot"
assert_match "$counter_pid" '^[0-9]+$' "counter PID"
[ "$before" -ge 2 ] || fail "the counter does not count ($before)"

if ctl vm snapshot "$snap" 2> "$KEEL_WORKDIR/running.err"; then
  fail "a snapshot of a running VM was accepted"
fi
assert_match "$(cat "$KEEL_WORKDIR/running.err")" 'not paused' "snapshot of a running VM refused"
[ ! -e "$snap" ] || fail "a refused snapshot left a file"

assert_eq "$(ctl vm pause)" paused "keelctl vm pause"
saved=$(ctl vm snapshot "$snap") || fail "keelctl vm snapshot failed"
log "$saved"
assert_match "$saved" "^$snap: [0-9]+ bytes\$" "keelctl vm snapshot output"
[ -f "$snap" ] || fail "no snapshot file"
[ ! -e "$snap.partial" ] || fail "the partial file was left behind"
assert_match "$(ctl --json vm events)" '"snapshot-saved"' "snapshot-saved event"
assert_match "$(ctl vm stop)" '^stopping' "keelctl vm stop"
l2_wait_exit vm 60 || fail "keel-vmm did not exit after the stop"
assert_eq "$L2_EXIT_RC" 0 "first VMM's exit status"

l2_restore vm "$snap" --vmm-arg "--api-socket=$sock"
wait_for_restored_api
assert_match "$(cat "$KEEL_WORKDIR/info")" '^state +running' "restored VM runs"

l2_cmd vm "cat /tmp/kept /tmp/counter; kill -0 $counter_pid && echo alive; kill -0 $disk_pid && echo disk-alive" 120
printf '%s\n' "$L2_OUTPUT" | sed 's/^/restored| /'
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)" kept-in-tmp "/tmp survived"
after=$(printf '%s\n' "$L2_OUTPUT" | sed -n 2p)
assert_match "$after" '^[0-9]+$' "counter after the restore"
[ "$after" -ge "$before" ] || fail "the counter started over: $before before, $after after"
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 3p)" alive "the counting process survived"
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 4p)" disk-alive "the disk loop survived"
sleep 2
l2_cmd vm 'cat /tmp/counter'
[ "$L2_OUTPUT" -gt "$after" ] || fail "the counter stopped after the restore ($after, then $L2_OUTPUT)"
log "ok: counter $before before the snapshot, $after after the restore, then $L2_OUTPUT"

# The disk after the restore: the loop goes on without a mismatch, the
# data written before the snapshot reads back from the disk, and a new
# write lands in the image.
disk_loop_check vm "the snapshot" "$disk_before" "$disk_pid"
ping -c 3 -W 5 10.78.0.2 >/dev/null || fail "L1 cannot ping the guest after the restore"
log "ok: L1 pings the restored guest"

# The balloon after the restore: the guest still has the pages given back,
# and the restored device's accounting agrees.
l2_cmd vm 'awk "/^MemTotal:/ { print \$2 }" /proc/meminfo'
assert_eq "$L2_OUTPUT" "$memtotal_before" "MemTotal after the restore (the balloon kept its pages)"
assert_match "$(ctl --json vm devices)" '"actual_mib": *"32"' "restored balloon's actual_mib"
log "ok: the balloon holds 32 MiB after the restore, MemTotal $memtotal_before kB"
# A new vsock connection to the server started before the snapshot.
seq 1 3000 > "$KEEL_WORKDIR/sent"
"$tool" uds-connect "$uds" 5000 < "$KEEL_WORKDIR/sent" > "$KEEL_WORKDIR/echoed" 2> "$KEEL_WORKDIR/ok" ||
  fail "host -> guest vsock connection after the restore failed: $(cat "$KEEL_WORKDIR/ok")"
assert_eq "$(sha256sum < "$KEEL_WORKDIR/echoed" | cut -d' ' -f1)" \
  "$(sha256sum < "$KEEL_WORKDIR/sent" | cut -d' ' -f1)" "bytes echoed over vsock after the restore"
log "ok: a new vsock connection works after the restore"

# The restored machine is snapshotted again, onto the file its RAM is
# mapped from, and that snapshot restores too: the counter goes on.
l2_cmd vm 'cat /tmp/counter'
second_before=$L2_OUTPUT
assert_eq "$(ctl vm pause)" paused "keelctl vm pause of the restored VM"
saved=$(ctl vm snapshot "$snap") || fail "keelctl vm snapshot of the restored VM failed"
log "$saved"
assert_match "$(ctl vm stop)" '^stopping' "keelctl vm stop after the second snapshot"
l2_wait_exit vm 60 || fail "the restored keel-vmm did not exit"
assert_eq "$L2_EXIT_RC" 0 "restored VMM's exit status"

l2_restore vm "$snap" --vmm-arg "--api-socket=$sock"
wait_for_restored_api
l2_cmd vm "cat /tmp/kept /tmp/counter; kill -0 $counter_pid && echo alive" 120
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)" kept-in-tmp "/tmp survived the second restore"
second_after=$(printf '%s\n' "$L2_OUTPUT" | sed -n 2p)
assert_match "$second_after" '^[0-9]+$' "counter after the second restore"
[ "$second_after" -ge "$second_before" ] ||
  fail "the counter went back: $second_before before the second snapshot, $second_after after"
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 3p)" alive "the counting process survived twice"
assert_match "$(ctl --json vm devices)" '"actual_mib": *"32"' "balloon after the second restore"
log "ok: re-snapshot of the restored VM: counter $second_before, then $second_after"
assert_match "$(ctl vm stop)" '^stopping' "keelctl vm stop after the second restore"
l2_wait_exit vm 60 || fail "the twice-restored keel-vmm did not exit"
assert_eq "$L2_EXIT_RC" 0 "twice-restored VMM's exit status"
disk_host_check "$scratch" "the snapshot"
echo "KEEL-PASS"
