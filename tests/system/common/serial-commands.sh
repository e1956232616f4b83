# Scenario body (sourced): commands typed on the guest's serial console are
# run by the test agent, each answered by a KEEL-CMD-DONE marker with its
# exit status; keel-exit ends the session and the VMM exits 0.
. "$KEEL_SYSTEM_DIR/lib.sh"

l2_boot vm --cpus 1 --mem 256 --serial-agent

l2_cmd vm 'echo hello over serial; uname -s'
assert_eq "$L2_RC" 0 "rc of echo"
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | head -n 1)" "hello over serial" "first output line"
assert_eq "$(printf '%s\n' "$L2_OUTPUT" | tail -n 1)" "Linux" "second output line"

l2_cmd vm 'exit 3'
assert_eq "$L2_RC" 3 "rc of a failing command"

l2_cmd vm 'printf no-newline'
assert_eq "$L2_OUTPUT" "no-newline" "output without a trailing newline"
assert_eq "$L2_RC" 0 "rc after output without a newline"

l2_cmd vm 'echo kept > /tmp/state'
l2_cmd vm 'cat /tmp/state; grep -c ^processor /proc/cpuinfo'
assert_eq "$(printf '%s' "$L2_OUTPUT" | tr '\n' ' ')" "kept 1" "state kept between commands"

# The guest sees the host CPU's model name (KVM leaves the brand string
# leaves empty; keel-vmm passes the host's on, as QEMU's -cpu host does).
if [ "$KEEL_L2_VMM" = keel ]; then
  l2_cmd vm 'sed -n "s/^model name[[:space:]]*: //p" /proc/cpuinfo | head -n 1'
  assert_eq "$L2_OUTPUT" "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)" \
    "guest CPU model name"
fi

l2_send vm keel-exit
l2_wait vm 'KEEL-RESULT rc=' 60 || fail "no KEEL-RESULT after keel-exit"
assert_eq "$L2_LINE" "KEEL-RESULT rc=0" "serial session result"
l2_wait_exit vm 60 || fail "VMM did not exit after the guest powered off"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status"
echo "KEEL-PASS"
