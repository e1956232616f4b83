#!/bin/sh
# keel-timeout: 900
# The control API (keel-vmm --api-socket) on a real Linux guest, driven with
# keelctl: introspection, then a pause that really holds the guest (a
# command typed on its console while paused is answered only after the
# resume), the guest working on after the resume, a balloon target set
# through the API (MemTotal shrinks), metrics, the events stream in order,
# and a forced stop through the API. Then two more guests: one shut down
# with the ACPI power button (keel-vmm exits 0), one that panics (pvpanic:
# a guest-panic event, keel-vmm exits 4). Last, a guest configured and
# started through the API (keel-vmm --api-socket alone, keelctl vm create,
# vm start) that boots to its init and powers off.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
require_binary keelctl >/dev/null

sock=$KEEL_WORKDIR/api.sock
ctl() { keelctl --socket "$sock" "$@"; }

# MemTotal once it has settled (the balloon driver works in the background),
# as the last line of the output (l2_cmd logs before it).
mem_total_kb() {
  l2_cmd "$1" 'last=0; for i in $(seq 1 100); do now=$(awk "/^MemTotal:/ { print \$2 }" /proc/meminfo); [ "$now" = "$last" ] && break; last=$now; sleep 0.3; done; echo $now'
  echo "$L2_OUTPUT"
}

# No deflate-on-OOM: only then does Linux take ballooned pages out of
# MemTotal (see keel-virtio-balloon.sh).
l2_boot vm --cpus 2 --mem 256 --serial-agent --vmm-arg "--api-socket=$sock" \
  --vmm-arg --balloon --vmm-arg target-mib=0,deflate-on-oom=off

info=$(ctl vm info) || fail "keelctl vm info failed"
printf '%s\n' "$info" | sed 's/^/info| /'
assert_match "$info" '^state +running' "state before the pause"
assert_match "$(printf '%s\n' "$info" | grep '^cpus')" '^cpus +2$' "cpus in the config"
devices=$(ctl vm devices) || fail "keelctl vm devices failed"
printf '%s\n' "$devices" | sed 's/^/devices| /'
assert_match "$devices" 'pci-host-bridge +pci +0000:00:00.0' "host bridge in the device list"
assert_match "$devices" 'serial-16550a +io +0x3f8' "COM1 in the device list"

# Everything from the first event on, until keel-vmm exits.
ctl --json vm events --follow > "$KEEL_WORKDIR/events.jsonl" 2> "$KEEL_WORKDIR/events.err" &
follower=$!

l2_cmd vm 'echo before-pause'
assert_eq "$L2_OUTPUT" before-pause "guest answers before the pause"

assert_eq "$(ctl vm pause)" paused "keelctl vm pause"
assert_match "$(ctl vm info)" '^state +paused' "state while paused"
if ctl vm pause 2> "$KEEL_WORKDIR/pause2.err"; then fail "a second pause was accepted"; fi
assert_match "$(cat "$KEEL_WORKDIR/pause2.err")" 'already paused' "second pause refused"
dir=$(_vm_dir vm)
done_before=$(grep -a -c '^KEEL-CMD-DONE' "$(_l2_snapshot vm)" || true)
l2_send vm 'echo typed-while-paused'
sleep 3
done_paused=$(grep -a -c '^KEEL-CMD-DONE' "$(_l2_snapshot vm)" || true)
assert_eq "$done_paused" "$done_before" "commands answered while paused"
grep -a -q '^typed-while-paused' "$dir/snapshot" && fail "the paused guest ran a command"

assert_eq "$(ctl vm resume)" running "keelctl vm resume"
deadline=$(_deadline_cs 60)
while [ "$(grep -a -c '^KEEL-CMD-DONE' "$(_l2_snapshot vm)" || true)" -le "$done_before" ]; do
  [ "$(_now_cs)" -lt "$deadline" ] || fail "the command typed while paused never ran after resume"
  sleep 0.2
done
grep -a -q '^typed-while-paused' "$dir/snapshot" || fail "no output of the command typed while paused"
log "ok: the command typed while paused ran after the resume"
if ctl vm resume 2> "$KEEL_WORKDIR/resume2.err"; then fail "resume of a running VM was accepted"; fi
assert_match "$(cat "$KEEL_WORKDIR/resume2.err")" 'not paused' "resume of a running VM refused"

# The guest goes on working: processes, both CPUs, its disk-less file system.
l2_cmd vm 'echo after > /tmp/a && cat /tmp/a && grep -c ^processor /proc/cpuinfo'
assert_eq "$(printf '%s' "$L2_OUTPUT" | tr '\n' ' ')" "after 2" "guest works after the resume"
assert_eq "$L2_RC" 0 "rc after the resume"

# The balloon: a 32 MiB target through the API; the driver inflates and
# the guest's MemTotal drops by that much.
before_kb=$(mem_total_kb vm | tail -n 1)
if ctl vm balloon --target-mib 1000 2> "$KEEL_WORKDIR/balloon-big.err"; then
  fail "a balloon target above the guest's RAM was accepted"
fi
assert_match "$(cat "$KEEL_WORKDIR/balloon-big.err")" "field 'target_mib'" "too big a target names the field"
assert_match "$(ctl vm balloon --target-mib 32)" '^balloon target 32 MiB' "keelctl vm balloon"
assert_match "$(ctl vm devices | grep virtio-balloon)" 'target_mib=32' "balloon target in the device list"
l2_cmd vm 'i=0; while [ $i -lt 600 ]; do t=$(awk "/^MemTotal:/ { print \$2 }" /proc/meminfo); [ "$t" -le '"$((before_kb - 31 * 1024))"' ] && break; i=$((i+1)); sleep 0.3; done; echo "$i polls, $t kB"' 300
log "balloon inflated after $(printf '%s' "$L2_OUTPUT" | tail -n 1)"
after_kb=$(mem_total_kb vm | tail -n 1)
log "MemTotal: $before_kb kB, then $after_kb kB with a 32 MiB balloon target"
assert_in_range "$((before_kb - after_kb))" $((31 * 1024)) $((33 * 1024)) "kB taken by the balloon"
assert_match "$(ctl vm devices | grep virtio-balloon)" 'actual_mib=32' "the driver's report in the device list"

metrics=$(ctl --json vm metrics) || fail "keelctl vm metrics failed"
assert_match "$metrics" '"guest_bytes": 268435456' "guest memory in the metrics"
assert_eq "$(printf '%s\n' "$metrics" | grep -c '"index":')" 2 "vCPUs in the metrics"
assert_match "$(ctl vm metrics)" '^VCPU' "metrics table"

assert_match "$(ctl vm stop)" '^stopping' "keelctl vm stop"
l2_wait_exit vm 60 || fail "keel-vmm did not exit after the API stop"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status after the API stop"
wait "$follower" || fail "the events follower failed: $(cat "$KEEL_WORKDIR/events.err")"
sed 's/^/events| /' "$KEEL_WORKDIR/events.jsonl"
types=$(sed -n 's/.*"type":"\([a-z]*\)".*/\1/p' "$KEEL_WORKDIR/events.jsonl" | tr '\n' ' ')
assert_eq "$types" "created running paused resumed balloon stopping stopped " "events in order"
seqs=$(sed -n 's/^{"seq":\([0-9]*\),.*/\1/p' "$KEEL_WORKDIR/events.jsonl" | tr '\n' ' ')
assert_eq "$seqs" "1 2 3 4 5 6 7 " "event sequence numbers"
grep -q '"type":"stopped".*"reason":"stopped"\|"reason":"stopped".*"type":"stopped"' \
  "$KEEL_WORKDIR/events.jsonl" || fail "the stopped event does not say the host stopped it"
[ ! -e "$sock" ] || fail "keel-vmm left its API socket behind"

# A guest NAME with its own API socket and an events follower from its
# first event on (sets api_sock).
boot_followed() {
  api_sock=$KEEL_WORKDIR/$1.sock
  l2_boot "$1" --cpus 1 --mem 256 --serial-agent --vmm-arg "--api-socket=$api_sock"
  keelctl --socket "$api_sock" --json vm events --follow > "$KEEL_WORKDIR/$1.events" \
    2> "$KEEL_WORKDIR/$1.events.err" &
  follower=$!
}

# After keel-vmm exited with RC: the followed events of NAME are exactly
# TYPES, and the stopped event gives REASON.
check_end() {
  local name=$1 rc=$2 types=$3 reason=$4
  l2_wait_exit "$name" 120 || fail "$name: keel-vmm did not exit"
  assert_eq "$L2_EXIT_RC" "$rc" "$name: VMM exit status"
  wait "$follower" || fail "$name: the events follower failed: $(cat "$KEEL_WORKDIR/$name.events.err")"
  sed "s/^/$name events| /" "$KEEL_WORKDIR/$name.events"
  assert_eq "$(sed -n 's/.*"type":"\([a-z-]*\)".*/\1/p' "$KEEL_WORKDIR/$name.events" | tr '\n' ' ')" \
    "$types" "$name: events in order"
  grep -q "\"type\":\"stopped\".*\"reason\":\"$reason\"\|\"reason\":\"$reason\".*\"type\":\"stopped\"" \
    "$KEEL_WORKDIR/$name.events" || fail "$name: the stopped event does not give reason $reason"
}

# --- the ACPI power button: the guest shuts itself down ---------------------
boot_followed pwr
l2_cmd pwr 'ls /sys/bus/acpi/drivers/button/ | grep PNP0C0C; ls /sys/bus/platform/drivers/ | grep -c GED'
log "pwr: button driver and GED: $(printf '%s' "$L2_OUTPUT" | tr '\n' ' ')"
assert_match "$(keelctl --socket "$api_sock" vm power-button)" '^power button pressed' \
  "keelctl vm power-button"
l2_wait pwr 'KEEL-POWER-BUTTON' 120 || fail "the guest never saw the power button"
check_end pwr 0 "created running power-button stopping stopped " power-off

# --- a guest panic, reported through pvpanic --------------------------------
boot_followed panic
l2_cmd panic 'ls /sys/bus/platform/drivers/pvpanic-mmio/ | grep -c QEMU0001'
assert_eq "$L2_OUTPUT" 1 "pvpanic-mmio bound to QEMU0001"
l2_send panic 'echo c > /proc/sysrq-trigger'
check_end panic 4 "created running guest-panic stopping stopped " guest-panic

# --- a VM configured and started through the API ----------------------------
# The kit's init with keel.shell=0 and no test prints KEEL-INIT-READY and powers off.
cfg_sock=$KEEL_WORKDIR/cfg.sock
cfg_console=$KEEL_WORKDIR/cfg.console
keel-vmm --api-socket "$cfg_sock" < /dev/null > "$KEEL_WORKDIR/cfg.out" 2>&1 &
cfg_pid=$!
deadline=$(_deadline_cs 30)
until [ -S "$cfg_sock" ]; do
  [ "$(_now_cs)" -lt "$deadline" ] || fail "keel-vmm --api-socket alone never served $cfg_sock"
  sleep 0.1
done
assert_match "$(keelctl --socket "$cfg_sock" vm info)" '^state +not-configured' "state before create"
cat > "$KEEL_WORKDIR/cfg.json" <<EOF
{"kernel": "$KEEL_KIT/vmlinuz", "initrd": "$KEEL_KIT/initramfs.cpio.gz",
 "cmdline": "console=ttyS0 panic=-1 quiet keel.shell=0", "cpus": 1, "memory_mib": 256,
 "serial": "file:$cfg_console", "reboot": false}
EOF
assert_match "$(keelctl --socket "$cfg_sock" vm create "$KEEL_WORKDIR/cfg.json")" '^configured' \
  "keelctl vm create"
assert_match "$(keelctl --socket "$cfg_sock" vm start)" '^running' "keelctl vm start"
deadline=$(_deadline_cs 240)
while kill -0 "$cfg_pid" 2>/dev/null; do
  [ "$(_now_cs)" -lt "$deadline" ] ||
    fail "the API-started guest did not power off: $(tail -n 5 "$cfg_console")"
  sleep 0.5
done
cfg_rc=0
wait "$cfg_pid" || cfg_rc=$?
sed 's/^/cfg| /' "$KEEL_WORKDIR/cfg.out"
grep -a -q '^KEEL-INIT-READY' "$cfg_console" || fail "the API-started guest never reached its init"
assert_eq "$cfg_rc" 0 "exit status of the API-started keel-vmm"
log "ok: a VM configured and started through the API booted to its init"
echo "KEEL-PASS"
