#!/bin/sh
# keel-timeout: 300
# A guest reboot: with --no-reboot keel-vmm exits with status 3; without it
# the VM reboots in place and the guest comes back up to its init.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"

cmd=$(b64 - <<'SCRIPT'
echo rebooting-now
reboot -f
SCRIPT
)
l2_boot once --cpus 1 --mem 256 --cmdline "keel.cmd=$cmd"
l2_wait_exit once 120 || fail "keel-vmm did not exit after the guest rebooted under --no-reboot"
assert_eq "$L2_EXIT_RC" 3 "keel-vmm exit status for a reboot under --no-reboot"

l2_boot again --cpus 1 --mem 256 --cmdline "keel.cmd=$cmd" --allow-reboot
console="$KEEL_WORKDIR/again/console.log"
deadline=$(( $(cut -d. -f1 /proc/uptime) + 180 ))
while [ "$(grep -c '^KEEL-INIT-READY' "$console")" -lt 2 ]; do
  [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] || fail "the guest did not come back after rebooting in place"
  _pid_alive "$(cat "$KEEL_WORKDIR/again/pid")" || fail "keel-vmm exited instead of rebooting in place"
  sleep 1
done
log "ok: the guest booted a second time in the same keel-vmm process"
l2_kill again
echo "KEEL-PASS"
