#!/bin/sh
# keel-timeout: 240
# virtio-vsock with keel-vmm's hybrid (unix socket) host side: a host
# process connects through the socket ("CONNECT port") to a guest echo
# server, and a guest connects to the host (CID 2), which keel-vmm forwards
# to the unix socket <path>_<port>.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"
. "$KEEL_KIT/kit.env"

tool=$KEEL_KIT/$KIT_VSOCK_TOOL
[ -x "$tool" ] || fail "the kit has no $KIT_VSOCK_TOOL"
uds=$KEEL_WORKDIR/vsock.sock
l2_boot vm --cpus 1 --mem 256 --serial-agent --vmm-arg --vsock --vmm-arg "cid=7,socket=$uds"
l2_cmd vm 'cat /sys/module/vmw_vsock_virtio_transport/initstate 2>/dev/null; ls /dev/vsock'
assert_eq "$(printf '%s' "$L2_OUTPUT" | tr '\n' ' ')" "live /dev/vsock" "vsock transport in the guest"

# Host -> guest: an echo server on guest port 5000.
# (Its output goes to a file: the agent waits for a command's output to end.)
l2_cmd vm 'keel-vsock listen 5000 >/tmp/vsock.log 2>&1 & for i in $(seq 1 50); do grep -q LISTENING /tmp/vsock.log && break; sleep 0.1; done; cat /tmp/vsock.log'
assert_eq "$L2_OUTPUT" "KEEL-VSOCK-LISTENING 5000" "the guest's vsock echo server"
seq 1 20000 > "$KEEL_WORKDIR/sent"
"$tool" uds-connect "$uds" 5000 < "$KEEL_WORKDIR/sent" > "$KEEL_WORKDIR/echoed" 2> "$KEEL_WORKDIR/ok" ||
  fail "host -> guest connection failed: $(cat "$KEEL_WORKDIR/ok")"
assert_match "$(cat "$KEEL_WORKDIR/ok")" '^OK [0-9]+$' "reply to CONNECT"
assert_eq "$(sha256sum < "$KEEL_WORKDIR/echoed" | cut -d' ' -f1)" \
  "$(sha256sum < "$KEEL_WORKDIR/sent" | cut -d' ' -f1)" "bytes echoed by the guest"

# Guest -> host: keel-vmm dials ${uds}_6000 for the guest's connection.
"$tool" uds-echo "${uds}_6000" &
echo_pid=$!
echo "$echo_pid" >> "$KEEL_WORKDIR/pids"
sleep 0.5
l2_cmd vm 'seq 1 5000 > /tmp/sent; keel-vsock connect 2 6000 < /tmp/sent | sha256sum | cut -d" " -f1; sha256sum < /tmp/sent | cut -d" " -f1'
assert_eq "$(printf '%s' "$L2_OUTPUT" | head -n 1)" "$(printf '%s' "$L2_OUTPUT" | tail -n 1)" \
  "bytes echoed by the host"
wait "$echo_pid" || fail "the host echo server failed"

# A port nobody listens on is refused, not hung.
l2_cmd vm 'timeout 10 keel-vsock connect 2 6001 </dev/null; echo rc=$?'
assert_match "$(printf '%s' "$L2_OUTPUT" | tail -n 1)" '^rc=1$' "connecting to a host port without a listener"

l2_send vm keel-exit
l2_wait_exit vm 60 || fail "VMM did not exit after the guest powered off"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status"
echo "KEEL-PASS"
