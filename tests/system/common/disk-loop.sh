# Disk checks (sourced after lib.sh) for scenarios whose guest keeps its
# virtio-blk disk /dev/vda busy across a snapshot or a migration; WHEN
# names that event in messages ("the snapshot", "the migration").
#
# disk_loop_start VM WHEN: 4 MiB at 40 MiB written and fsync'd (its
# checksum in early_sum, to read back later), then a write-verify loop in
# the background forever: a random 4 KiB block written with fsync to one
# of the first 256 blocks, reread from the disk (caches dropped) and
# compared; iterations in /tmp/diskcount, mismatches in /tmp/diskerr, its
# PID in /tmp/disk.pid.
disk_loop_start() {
  l2_cmd "$1" 'dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null && dd if=/tmp/p of=/dev/vda bs=1M seek=40 conv=fsync 2>/dev/null && sha256sum < /tmp/p | cut -d" " -f1'
  early_sum=$L2_OUTPUT
  assert_match "$early_sum" '^[0-9a-f]{64}$' "checksum of the data written before $2"
  l2_cmd "$1" '(i=0; while :; do i=$((i+1)); b=$((i % 256)); dd if=/dev/urandom of=/tmp/w bs=4096 count=1 2>/dev/null; dd if=/tmp/w of=/dev/vda bs=4096 seek=$b conv=fsync 2>/dev/null; echo 1 > /proc/sys/vm/drop_caches; dd if=/dev/vda of=/tmp/r bs=4096 skip=$b count=1 2>/dev/null; cmp -s /tmp/w /tmp/r || echo "mismatch at $i" >> /tmp/diskerr; echo $i > /tmp/diskcount; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/disk.pid; echo started'
  assert_eq "$L2_OUTPUT" started "disk loop started"
}

# disk_loop_check VM WHEN DISK_BEFORE DISK_PID: after WHEN the loop went
# on past DISK_BEFORE iterations without a mismatch; it is stopped, the data
# of disk_loop_start reads back, and a new 2 MiB write at 50 MiB reads back
# (its checksum in late_sum, for disk_host_check once the VMM exited).
disk_loop_check() {
  local disk_after
  l2_cmd "$1" 'cat /tmp/diskcount; cat /tmp/diskerr 2>/dev/null; true'
  disk_after=$(printf '%s\n' "$L2_OUTPUT" | sed -n 1p)
  assert_match "$disk_after" '^[0-9]+$' "disk loop iterations after $2"
  [ "$(printf '%s\n' "$L2_OUTPUT" | wc -l)" -eq 1 ] || fail "disk loop mismatches: $L2_OUTPUT"
  [ "$disk_after" -gt "$3" ] || fail "the disk loop stopped ($3, then $disk_after)"
  l2_cmd "$1" "kill $4; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=1M skip=40 count=4 2>/dev/null | sha256sum | cut -d' ' -f1"
  assert_eq "$L2_OUTPUT" "$early_sum" "data written before $2, read back after it"
  l2_cmd "$1" 'dd if=/dev/urandom of=/tmp/q bs=1M count=2 2>/dev/null && dd if=/tmp/q of=/dev/vda bs=1M seek=50 conv=fsync 2>/dev/null && echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda bs=1M skip=50 count=2 2>/dev/null | cmp - /tmp/q && sha256sum < /tmp/q | cut -d" " -f1'
  late_sum=$L2_OUTPUT
  assert_match "$late_sum" '^[0-9a-f]{64}$' "a new disk write after $2, read back"
  log "ok: disk loop $3 iterations before $2, $disk_after after, no mismatch; old and new data read back"
}

# disk_host_check IMAGE WHEN: the write disk_loop_check made is in IMAGE.
disk_host_check() {
  local host_sum
  host_sum=$(dd if="$1" bs=1M skip=50 count=2 2>/dev/null | sha256sum | cut -d' ' -f1)
  assert_eq "$host_sum" "$late_sum" "host-side checksum of the write made after $2"
}
