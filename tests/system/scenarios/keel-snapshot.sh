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
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
require_binary keelctl >/dev/null

sock=$KEEL_WORKDIR/api.sock
snap=$KEEL_WORKDIR/vm.snap
ctl() { keelctl --socket "$sock" "$@"; }

scratch=$KEEL_WORKDIR/scratch.img
truncate -s 64M "$scratch"
bridge=keelsnapbr0
brctl addbr "$bridge" || fail "cannot create bridge $bridge"
ip addr add 10.78.0.1/24 dev "$bridge"
ip link set "$bridge" up

l2_boot vm --mem 256 --serial-agent --disk-rw "$scratch" --vmm-arg "--api-socket=$sock" \
  --vmm-arg --net --vmm-arg "tap=keelsnap0,mac=52:54:00:78:00:02,bridge=$bridge"
l2_cmd vm 'cat /sys/block/vda/size'
assert_eq "$L2_OUTPUT" 131072 "the scratch disk is vda, 64 MiB"
l2_cmd vm 'ip link set eth0 up && ip addr add 10.78.0.2/24 dev eth0 && echo NET-UP'
assert_eq "$L2_OUTPUT" NET-UP "guest network configured"
ping -c 3 -W 5 10.78.0.2 >/dev/null || fail "L1 cannot ping the guest before the snapshot"

# 4 MiB at 40 MiB written and fsync'd before the snapshot: must read back
# from the disk (caches dropped) after the restore.
l2_cmd vm 'dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null && dd if=/tmp/p of=/dev/vda bs=1M seek=40 conv=fsync 2>/dev/null && sha256sum < /tmp/p | cut -d" " -f1'
early_sum=$L2_OUTPUT
assert_match "$early_sum" '^[0-9a-f]{64}$' "checksum of the data written before the snapshot"
# The write-verify loop: a random 4 KiB block written with fsync to one of
# the first 256 blocks, reread from the disk and compared, forever.
l2_cmd vm '(i=0; while :; do i=$((i+1)); b=$((i % 256)); dd if=/dev/urandom of=/tmp/w bs=4096 count=1 2>/dev/null; dd if=/tmp/w of=/dev/vda bs=4096 seek=$b conv=fsync 2>/dev/null; echo 1 > /proc/sys/vm/drop_caches; dd if=/dev/vda of=/tmp/r bs=4096 skip=$b count=1 2>/dev/null; cmp -s /tmp/w /tmp/r || echo "mismatch at $i" >> /tmp/diskerr; echo $i > /tmp/diskcount; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/disk.pid; echo started'
assert_eq "$L2_OUTPUT" started "disk loop started"

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
deadline=$(_deadline_cs 60)
until ctl vm info > "$KEEL_WORKDIR/info" 2>/dev/null; do
  _pid_alive "$(cat "$(_vm_dir vm)/pid")" ||
    fail "the restored keel-vmm exited: $(cat "$(_vm_dir vm)/vmm.err")"
  [ "$(_now_cs)" -lt "$deadline" ] ||
    fail "the restored keel-vmm never answered: $(cat "$(_vm_dir vm)/vmm.err")"
  sleep 0.2
done
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
l2_cmd vm 'cat /tmp/diskcount; cat /tmp/diskerr 2>/dev/null; true'
disk_after=$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)
assert_match "$disk_after" '^[0-9]+$' "disk loop iterations after the restore"
[ "$(printf '%s\n' "$L2_OUTPUT" | wc -l)" -eq 1 ] || fail "disk loop mismatches: $L2_OUTPUT"
[ "$disk_after" -gt "$disk_before" ] || fail "the disk loop stopped ($disk_before, then $disk_after)"
l2_cmd vm "kill $disk_pid; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=1M skip=40 count=4 2>/dev/null | sha256sum | cut -d' ' -f1"
assert_eq "$L2_OUTPUT" "$early_sum" "data written before the snapshot, read back after the restore"
l2_cmd vm 'dd if=/dev/urandom of=/tmp/q bs=1M count=2 2>/dev/null && dd if=/tmp/q of=/dev/vda bs=1M seek=50 conv=fsync 2>/dev/null && echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda bs=1M skip=50 count=2 2>/dev/null | cmp - /tmp/q && sha256sum < /tmp/q | cut -d" " -f1'
late_sum=$L2_OUTPUT
assert_match "$late_sum" '^[0-9a-f]{64}$' "a new disk write after the restore, read back"
log "ok: disk loop $disk_before iterations before, $disk_after after, no mismatch; old and new data read back"
ping -c 3 -W 5 10.78.0.2 >/dev/null || fail "L1 cannot ping the guest after the restore"
log "ok: L1 pings the restored guest"

assert_match "$(ctl vm stop)" '^stopping' "keelctl vm stop after the restore"
l2_wait_exit vm 60 || fail "the restored keel-vmm did not exit"
assert_eq "$L2_EXIT_RC" 0 "restored VMM's exit status"
host_sum=$(dd if="$scratch" bs=1M skip=50 count=2 2>/dev/null | sha256sum | cut -d' ' -f1)
assert_eq "$host_sum" "$late_sum" "host-side checksum of the write made after the restore"
echo "KEEL-PASS"
