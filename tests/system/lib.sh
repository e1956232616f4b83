# shellcheck shell=sh
# Helpers for system-test scenarios (tests/system/scenarios/*.sh).
#
# Scenarios run under busybox sh, inside L1 (nested mode) or on the host
# (direct mode); tests/system/harness.py sets up the environment:
#   KEEL_KIT        guest kit directory (vmlinuz, initramfs.cpio.gz, data.ext4, kit.env)
#   KEEL_SYSTEM_DIR this directory (lib.sh, scenarios/, assets/)
#   KEEL_ASSETS     prebuilt disk images: <scenario>.ext4 from scenarios/<scenario>.disk/
#   KEEL_BIN        binaries carried for the test (qemu-system-x86_64, keel-vmm, ...)
#   KEEL_WORKDIR    empty scratch directory for this scenario
#   KEEL_SCENARIO   scenario name
#   KEEL_L2_VMM     which VMM boots L2 guests: qemu (default) or keel
#
# An L2 guest is named by the scenario; its files live in $KEEL_WORKDIR/<name>/:
#   console.log  the guest's serial console (the VMM's stdout)
#   vmm.err      the VMM's stderr
#   in           FIFO feeding the guest's serial console (the VMM's stdin)
#   pid          the VMM's PID; rc once it has exited
# Functions (each exits the scenario through `fail` on a broken contract):
#   l2_boot NAME [--cpus N] [--mem MIB] [--cmdline STR] [--disk FILE]...
#           [--kernel F] [--initrd F] [--serial-agent] [--timeout S]
#           [--no-wait] [--verbose] [--allow-reboot]
#           [--vmm-arg ARG]... [--console ttyS0|hvc0]   (the last two: keel only)
#       Starts the VMM in the background and waits for KEEL-INIT-READY (sets
#       L2_CPUS, L2_MEM_KB, L2_KERNEL). A guest that does not reach userspace
#       is retried once (KEEL_L2_BOOT_RETRIES), keeping both consoles.
#   l2_wait NAME ERE [TIMEOUT]   waits for a console line starting with ERE;
#                                sets L2_LINE; returns 1 on timeout or VMM exit
#   l2_send NAME LINE            types LINE on the guest's serial console
#   l2_cmd NAME LINE [TIMEOUT]   runs LINE through the serial agent; sets
#                                L2_RC and L2_OUTPUT
#   l2_wait_exit NAME [TIMEOUT]  waits for the VMM to exit; sets L2_EXIT_RC
#   l2_kill NAME                 stops the VMM this scenario started
#   l2_restore NAME SNAPSHOT [--vmm-arg ARG]...   (keel only) starts a new
#       keel-vmm --restore SNAPSHOT for guest NAME, whose VMM has exited; the
#       old console is kept as console.log.before-restore. Does not wait.
#   l2_incoming NAME ADDRESS [--vmm-arg ARG]...   (keel only) starts a
#       keel-vmm --incoming ADDRESS with the last l2_boot's machine flags,
#       to receive a live migration as guest NAME. Does not wait.
#   l2_run_foreground [options]  runs a VMM in the foreground on this terminal
#   l1_bridge NAME ADDR/PREFIX   a bridge in L1 with that address, deleted at the end
#   b64 FILE|-                   base64 without line breaks (for keel.cmd=)
#   log MSG, fail MSG, skip MSG, assert_eq A B WHAT, assert_match S ERE WHAT,
#   assert_in_range N LO HI WHAT, require_binary NAME
# Markers printed by this file: KEEL-L2-READY, KEEL-L2-RETRY, KEEL-FAIL,
# KEEL-SKIP, KEEL-PASS.

: "${KEEL_KIT:?KEEL_KIT is not set; run scenarios through tests/system/harness.py}"
: "${KEEL_SCENARIO:=$(basename "$0" .sh)}"
: "${KEEL_L2_VMM:=qemu}"
: "${KEEL_L2_BOOT_RETRIES:=1}"
if [ -z "${KEEL_WORKDIR:-}" ]; then
  KEEL_WORKDIR=$(mktemp -d "/tmp/keel-$KEEL_SCENARIO.XXXXXX")
fi
mkdir -p "$KEEL_WORKDIR"
KEEL_ASSETS=${KEEL_ASSETS:-${KEEL_SYSTEM_DIR:-.}/assets}
if [ -n "${KEEL_BIN:-}" ]; then
  PATH=$KEEL_BIN:$PATH
fi
export KEEL_KIT KEEL_SCENARIO KEEL_L2_VMM KEEL_WORKDIR KEEL_ASSETS PATH

_keel_t0=$(cut -d' ' -f1 /proc/uptime)
_keel_vms=

log() {
  printf '[%s +%ss] %s\n' "$KEEL_SCENARIO" \
    "$(awk -v t0="$_keel_t0" '{ printf "%.1f", $1 - t0 }' /proc/uptime)" "$*"
}

fail() {
  echo "KEEL-FAIL $*"
  exit 1
}

skip() {
  echo "KEEL-SKIP $*"
  exit 77
}

assert_eq() {
  [ "$1" = "$2" ] || fail "$3: got '$1', want '$2'"
  log "ok: $3 = '$1'"
}

assert_match() {
  printf '%s\n' "$1" | grep -Eq -- "$2" || fail "$3: '$1' does not match /$2/"
  log "ok: $3 matches /$2/"
}

assert_in_range() {
  [ "$1" -ge "$2" ] && [ "$1" -le "$3" ] || fail "$4: $1 not in [$2, $3]"
  log "ok: $4 = $1 (in [$2, $3])"
}

require_binary() {
  command -v "$1" >/dev/null 2>&1 ||
    skip "$1 is not among the binaries given to the harness (--binary)"
  command -v "$1"
}

b64() {
  if [ "$1" = - ]; then base64 -w 0; else base64 -w 0 "$1"; fi
}

_vm_dir() { echo "$KEEL_WORKDIR/$1"; }

# Time since boot in centiseconds, and that time $1 seconds from now.
_now_cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }
_deadline_cs() { awk -v t="$1" '{ printf "%d", ($1 + t) * 100 }' /proc/uptime; }

_pid_alive() {
  # A zombie is not alive: its VMM has exited but was not reaped yet.
  [ -r "/proc/$1/stat" ] || return 1
  [ "$(cut -d')' -f2 "/proc/$1/stat" | cut -d' ' -f2)" != Z ]
}

# Copies the complete lines of guest $1's console (those ending in a
# newline, without carriage returns) to $dir/snapshot and prints its path. A
# line still being written must not match: it may be cut short.
_l2_snapshot() {
  local dir
  dir=$(_vm_dir "$1")
  cat "$dir/console.log" > "$dir/snapshot.raw"
  if [ -s "$dir/snapshot.raw" ] &&
     [ "$(tail -c 1 "$dir/snapshot.raw" | od -An -c | tr -d ' ')" != '\n' ]; then
    sed '$d' "$dir/snapshot.raw" | tr -d '\r' > "$dir/snapshot"
  else
    tr -d '\r' < "$dir/snapshot.raw" > "$dir/snapshot"
  fi
  echo "$dir/snapshot"
}

_record_exit() {
  # Reaps the VMM of guest $1 (its PID file says which) and stores its status.
  local dir pid rc
  dir=$(_vm_dir "$1")
  [ -f "$dir/rc" ] && return 0
  pid=$(cat "$dir/pid")
  rc=0
  wait "$pid" 2>/dev/null || rc=$?
  echo "$rc" > "$dir/rc"
}

# Guest $1's VMM is gone unexpectedly: reaps it (its status goes to
# $dir/rc; 128+N is signal N) and logs what L1's kernel said last, where a
# segfault or an OOM kill shows (the console's quiet level hides them).
_l2_why_gone() {
  _record_exit "$1"
  dmesg 2>/dev/null | tail -n 6 | while IFS= read -r line; do log "L1 kernel: $line"; done
}

# --- VMM backends ------------------------------------------------------------
# Each backend execs its VMM with the guest described by the _l2_* variables:
# _l2_kernel, _l2_initrd, _l2_cmdline, _l2_cpus, _l2_mem_mib, and _l2_disks
# (one "PATH MODE" per line, MODE ro or rw). The serial console is the
# process's stdin and stdout. Adding a VMM is adding one such function.

_l2_exec_qemu() {
  local disk mode index readonly_opt
  # microvm boots fastest. The cloud kernel cannot take virtio-mmio devices
  # from the command line, so ACPI (on by default) describes them; it is also
  # how the guest powers the machine off.
  set -- "${KEEL_QEMU:-qemu-system-x86_64}" -enable-kvm -cpu host \
    -M microvm,x-option-roms=off,isa-serial=on,rtc=on \
    -smp "$_l2_cpus" -m "$_l2_mem_mib" \
    -nodefaults -no-user-config -display none -no-reboot \
    -chardev stdio,id=console,signal=off -serial chardev:console \
    -kernel "$_l2_kernel" -initrd "$_l2_initrd" -append "$_l2_cmdline"
  index=0
  while read -r disk mode; do
    [ -n "$disk" ] || continue
    readonly_opt=on
    [ "$mode" = rw ] && readonly_opt=off
    set -- "$@" -drive "id=disk$index,file=$disk,format=raw,if=none,readonly=$readonly_opt" \
      -device "virtio-blk-device,drive=disk$index"
    index=$((index + 1))
  done <<EOF
$_l2_disks
EOF
  exec "$@"
}

_l2_exec_keel() {
  local disk mode readonly_opt arg
  if [ -n "${_l2_restore_from:-}" ]; then
    # The machine (kernel, sizes, devices) comes from the snapshot.
    set -- keel-vmm --restore "$_l2_restore_from" --serial stdio --no-reboot \
      --log-level "${KEEL_VMM_LOG_LEVEL:-warn}"
  else
    # --no-reboot: a guest that panics ends the run (pvpanic: exit 4; a
    # panic=-1 reboot without pvpanic: exit 3).
    set -- keel-vmm --kernel "$_l2_kernel" --initrd "$_l2_initrd" --cmdline "$_l2_cmdline" \
      --cpus "$_l2_cpus" --memory "$_l2_mem_mib" --log-level "${KEEL_VMM_LOG_LEVEL:-warn}"
    if [ "$_l2_console" = hvc0 ]; then
      set -- "$@" --serial none --virtio-console stdio
    else
      set -- "$@" --serial stdio
    fi
    [ "$_l2_allow_reboot" = 1 ] || set -- "$@" --no-reboot
    while read -r disk mode; do
      [ -n "$disk" ] || continue
      readonly_opt=on
      [ "$mode" = rw ] && readonly_opt=off
      set -- "$@" --disk "path=$disk,readonly=$readonly_opt"
    done <<EOF
$_l2_disks
EOF
  fi
  # One extra keel-vmm argument per line (values may contain spaces).
  while IFS= read -r arg; do
    [ -n "$arg" ] && set -- "$@" "$arg"
  done <<EOF
$_l2_vmm_args
EOF
  exec "$@"
}

# Parses l2_boot/l2_run_foreground options into the _l2_* variables.
_l2_parse_options() {
  _l2_cpus=1 _l2_mem_mib=256 _l2_extra='' _l2_disks='' _l2_timeout=${KEEL_L2_BOOT_TIMEOUT:-180}
  _l2_kernel=$KEEL_KIT/vmlinuz _l2_initrd=$KEEL_KIT/initramfs.cpio.gz
  _l2_wait=1 _l2_quiet=quiet _l2_serial_agent=0 _l2_allow_reboot=0 _l2_vmm_args='' _l2_console=ttyS0
  while [ $# -gt 0 ]; do
    case "$1" in
      --cpus) _l2_cpus=$2; shift 2 ;;
      --mem) _l2_mem_mib=$2; shift 2 ;;
      --cmdline) _l2_extra="$_l2_extra $2"; shift 2 ;;
      --disk) _l2_disks="$_l2_disks
$2 ro"; shift 2 ;;
      --disk-rw) _l2_disks="$_l2_disks
$2 rw"; shift 2 ;;
      --kernel) _l2_kernel=$2; shift 2 ;;
      --initrd) _l2_initrd=$2; shift 2 ;;
      --timeout) _l2_timeout=$2; shift 2 ;;
      --no-wait) _l2_wait=0; shift ;;
      --allow-reboot) _l2_allow_reboot=1; shift ;;  # keel: reboot in place
      --vmm-arg) _l2_vmm_args="$_l2_vmm_args
$2"; shift 2 ;;  # keel only: passed to keel-vmm as is
      --console) _l2_console=$2; shift 2 ;;  # ttyS0 (default) or hvc0 (keel: virtio console)
      --verbose) _l2_quiet=; shift ;;
      --serial-agent) _l2_serial_agent=1; _l2_extra="$_l2_extra keel.serial=1"; shift ;;
      *) fail "l2 option '$1' is unknown" ;;
    esac
  done
  [ -f "$_l2_kernel" ] || fail "kernel $_l2_kernel does not exist"
  [ -f "$_l2_initrd" ] || fail "initrd $_l2_initrd does not exist"
  local disk mode
  while read -r disk mode; do
    [ -z "$disk" ] || [ -f "$disk" ] || fail "disk image $disk does not exist"
  done <<EOF
$_l2_disks
EOF
  [ "${KEEL_L2_VERBOSE:-0}" = 1 ] && _l2_quiet=
  _l2_cmdline="console=$_l2_console panic=-1${_l2_quiet:+ $_l2_quiet}$_l2_extra"
  case "$KEEL_L2_VMM" in
    qemu)
      command -v "${KEEL_QEMU:-qemu-system-x86_64}" >/dev/null 2>&1 ||
        fail "${KEEL_QEMU:-qemu-system-x86_64} not found (PATH=$PATH)" ;;
    keel)
      command -v keel-vmm >/dev/null 2>&1 ||
        skip "KEEL_L2_VMM=keel but keel-vmm was not given to the harness (--binary)"
      ;;
    *) fail "KEEL_L2_VMM=$KEEL_L2_VMM is not a known VMM (qemu, keel)" ;;
  esac
  if [ "$KEEL_L2_VMM" != keel ]; then
    [ -z "$_l2_vmm_args" ] || fail "--vmm-arg is for KEEL_L2_VMM=keel only"
    [ "$_l2_console" = ttyS0 ] || fail "--console $_l2_console is for KEEL_L2_VMM=keel only"
  fi
}

_l2_start() {
  local name dir
  name=$1
  dir=$(_vm_dir "$name")
  rm -f "$dir/in" "$dir/pid" "$dir/rc" "$dir/dumped" "$dir/restored"
  mkfifo "$dir/in"
  : > "$dir/console.log"
  printf '%s\n' "$_l2_cmdline" > "$dir/cmdline"
  # The FIFO is opened read-write so that opening it never blocks and the
  # VMM never sees end-of-file on its console input.
  ( "_l2_exec_$KEEL_L2_VMM" ) <>"$dir/in" >"$dir/console.log" 2>"$dir/vmm.err" &
  echo $! > "$dir/pid"
  # The harness's L1 runner kills whatever is listed here if the scenario is
  # killed before it could clean up.
  echo $! >> "$KEEL_WORKDIR/pids"
  log "started $KEEL_L2_VMM for $name (pid $!, ${_l2_cpus} cpus, ${_l2_mem_mib} MiB)"
}

l2_boot() {
  local name dir attempt reason ready f
  [ $# -ge 1 ] || fail "l2_boot needs a guest name"
  name=$1
  shift
  _l2_parse_options "$@"
  [ -e /dev/kvm ] || fail "/dev/kvm does not exist: cannot boot an L2 guest"
  dir=$(_vm_dir "$name")
  mkdir -p "$dir"
  case " $_keel_vms " in *" $name "*) ;; *) _keel_vms="$_keel_vms $name" ;; esac
  attempt=1
  while :; do
    _l2_start "$name"
    [ "$_l2_wait" = 1 ] || return 0
    if l2_wait "$name" 'KEEL-INIT-READY ' "$_l2_timeout"; then
      break
    fi
    # The guest did not reach userspace: known nested-virtualization flakes
    # (a hang after virtio setup, a silent reset) look like this. Keep this
    # attempt's files and try once more; a second failure is a real bug.
    reason=$_l2_wait_reason
    l2_kill "$name"
    _l2_dump "$name" "attempt $attempt"
    for f in console.log vmm.err rc; do
      [ -f "$dir/$f" ] && mv "$dir/$f" "$dir/$f.attempt$attempt"
    done
    if [ "$attempt" -gt "$KEEL_L2_BOOT_RETRIES" ]; then
      touch "$dir/dumped"
      fail "$name did not reach userspace in $attempt attempts (last: $reason)"
    fi
    echo "KEEL-L2-RETRY vm=$name attempt=$attempt reason=$reason"
    attempt=$((attempt + 1))
  done
  ready=$L2_LINE
  L2_CPUS=$(echo "$ready" | sed -n 's/.* cpus=\([0-9]*\).*/\1/p')
  L2_MEM_KB=$(echo "$ready" | sed -n 's/.* mem_kb=\([0-9]*\).*/\1/p')
  L2_KERNEL=$(echo "$ready" | sed -n 's/.* kernel=\([^ ]*\).*/\1/p')
  echo "KEEL-L2-READY vm=$name ${ready#KEEL-INIT-READY }"
  if [ "$_l2_serial_agent" = 1 ]; then
    l2_wait "$name" 'KEEL-SERIAL-READY' "$_l2_timeout" ||
      fail "$name: serial agent did not start ($_l2_wait_reason)"
  fi
}

l2_wait() {
  local name pattern timeout dir pid deadline
  name=$1 pattern=$2 timeout=${3:-120}
  dir=$(_vm_dir "$name")
  [ -f "$dir/pid" ] || fail "l2_wait: no guest named $name was started"
  pid=$(cat "$dir/pid")
  deadline=$(_deadline_cs "$timeout")
  while :; do
    if L2_LINE=$(grep -a -m 1 -E "^($pattern)" "$(_l2_snapshot "$name")"); then
      return 0
    fi
    if ! _pid_alive "$pid"; then
      # One last look: the line may have been written just before the exit.
      if L2_LINE=$(grep -a -m 1 -E "^($pattern)" "$(_l2_snapshot "$name")"); then
        return 0
      fi
      _l2_why_gone "$name"
      _l2_wait_reason="VMM exited with rc=$(cat "$dir/rc") before printing /$pattern/"
      log "$name: $_l2_wait_reason"
      return 1
    fi
    if [ "$(_now_cs)" -ge "$deadline" ]; then
      _l2_wait_reason="no /$pattern/ within ${timeout}s"
      log "$name: $_l2_wait_reason"
      return 1
    fi
    sleep 0.2
  done
}

l2_send() {
  local dir
  dir=$(_vm_dir "$1")
  [ -p "$dir/in" ] || fail "l2_send: no guest named $1 was started"
  printf '%s\n' "$2" > "$dir/in"
}

l2_cmd() {
  local name line timeout dir before want deadline
  name=$1 line=$2 timeout=${3:-120}
  dir=$(_vm_dir "$name")
  before=$(grep -a -c '^KEEL-CMD-DONE' "$(_l2_snapshot "$name")" || true)
  log "$name\$ $line"
  l2_send "$name" "$line"
  want=$((before + 1))
  deadline=$(_deadline_cs "$timeout")
  while [ "$(grep -a -c '^KEEL-CMD-DONE' "$(_l2_snapshot "$name")" || true)" -lt "$want" ]; do
    _pid_alive "$(cat "$dir/pid")" || {
      _l2_why_gone "$name"
      fail "$name: VMM exited with rc=$(cat "$dir/rc") while running '$line'"
    }
    [ "$(_now_cs)" -lt "$deadline" ] ||
      fail "$name: no KEEL-CMD-DONE for '$line' within ${timeout}s"
    sleep 0.2
  done
  # Output of this command: the lines after the previous command's marker
  # (or the agent's ready marker, or the start of a restored guest's
  # console, which has none) up to its own marker.
  L2_OUTPUT=$(awk -v want="$want" -v collecting="$([ -f "$dir/restored" ] && echo 1 || echo 0)" '
    /^KEEL-CMD-DONE/ { seen++; if (seen == want) exit; next }
    /^KEEL-SERIAL-READY/ { collecting = 1; next }
    collecting && seen == want - 1 { print }' "$dir/snapshot")
  L2_RC=$(grep -a '^KEEL-CMD-DONE' "$dir/snapshot" | sed -n "${want}p" | sed 's/.*rc=//')
  log "$name: rc=$L2_RC"
}

l2_wait_exit() {
  local name timeout dir pid deadline
  name=$1 timeout=${2:-60}
  dir=$(_vm_dir "$name")
  pid=$(cat "$dir/pid")
  deadline=$(_deadline_cs "$timeout")
  while _pid_alive "$pid"; do
    if [ "$(_now_cs)" -ge "$deadline" ]; then
      log "$name: VMM still running after ${timeout}s"
      return 1
    fi
    sleep 0.2
  done
  _record_exit "$name"
  L2_EXIT_RC=$(cat "$dir/rc")
  log "$name: VMM exited with rc=$L2_EXIT_RC"
}

# _l2_vmm_arg_options WHO [--vmm-arg ARG]...: appends each ARG to
# _l2_vmm_args; any other option fails, naming WHO.
_l2_vmm_arg_options() {
  local who=$1
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --vmm-arg) _l2_vmm_args="$_l2_vmm_args
$2"; shift 2 ;;
      *) fail "$who option '$1' is unknown" ;;
    esac
  done
}

l2_restore() {
  local name dir
  [ $# -ge 2 ] || fail "l2_restore needs a guest name and a snapshot"
  [ "$KEEL_L2_VMM" = keel ] || fail "l2_restore is for KEEL_L2_VMM=keel only"
  name=$1 _l2_restore_from=$2
  shift 2
  _l2_vmm_args=''
  _l2_vmm_arg_options l2_restore "$@"
  dir=$(_vm_dir "$name")
  _record_exit "$name"
  mv "$dir/console.log" "$dir/console.log.before-restore"
  _l2_start "$name"
  touch "$dir/restored"
  _l2_restore_from=
}

# l2_wait_answer NAME OUTPUT COMMAND...: runs COMMAND (a keelctl call on the
# API of NAME's keel-vmm, just started or restored) until it succeeds, its
# output in OUTPUT; fails with keel-vmm's stderr if that exits first or
# does not answer within 60 s.
l2_wait_answer() {
  local name output deadline
  name=$1 output=$2
  shift 2
  deadline=$(_deadline_cs 60)
  until "$@" > "$output" 2>/dev/null; do
    _pid_alive "$(cat "$(_vm_dir "$name")/pid")" ||
      fail "the keel-vmm of $name exited: $(cat "$(_vm_dir "$name")/vmm.err")"
    [ "$(_now_cs)" -lt "$deadline" ] ||
      fail "the keel-vmm of $name never answered: $(cat "$(_vm_dir "$name")/vmm.err")"
    sleep 0.2
  done
}

# l2_incoming NAME ADDRESS [--vmm-arg ARG]...: a keel-vmm with the machine
# flags of the last l2_boot (kernel, sizes, disks), waiting on ADDRESS
# (unix:PATH or tcp:HOST:PORT) for a live migration (--incoming). Once the
# guest arrives its console goes on as a restored guest's does (no boot
# banner), so l2_cmd works on it.
l2_incoming() {
  local name dir address
  [ $# -ge 2 ] || fail "l2_incoming needs a guest name and an address"
  [ "$KEEL_L2_VMM" = keel ] || fail "l2_incoming is for KEEL_L2_VMM=keel only"
  name=$1 address=$2
  shift 2
  _l2_vmm_args="--incoming=$address"
  _l2_vmm_arg_options l2_incoming "$@"
  dir=$(_vm_dir "$name")
  mkdir -p "$dir"
  case " $_keel_vms " in *" $name "*) ;; *) _keel_vms="$_keel_vms $name" ;; esac
  _l2_start "$name"
  touch "$dir/restored"
}

l2_kill() {
  local dir pid waited
  dir=$(_vm_dir "$1")
  [ -f "$dir/pid" ] || return 0
  pid=$(cat "$dir/pid")
  if _pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    waited=0
    while _pid_alive "$pid" && [ "$waited" -lt 30 ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    _pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null
    log "$1: stopped VMM pid $pid"
  fi
  _record_exit "$1"
}

# Prints a guest's console and VMM stderr into the scenario's log, prefixed
# with the guest's name so that its markers are not taken for L1's.
_l2_dump() {
  local name label dir
  name=$1 label=${2:-}
  dir=$(_vm_dir "$name")
  [ -f "$dir/dumped" ] && return 0
  [ -f "$dir/console.log" ] || return 0
  echo "----- $name console${label:+ ($label)}: $(cat "$dir/cmdline" 2>/dev/null) -----"
  tr -d '\r' < "$dir/console.log" 2>/dev/null | sed "s/^/$name| /"
  if [ -s "$dir/vmm.err" ]; then
    echo "----- $name VMM stderr${label:+ ($label)} -----"
    sed "s/^/$name!| /" "$dir/vmm.err"
  fi
  echo "----- end of $name${label:+ ($label)} -----"
  [ -n "$label" ] || touch "$dir/dumped"
}

# l1_bridge NAME ADDR/PREFIX: a Linux bridge in L1 with that address, up,
# deleted when the scenario ends (scenarios share one L1, so a bridge or
# subnet left behind would break the next scenario that wants it).
_keel_bridges=
l1_bridge() {
  brctl addbr "$1" || fail "cannot create bridge $1 (tun/bridge modules in L1?)"
  _keel_bridges="$_keel_bridges $1"
  ip addr add "$2" dev "$1" || fail "cannot give bridge $1 the address $2"
  ip link set "$1" up
}

_keel_cleanup() {
  local name
  for name in $_keel_vms; do
    l2_kill "$name"
    _l2_dump "$name"
  done
  _keel_vms=
  for name in $_keel_bridges; do
    ip link set "$name" down 2>/dev/null
    brctl delbr "$name" 2>/dev/null
  done
  _keel_bridges=
}
trap _keel_cleanup EXIT
trap '_keel_cleanup; exit 143' TERM
trap '_keel_cleanup; exit 130' INT

# Runs a guest in the foreground with its serial console on this terminal
# (for demos). Takes l2_boot's options; returns the VMM's exit status.
l2_run_foreground() {
  local rc
  _l2_parse_options "$@"
  [ -e /dev/kvm ] || fail "/dev/kvm does not exist: cannot boot an L2 guest"
  log "running $KEEL_L2_VMM in the foreground: $_l2_cmdline"
  rc=0
  ( "_l2_exec_$KEEL_L2_VMM" ) || rc=$?
  return "$rc"
}
