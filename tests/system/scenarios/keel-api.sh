#!/bin/sh
# keel-timeout: 300
# The control API (keel-vmm --api-socket) on a real Linux guest, driven with
# keelctl: introspection, then a pause that really holds the guest (a
# command typed on its console while paused is answered only after the
# resume), the guest working on after the resume, metrics, the events
# stream in order, and a forced stop through the API.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
require_binary keelctl >/dev/null

sock=$KEEL_WORKDIR/api.sock
ctl() { keelctl --socket "$sock" "$@"; }

l2_boot vm --cpus 2 --mem 256 --serial-agent --vmm-arg "--api-socket=$sock"

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
assert_eq "$types" "created running paused resumed stopping stopped " "events in order"
seqs=$(sed -n 's/^{"seq":\([0-9]*\),.*/\1/p' "$KEEL_WORKDIR/events.jsonl" | tr '\n' ' ')
assert_eq "$seqs" "1 2 3 4 5 6 " "event sequence numbers"
grep -q '"type":"stopped".*"reason":"stopped"\|"reason":"stopped".*"type":"stopped"' \
  "$KEEL_WORKDIR/events.jsonl" || fail "the stopped event does not say the host stopped it"
[ ! -e "$sock" ] || fail "keel-vmm left its API socket behind"
echo "KEEL-PASS"
