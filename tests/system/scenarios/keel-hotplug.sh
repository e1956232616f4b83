#!/bin/sh
# keel-timeout: 600
# ACPI PCI hotplug on a real Linux guest (acpiphp, built into the cloud
# kernel), driven with keelctl: a qcow2 disk made by keel-img is plugged into
# a guest that booted without disks and appears with no rescan; the guest
# writes and reads a pattern; the disk is grown and the guest sees the new
# size (a virtio config change); it is unplugged, disappears from the guest,
# and its image is unlocked. Then a NIC on a tap in an L1 bridge: plugged,
# pinged both ways, unplugged. The events stream and the device list follow.
# Last, a snapshot with a hot-plugged device: a raw disk plugged into the
# slot asked for (7), a file system and a file written on it by the guest,
# the VM snapshotted and stopped; a new keel-vmm --restore of it has the
# disk in slot 7 under the same id, and the guest, its caches dropped and
# the file system mounted afresh, reads its file back whole. The restored
# guest (whose config now names that disk in slot 7) then live-migrates
# into a keel-vmm started with the boot flags plus that disk in that slot,
# and reads its file there too.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
require_binary keelctl >/dev/null
require_binary keel-img >/dev/null

sock=$KEEL_WORKDIR/api.sock
ctl() { keelctl --socket "$sock" "$@"; }
events=$KEEL_WORKDIR/events.jsonl

# Waits (in L1) until the events stream has an event of type $1 for id $2.
wait_event() {
  local deadline
  deadline=$(_deadline_cs 60)
  until grep -E -q "\"type\":\"$1\".*\"id\":\"$2\"|\"id\":\"$2\".*\"type\":\"$1\"" "$events"; do
    [ "$(_now_cs)" -lt "$deadline" ] || fail "no $1 event for $2 within 60 s"
    sleep 0.2
  done
  log "ok: $1 event for $2"
}

disk=$KEEL_WORKDIR/hot.qcow2
keel-img create -f qcow2 "$disk" 64M >/dev/null || fail "keel-img create failed"

l2_boot vm --cpus 2 --mem 256 --serial-agent --vmm-arg "--api-socket=$sock"
ctl --json vm events --follow > "$events" 2> "$KEEL_WORKDIR/events.err" &

l2_cmd vm 'dmesg | grep -i -m 3 "acpiphp\|hotplug"; ls /sys/bus/pci/slots | tr "\n" " "; echo; ls /sys/block | grep -c "^vd" || true'
assert_eq "$(printf '%s' "$L2_OUTPUT" | tail -n 1)" 0 "no disks at boot"

# 1. Disk: plug, use, grow, unplug.
added=$(ctl vm disk-add hot0 "$disk" --format qcow2) || fail "keelctl vm disk-add failed"
log "disk-add: $added"
assert_match "$added" '^disk hot0 at 0000:00:[0-9a-f]{2}\.0$' "disk-add reply"
wait_event device-added hot0
assert_match "$(ctl vm devices)" 'virtio-blk +pci +0000:00:[0-9a-f]{2}\.0.*id=hot0' "hot0 in the device list"
if ctl vm disk-add hot0 "$disk" 2> "$KEEL_WORKDIR/dup.err"; then fail "a second hot0 was accepted"; fi
log "ok: a second disk-add of the same image refused: $(cat "$KEEL_WORKDIR/dup.err")"

l2_cmd vm 'for i in $(seq 1 150); do [ -b /dev/vda ] && break; sleep 0.2; done; cat /sys/block/vda/size /sys/block/vda/serial'
assert_eq "$(printf '%s' "$L2_OUTPUT" | tr '\n' ' ')" "131072 hot0" "the hot-plugged disk's sectors and serial in the guest"
l2_cmd vm 'dd if=/dev/urandom of=/tmp/p bs=1M count=2 2>/dev/null && dd if=/tmp/p of=/dev/vda bs=1M seek=8 conv=fsync 2>/dev/null && echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda bs=1M skip=8 count=2 2>/dev/null | cmp - /tmp/p && echo PATTERN-OK'
assert_eq "$L2_OUTPUT" PATTERN-OK "pattern written and read back on the hot-plugged disk"

resized=$(ctl vm disk-resize hot0 134217728) || fail "keelctl vm disk-resize failed"
assert_eq "$resized" "disk hot0 is now 134217728 bytes" "disk-resize reply"
wait_event disk-resized hot0
l2_cmd vm 'for i in $(seq 1 150); do [ "$(cat /sys/block/vda/size)" = 262144 ] && break; sleep 0.2; done; cat /sys/block/vda/size'
assert_eq "$L2_OUTPUT" 262144 "the guest sees the grown size"
l2_cmd vm 'dd if=/tmp/p of=/dev/vda bs=1M seek=120 conv=fsync 2>/dev/null && echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda bs=1M skip=120 count=2 2>/dev/null | cmp - /tmp/p && echo GROWN-OK'
assert_eq "$L2_OUTPUT" GROWN-OK "pattern past the old end"
if ctl vm disk-resize hot0 1048576 2> "$KEEL_WORKDIR/shrink.err"; then fail "a shrink was accepted"; fi
assert_match "$(cat "$KEEL_WORKDIR/shrink.err")" 'smaller' "shrinking refused"

removed=$(ctl vm disk-remove hot0) || fail "keelctl vm disk-remove failed"
assert_match "$removed" 'eject requested' "disk-remove reply"
wait_event device-removed hot0
l2_cmd vm 'for i in $(seq 1 150); do [ -e /sys/block/vda ] || break; sleep 0.2; done; ls /sys/block | grep -c "^vd" || true'
assert_eq "$L2_OUTPUT" 0 "the unplugged disk is gone from the guest"
if ctl vm devices | grep -q 'id=hot0'; then fail "hot0 still in the device list"; fi
# Unlocked and whole: keel-img takes the write lock and finds no damage.
keel-img check "$disk" >/dev/null || fail "keel-img check of the unplugged image failed"
size=$(keel-img info --json "$disk" | tr -d ' \n' | sed -n 's/.*"virtual-size":\([0-9]*\).*/\1/p')
assert_eq "$size" 134217728 "the image's virtual size after the resize"
if ctl vm disk-remove hot0 2> "$KEEL_WORKDIR/gone.err"; then fail "removing a removed disk was accepted"; fi
log "ok: removing it again refused: $(cat "$KEEL_WORKDIR/gone.err")"

# 2. NIC: plug on a tap in an L1 bridge, ping both ways, unplug.
bridge=keelhpbr0
l1_bridge "$bridge" 10.79.0.1/24
added=$(ctl vm net-add nic0 keelhot0 --mac 52:54:00:78:00:11) || fail "keelctl vm net-add failed"
assert_match "$added" '^net nic0 at 0000:00:[0-9a-f]{2}\.0$' "net-add reply"
wait_event device-added nic0
ip link set keelhot0 master "$bridge"
ip link set keelhot0 up
l2_cmd vm 'for i in $(seq 1 150); do [ -e /sys/class/net/eth0 ] && break; sleep 0.2; done; cat /sys/class/net/eth0/address'
assert_eq "$L2_OUTPUT" 52:54:00:78:00:11 "the hot-plugged NIC's MAC in the guest"
l2_cmd vm 'ip link set eth0 up && ip addr add 10.79.0.11/24 dev eth0 && ping -c 3 -W 5 10.79.0.1 >/dev/null && echo PING-OK'
assert_eq "$L2_OUTPUT" PING-OK "the guest pings L1 over the hot-plugged NIC"
ping -c 3 -W 5 10.79.0.11 >/dev/null || fail "L1 cannot ping the guest"
log "ok: L1 pings the guest"

ctl vm net-remove nic0 >/dev/null || fail "keelctl vm net-remove failed"
wait_event device-removed nic0
l2_cmd vm 'for i in $(seq 1 150); do [ -e /sys/class/net/eth0 ] || break; sleep 0.2; done; ls /sys/class/net | grep -c "^eth" || true'
assert_eq "$L2_OUTPUT" 0 "the unplugged NIC is gone from the guest"
# keel-vmm created the tap, so it goes when keel-vmm closes it.
deadline=$(_deadline_cs 30)
while [ -e /sys/class/net/keelhot0 ]; do
  [ "$(_now_cs)" -lt "$deadline" ] || fail "the tap keelhot0 outlived the unplug"
  sleep 0.2
done
log "ok: the tap is gone"

l2_cmd vm 'echo still-here'
assert_eq "$L2_OUTPUT" still-here "the guest works on after the unplugs"

# 3. Snapshot and restore with a hot-plugged disk (the slots of hot0 and
# nic0 now empty).
snapdisk=$KEEL_WORKDIR/snap.raw
snap=$KEEL_WORKDIR/vm.snap
truncate -s 64M "$snapdisk"
added=$(ctl vm disk-add snapd "$snapdisk" --format raw --slot 7) || fail "keelctl vm disk-add --slot failed"
assert_eq "$added" "disk snapd at 0000:00:07.0" "disk-add --slot reply"
wait_event device-added snapd
l2_cmd vm 'for i in $(seq 1 150); do [ -b /dev/vda ] && break; sleep 0.2; done; mke2fs -q -b 4096 /dev/vda >/dev/null 2>&1 && mount /dev/vda /mnt && dd if=/dev/urandom of=/mnt/f bs=64k count=32 2>/dev/null && sync && sha256sum /mnt/f | cut -d" " -f1'
written=$L2_OUTPUT
assert_match "$written" '^[0-9a-f]{64}$' "a file written on the hot-plugged disk"
assert_match "$(ctl --json vm config)" '"id": *"snapd"' "the current config lists the hot-plugged disk"
assert_eq "$(ctl vm pause)" paused "keelctl vm pause"
saved=$(ctl vm snapshot "$snap") || fail "keelctl vm snapshot with a hot-plugged disk failed"
log "$saved"
assert_match "$(ctl vm stop)" '^stopping' "keelctl vm stop after the snapshot"
l2_wait_exit vm 60 || fail "keel-vmm did not exit after the stop"
assert_eq "$L2_EXIT_RC" 0 "the first VMM's exit status"

l2_restore vm "$snap" --vmm-arg "--api-socket=$sock"
# Until the restored keel-vmm answers, with the disk where it was.
l2_wait_answer vm "$KEEL_WORKDIR/devices" ctl vm devices
assert_match "$(cat "$KEEL_WORKDIR/devices")" 'virtio-blk +pci +0000:00:07\.0.*id=snapd' \
  "the restored disk in slot 7 under its id"
l2_cmd vm 'echo 3 > /proc/sys/vm/drop_caches; sha256sum /mnt/f | cut -d" " -f1; umount /mnt && mount /dev/vda /mnt && sha256sum /mnt/f | cut -d" " -f1' 120
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | tr '\n' ' ')" "$written $written " \
  "the file read back after the restore (caches dropped, then remounted)"

# 4. Live migration of the restored guest: the destination is configured
# with the source's current config (GET /api/v1/vm/config): the boot
# flags, plus the disk with its id in its slot.
assert_match "$(ctl --json vm config)" '"slot": *7' "the restored VM's config names the disk's slot"
mig=$KEEL_WORKDIR/mig.sock
dsock=$KEEL_WORKDIR/dst-api.sock
l2_incoming dst "unix:$mig" --vmm-arg "--api-socket=$dsock" \
  --vmm-arg --disk --vmm-arg "path=$snapdisk,format=raw,id=snapd,slot=7"
out=$(ctl vm migrate "unix:$mig" --downtime-ms 300) || fail "keelctl vm migrate failed: $out"
assert_match "$out" "migrated to unix:$mig" "keelctl vm migrate output"
l2_wait_exit vm 60 || fail "the source did not exit after the migration"
assert_eq "$L2_EXIT_RC" 0 "the source VMM's exit status"
l2_wait_answer dst "$KEEL_WORKDIR/dst-devices" keelctl --socket "$dsock" vm devices
assert_match "$(cat "$KEEL_WORKDIR/dst-devices")" 'virtio-blk +pci +0000:00:07\.0.*id=snapd' \
  "the migrated disk in slot 7 under its id"
l2_cmd dst 'echo 3 > /proc/sys/vm/drop_caches; sha256sum /mnt/f | cut -d" " -f1' 120
assert_eq "$L2_OUTPUT" "$written" "the file read back after the migration (caches dropped)"
l2_cmd dst 'umount /mnt && echo unmounted'
assert_eq "$L2_OUTPUT" unmounted "the hot-plugged disk's file system unmounted"
l2_send dst keel-exit
l2_wait_exit dst 60 || fail "the destination VMM did not exit after the guest powered off"
assert_eq "$L2_EXIT_RC" 0 "the destination VMM's exit status"
echo "KEEL-PASS"
