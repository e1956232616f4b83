# Scenario body (sourced): boot $BOOT_KERNEL (a file name in the kit) with 2
# vCPUs under $KEEL_L2_VMM; the guest must report 2 CPUs, the configured
# memory and the kit's kernel, run a keel.cmd scenario, power off, and the
# VMM must then exit with status 0.
. "$KEEL_SYSTEM_DIR/lib.sh"
. "$KEEL_KIT/kit.env"

mem_mib=256
cmd=$(b64 - <<'SCRIPT'
echo "hello from $(uname -n)"
echo "answer=$((6 * 7))"
SCRIPT
)
l2_boot vm --cpus 2 --mem "$mem_mib" --kernel "$KEEL_KIT/$BOOT_KERNEL" \
  --cmdline "keel.cmd=$cmd"
assert_eq "$L2_CPUS" 2 "guest CPU count"
# MemTotal excludes what firmware and the kernel image reserve.
assert_in_range "$L2_MEM_KB" $((mem_mib * 1024 * 70 / 100)) $((mem_mib * 1024)) \
  "guest MemTotal in kB for $mem_mib MiB"
assert_eq "$L2_KERNEL" "$KERNEL_VERSION" "guest kernel release"

l2_wait vm 'answer=' 60 || fail "keel.cmd scenario printed no answer"
assert_eq "$L2_LINE" "answer=42" "keel.cmd scenario output"
l2_wait vm 'KEEL-RESULT rc=' 60 || fail "no KEEL-RESULT marker"
assert_eq "$L2_LINE" "KEEL-RESULT rc=0" "keel.cmd scenario result"
l2_wait_exit vm 60 || fail "VMM did not exit after the guest powered off"
assert_eq "$L2_EXIT_RC" 0 "VMM exit status"
echo "KEEL-PASS"
