#!/bin/sh
# keel-timeout: 500
# Live migration of a real Linux guest with a virtio-blk disk (a raw image
# both keel-vmm processes open, as shared storage would be) over a unix
# socket: a shell loop in the guest counts in /tmp/counter and another
# writes, rereads (caches dropped) and compares disk blocks. First a
# destination is killed in the middle of a bandwidth-limited migration: the
# source must run on. Then a second destination receives the guest: the
# same processes and /tmp go on there, the counter continuing, the disk
# loop going on without a mismatch, data written before the migration
# reading back from the disk, a new write landing in the image, and the
# source exits 0.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
require_binary keelctl >/dev/null

sock=$KEEL_WORKDIR/source.sock
ctl() { keelctl --socket "$sock" "$@"; }
wait_for_socket() {
  local deadline
  deadline=$(_deadline_cs 30)
  until [ -S "$1" ]; do
    [ "$(_now_cs)" -lt "$deadline" ] || fail "no listener on $1"
    sleep 0.1
  done
}

scratch=$KEEL_WORKDIR/scratch.img
truncate -s 64M "$scratch"
l2_boot src --mem 256 --serial-agent --disk-rw "$scratch" --vmm-arg "--api-socket=$sock"
l2_cmd src 'cat /sys/block/vda/size'
assert_eq "$L2_OUTPUT" 131072 "the scratch disk is vda, 64 MiB"
# 4 MiB at 40 MiB written and fsync'd before the migration: must read back
# from the disk (caches dropped) on the destination.
l2_cmd src 'dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null && dd if=/tmp/p of=/dev/vda bs=1M seek=40 conv=fsync 2>/dev/null && sha256sum < /tmp/p | cut -d" " -f1'
early_sum=$L2_OUTPUT
assert_match "$early_sum" '^[0-9a-f]{64}$' "checksum of the data written before the migration"
# The write-verify loop: a random 4 KiB block written with fsync to one of
# the first 256 blocks, reread from the disk and compared, forever.
l2_cmd src '(i=0; while :; do i=$((i+1)); b=$((i % 256)); dd if=/dev/urandom of=/tmp/w bs=4096 count=1 2>/dev/null; dd if=/tmp/w of=/dev/vda bs=4096 seek=$b conv=fsync 2>/dev/null; echo 1 > /proc/sys/vm/drop_caches; dd if=/dev/vda of=/tmp/r bs=4096 skip=$b count=1 2>/dev/null; cmp -s /tmp/w /tmp/r || echo "mismatch at $i" >> /tmp/diskerr; echo $i > /tmp/diskcount; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/disk.pid; echo started'
assert_eq "$L2_OUTPUT" started "disk loop started"
l2_cmd src 'echo kept-in-tmp > /tmp/kept; (i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/counter.pid; echo started'
assert_eq "$L2_OUTPUT" started "counter started"
sleep 2
l2_cmd src 'cat /tmp/counter /tmp/counter.pid /tmp/diskcount /tmp/disk.pid'
first=$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)
counter_pid=$(printf '%s\n' "$L2_OUTPUT" | sed -n 2p)
disk_before=$(printf '%s\n' "$L2_OUTPUT" | sed -n 3p)
disk_pid=$(printf '%s\n' "$L2_OUTPUT" | sed -n 4p)
assert_match "$disk_before" '^[0-9]+$' "disk loop iterations before the migrations"
assert_match "$disk_pid" '^[0-9]+$' "disk loop PID"
assert_match "$first" '^[0-9]+$' "counter before the migrations"
assert_match "$counter_pid" '^[0-9]+$' "counter PID"

# 1. The destination dies mid-migration (1 MiB/s: 256 MiB take minutes).
doomed=$KEEL_WORKDIR/doomed.sock
l2_incoming doomed "unix:$doomed" --vmm-arg "--api-socket=$KEEL_WORKDIR/doomed-api.sock"
wait_for_socket "$doomed"
ctl vm migrate "unix:$doomed" --bandwidth 1 > "$KEEL_WORKDIR/doomed.out" 2> "$KEEL_WORKDIR/doomed.err" &
migrate_pid=$!
sleep 3
assert_match "$(ctl --json vm migrate-status)" '"phase": "copying"' "migration in progress"
l2_kill doomed
if wait "$migrate_pid"; then fail "keelctl vm migrate succeeded with a dead destination"; fi
log "keelctl: $(cat "$KEEL_WORKDIR/doomed.err")"
assert_match "$(cat "$KEEL_WORKDIR/doomed.err")" 'runs on here' "keelctl reports the failure"
assert_match "$(ctl vm migrate-status)" '^migration failed' "the migration failed"
assert_match "$(ctl vm info)" 'state +running' "the source runs on"
l2_cmd src 'cat /tmp/counter'
middle=$L2_OUTPUT
[ "$middle" -gt "$first" ] || fail "the source's counter stopped ($first, then $middle)"

# 2. A real migration.
mig=$KEEL_WORKDIR/migration.sock
dsock=$KEEL_WORKDIR/destination.sock
l2_incoming dst "unix:$mig" --vmm-arg "--api-socket=$dsock"
wait_for_socket "$mig"
out=$(ctl vm migrate "unix:$mig" --downtime-ms 300) || fail "keelctl vm migrate failed: $out"
log "$out"
assert_match "$out" "migrated to unix:$mig" "keelctl vm migrate output"
l2_wait_exit src 60 || fail "the source did not exit after the migration"
assert_eq "$L2_EXIT_RC" 0 "source exit status"

l2_cmd dst "cat /tmp/kept /tmp/counter; kill -0 $counter_pid && echo alive; kill -0 $disk_pid && echo disk-alive" 120
printf '%s\n' "$L2_OUTPUT" | sed 's/^/migrated| /'
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)" kept-in-tmp "/tmp survived"
after=$(printf '%s\n' "$L2_OUTPUT" | sed -n 2p)
assert_match "$after" '^[0-9]+$' "counter after the migration"
[ "$after" -ge "$middle" ] || fail "the counter started over: $middle before, $after after"
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 3p)" alive "the counting process survived"
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 4p)" disk-alive "the disk loop survived"
sleep 2
l2_cmd dst 'cat /tmp/counter'
[ "$L2_OUTPUT" -gt "$after" ] || fail "the counter stopped on the destination ($after, then $L2_OUTPUT)"
log "ok: counter $first, $middle after the failed migration, $after after the migration, then $L2_OUTPUT"

# The disk on the destination: the loop goes on without a mismatch, the
# data written before the migration reads back, a new write lands.
l2_cmd dst 'cat /tmp/diskcount; cat /tmp/diskerr 2>/dev/null; true'
disk_after=$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)
assert_match "$disk_after" '^[0-9]+$' "disk loop iterations after the migration"
[ "$(printf '%s\n' "$L2_OUTPUT" | wc -l)" -eq 1 ] || fail "disk loop mismatches: $L2_OUTPUT"
[ "$disk_after" -gt "$disk_before" ] || fail "the disk loop stopped ($disk_before, then $disk_after)"
l2_cmd dst "kill $disk_pid; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=1M skip=40 count=4 2>/dev/null | sha256sum | cut -d' ' -f1"
assert_eq "$L2_OUTPUT" "$early_sum" "data written before the migration, read back after it"
l2_cmd dst 'dd if=/dev/urandom of=/tmp/q bs=1M count=2 2>/dev/null && dd if=/tmp/q of=/dev/vda bs=1M seek=50 conv=fsync 2>/dev/null && echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda bs=1M skip=50 count=2 2>/dev/null | cmp - /tmp/q && sha256sum < /tmp/q | cut -d" " -f1'
late_sum=$L2_OUTPUT
assert_match "$late_sum" '^[0-9a-f]{64}$' "a new disk write after the migration, read back"
log "ok: disk loop $disk_before iterations before, $disk_after after, no mismatch; old and new data read back"

assert_match "$(keelctl --socket "$dsock" vm stop)" '^stopping' "keelctl vm stop on the destination"
l2_wait_exit dst 60 || fail "the destination did not exit"
assert_eq "$L2_EXIT_RC" 0 "destination exit status"
host_sum=$(dd if="$scratch" bs=1M skip=50 count=2 2>/dev/null | sha256sum | cut -d' ' -f1)
assert_eq "$host_sum" "$late_sum" "host-side checksum of the write made on the destination"
echo "KEEL-PASS"
