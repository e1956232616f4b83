#!/bin/sh
# keel-timeout: 420
# virtio-net on tap devices attached by keel-vmm to a Linux bridge in L1
# (L1 is this test's own VM: nothing outside it is touched). Two guests:
# ping and TCP (HTTP) transfers between L1 and a guest and between the two
# guests, and 9000-byte frames end to end with no IP fragmentation anywhere.
set -euo pipefail
KEEL_L2_VMM=keel
. "$KEEL_SYSTEM_DIR/lib.sh"

bridge=keelbr0
l1_bridge "$bridge" 10.77.0.1/24

l2_boot vm1 --cpus 1 --mem 256 --serial-agent --vmm-arg --net \
  --vmm-arg "tap=keeltap1,mac=52:54:00:77:00:02,mtu=9000,bridge=$bridge"
l2_boot vm2 --cpus 1 --mem 256 --serial-agent --vmm-arg --net \
  --vmm-arg "tap=keeltap2,mac=52:54:00:77:00:03,mtu=9000,bridge=$bridge"
# The bridge takes the smallest MTU of its ports; both taps have 9000.
ip link set "$bridge" mtu 9000
assert_eq "$(cat /sys/class/net/$bridge/mtu)" 9000 "bridge MTU"
assert_eq "$(cat /sys/class/net/keeltap1/master/uevent | sed -n 's/^INTERFACE=//p')" "$bridge" \
  "keeltap1 attached to the bridge"

for n in 1 2; do
  l2_cmd vm$n "ip link set eth0 mtu 9000 up && ip addr add 10.77.0.1$n/24 dev eth0 && cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu"
  assert_eq "$(printf '%s' "$L2_OUTPUT" | tr '\n' ' ')" "52:54:00:77:00:0$((n + 1)) 9000" "vm$n MAC and MTU"
done
l2_cmd vm1 'cat /sys/class/net/eth0/operstate'
assert_eq "$L2_OUTPUT" up "vm1 link state"
# What the guest negotiated, one character per feature bit from bit 0
# (virtio 1.2 §5.1.3): CSUM, GUEST_CSUM, MTU, MAC, GUEST_TSO4/6/ECN,
# HOST_TSO4/6/ECN, MRG_RXBUF, STATUS.
l2_cmd vm1 'cut -c1,2,4,6,8,9,10,12,13,14,16,17 /sys/class/net/eth0/device/features'
assert_eq "$L2_OUTPUT" 111111111111 "vm1 negotiated checksum and TSO offloads, MRG_RXBUF, STATUS"

ping -c 3 -W 5 10.77.0.11 >/dev/null || fail "L1 cannot ping vm1"
log "ok: L1 pings vm1"
l2_cmd vm1 'ping -c 3 -W 5 10.77.0.12 >/dev/null && echo PING-OK'
assert_eq "$L2_OUTPUT" PING-OK "vm1 pings vm2"

# Jumbo frames: 8972 bytes of ICMP payload fill one 9000-byte IP packet.
# Linux sets DF on ping packets that fit the route MTU and fragments only
# those that do not, so no new fragments anywhere means 9000-byte frames
# crossed the tap, the bridge and both virtio-nets whole.
frag_l1() { awk '/^Ip:/ { n++; if (n == 1) for (i = 1; i <= NF; i++) h[i] = $i; else for (i = 1; i <= NF; i++) if (h[i] == "FragCreates" || h[i] == "ReasmReqds") s += $i } END { print s }' /proc/net/snmp; }
before=$(frag_l1)
ping -c 3 -W 5 -s 8972 10.77.0.11 >/dev/null || fail "L1 cannot ping vm1 with 9000-byte packets"
assert_eq "$(frag_l1)" "$before" "IP fragments created or reassembled in L1"
l2_cmd vm1 'f() { awk "/^Ip:/ { n++; if (n == 1) for (i = 1; i <= NF; i++) h[i] = \$i; else for (i = 1; i <= NF; i++) if (h[i] == \"FragCreates\" || h[i] == \"ReasmReqds\") s += \$i } END { print s }" /proc/net/snmp; }; b=$(f); ping -c 3 -W 5 -s 8972 10.77.0.12 >/dev/null || echo PING-FAILED; a=$(f); echo $((a - b))'
assert_eq "$L2_OUTPUT" 0 "jumbo ping vm1 -> vm2, fragments in vm1"

# TCP: 16 MiB over HTTP from L1 to vm1, from vm1 to vm2, and from vm2 to L1.
www=$KEEL_WORKDIR/www
mkdir -p "$www"
dd if=/dev/urandom of="$www/blob" bs=1M count=16 2>/dev/null
want=$(sha256sum < "$www/blob" | cut -d' ' -f1)
httpd -p 10.77.0.1:8080 -h "$www"
httpd_pid=$(pidof httpd | tr ' ' '\n' | head -n 1)
echo "$httpd_pid" >> "$KEEL_WORKDIR/pids"
l2_cmd vm1 'wget -q -O /tmp/blob http://10.77.0.1:8080/blob && sha256sum < /tmp/blob | cut -d" " -f1'
assert_eq "$L2_OUTPUT" "$want" "16 MiB L1 -> vm1 over TCP"
l2_cmd vm1 'mkdir -p /tmp/www && mv /tmp/blob /tmp/www/ && httpd -p 8080 -h /tmp/www && echo SERVING'
l2_cmd vm2 'wget -q -O /tmp/blob http://10.77.0.11:8080/blob && sha256sum < /tmp/blob | cut -d" " -f1'
assert_eq "$L2_OUTPUT" "$want" "16 MiB vm1 -> vm2 over TCP"
l2_cmd vm2 'mkdir -p /tmp/www && mv /tmp/blob /tmp/www/ && httpd -p 8080 -h /tmp/www && echo SERVING'
got=$(wget -q -O - http://10.77.0.12:8080/blob | sha256sum | cut -d' ' -f1)
assert_eq "$got" "$want" "16 MiB vm2 -> L1 over TCP"
kill "$httpd_pid"

for n in 1 2; do
  l2_send vm$n keel-exit
  l2_wait_exit vm$n 60 || fail "vm$n's VMM did not exit after the guest powered off"
  assert_eq "$L2_EXIT_RC" 0 "vm$n VMM exit status"
done
echo "KEEL-PASS"
