#!/bin/sh
# keel-timeout: 900
# Live migration of a real Linux guest with a virtio-blk disk (a raw image
# both keel-vmm processes open, as shared storage would be) over a unix
# socket: a shell loop in the guest counts in /tmp/counter and another
# writes, rereads (caches dropped) and compares disk blocks. First a
# destination is killed in the middle of a bandwidth-limited migration: the
# source must run on. Then a second destination receives the guest: the
# same processes and /tmp go on there, the counter continuing, the disk
# loop going on without a mismatch, data written before the migration
# reading back from the disk, a new write landing in the image, and the
# source exits 0. Last, the guest moves on once more with its disk copied
# (keelctl vm migrate --with-disks) into a local image of the third
# keel-vmm while the disk loop writes to it: the loop goes on there
# without a mismatch, data written before reads back, and a new write
# lands in the copy. Then it moves once more by post-copy (keelctl vm
# migrate --postcopy) to a fourth keel-vmm sharing that image: the counter
# and the disk loop go on there.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
. "$KEEL_SYSTEM_DIR/common/disk-loop.sh"
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
disk_loop_start src "the migration"
# The counter is renamed into place: a reader never sees it truncated.
l2_cmd src 'echo kept-in-tmp > /tmp/kept; (i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.2; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/counter.pid; echo started'
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
status=$(ctl --json vm migrate-status)
assert_match "$status" '"phase": "copying"' "migration in progress"
# keel-vmm's default --dirty-log auto: L1's KVM dirty ring if it has one.
dirty_log=$(printf '%s\n' "$status" | grep -o '"dirty_log": *"[a-z]*"' | grep -o '[a-z]*"$' | tr -d '"')
log "dirty log in L1: ${dirty_log:-none reported}"
assert_match "$dirty_log" '^(ring|bitmap)$' "the migration names its dirty log"
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
disk_loop_check dst "the migration" "$disk_before" "$disk_pid"

# 3. The disk copied along (local storage): dst -> copy, the disk loop
# writing throughout.
disk_loop_start dst "the disk copy"
sleep 2
l2_cmd dst 'cat /tmp/diskcount /tmp/disk.pid'
disk_before=$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)
disk_pid=$(printf '%s\n' "$L2_OUTPUT" | sed -n 2p)
assert_match "$disk_before" '^[0-9]+$' "disk loop iterations before the disk copy"
copy=$KEEL_WORKDIR/copy.img
truncate -s 64M "$copy"
# The third keel-vmm has the same machine but its own, empty disk.
_l2_disks=$(printf '%s\n' "$_l2_disks" | sed "s|$scratch|$copy|")
mig3=$KEEL_WORKDIR/copy-migration.sock
csock=$KEEL_WORKDIR/copy.sock
l2_incoming copy "unix:$mig3" --vmm-arg "--api-socket=$csock"
wait_for_socket "$mig3"
out=$(keelctl --socket "$dsock" vm migrate "unix:$mig3" --with-disks --downtime-ms 300) ||
  fail "keelctl vm migrate --with-disks failed: $out"
log "$out"
assert_match "$out" "migrated to unix:$mig3" "keelctl vm migrate --with-disks output"
l2_wait_exit dst 60 || fail "the second VMM did not exit after the disk copy"
assert_eq "$L2_EXIT_RC" 0 "second VMM exit status"
disk_host_check "$scratch" "the migration"
disk_loop_check copy "the disk copy" "$disk_before" "$disk_pid"
# The copy VMM wrote through (fsync'd): its image holds the new write now.
disk_host_check "$copy" "the disk copy"

# 4. Post-copy: copy -> pc, the copied image shared again, the counter and
# the disk loop going on throughout. pc runs the guest right after the
# first pass (a 1 ms downtime never fits what the guest dirtied) and
# fetches the pages it lacks on demand while the rest streams behind.
disk_loop_start copy "post-copy"
sleep 2
l2_cmd copy 'cat /tmp/counter /tmp/diskcount /tmp/disk.pid'
counter_before=$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)
disk_before=$(printf '%s\n' "$L2_OUTPUT" | sed -n 2p)
disk_pid=$(printf '%s\n' "$L2_OUTPUT" | sed -n 3p)
assert_match "$counter_before" '^[0-9]+$' "counter before post-copy"
assert_match "$disk_before" '^[0-9]+$' "disk loop iterations before post-copy"
mig4=$KEEL_WORKDIR/postcopy-migration.sock
psock=$KEEL_WORKDIR/postcopy.sock
l2_incoming pc "unix:$mig4" --vmm-arg "--api-socket=$psock"
wait_for_socket "$mig4"
out=$(keelctl --json --socket "$csock" vm migrate "unix:$mig4" --postcopy --downtime-ms 1) ||
  fail "keelctl vm migrate --postcopy failed: $out"
printf '%s\n' "$out" | grep migration-completed | sed 's/^/post-copy| /'
assert_match "$out" '"type": ?"migration-completed"' "keelctl vm migrate --postcopy completed"
assert_match "$out" '"running_on_destination": ?true' "the guest ran on pc during post-copy"
l2_wait_exit copy 60 || fail "the third VMM did not exit after post-copy"
assert_eq "$L2_EXIT_RC" 0 "third VMM exit status"
l2_cmd pc "cat /tmp/kept /tmp/counter; kill -0 $counter_pid && echo alive" 120
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)" kept-in-tmp "/tmp survived post-copy"
after=$(printf '%s\n' "$L2_OUTPUT" | sed -n 2p)
assert_match "$after" '^[0-9]+$' "counter after post-copy"
[ "$after" -ge "$counter_before" ] || fail "the counter went back: $counter_before, then $after"
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | sed -n 3p)" alive "the counting process survived post-copy"
sleep 2
l2_cmd pc 'cat /tmp/counter'
[ "$L2_OUTPUT" -gt "$after" ] || fail "the counter stopped after post-copy ($after, then $L2_OUTPUT)"
log "ok: post-copy, counter $counter_before before, $after after, then $L2_OUTPUT"
disk_loop_check pc "post-copy" "$disk_before" "$disk_pid"
assert_match "$(keelctl --socket "$psock" vm stop)" '^stopping' "keelctl vm stop on pc"
l2_wait_exit pc 60 || fail "the post-copy destination did not exit"
assert_eq "$L2_EXIT_RC" 0 "post-copy destination exit status"
disk_host_check "$copy" "post-copy"
echo "KEEL-PASS"
