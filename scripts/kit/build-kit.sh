#!/usr/bin/env bash
# Builds the guest kit used by Keel's system tests: the Debian cloud kernel
# (bzImage and PVH vmlinux), an initramfs whose /init is the Keel test agent,
# the kernel modules L1 needs for nested KVM, and a small ext4 data disk.
# See scripts/kit/README.md for the layout and the agent's markers.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/kit/build-kit.sh [--force] [OUTDIR]

Builds the Keel guest kit into OUTDIR (default: build/kit under the repository
root; relative paths are taken from the current directory).

The kernel is the Debian package behind linux-image-cloud-amd64, fetched with
`apt-get download` and unpacked with `dpkg-deb -x` (never installed). Downloads
and built kits are cached in ${KEEL_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/keel},
keyed on the kernel package version and a hash of the kit's scripts and the
busybox binary, so a repeated run only copies the cached kit.

Options:
  --force    rebuild the kit even if a cached one matches
  -h, --help show this help

Environment:
  KEEL_CACHE_DIR        cache location (see above)
  KEEL_KERNEL_PACKAGE   versioned kernel package to use instead of resolving
                        linux-image-cloud-amd64 (e.g. linux-image-6.1.0-56-cloud-amd64)
  KEEL_KERNEL_DEB       use this already-downloaded .deb (no apt access needed)

Needs: apt (apt-cache, apt-get), dpkg-deb, busybox-static, lz4, e2fsprogs, e2fsck-static,
python3, coreutils.
EOF
}

die() { echo "build-kit.sh: error: $*" >&2; exit 1; }
note() { echo "build-kit.sh: $*" >&2; }

force=0
outdir=
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --force) force=1; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$outdir" ]] || die "only one OUTDIR may be given"; outdir=$1; shift ;;
  esac
done

start_ns=$(date +%s%N)
kit_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$kit_dir/../.." && pwd)
outdir=${outdir:-$repo_root/build/kit}
mkdir -p "$outdir" || die "cannot create output directory $outdir"
outdir=$(cd "$outdir" && pwd)

cache=${KEEL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keel}
mkdir -p "$cache/debs" "$cache/kernels" "$cache/kits" ||
  die "cannot create cache directory $cache"

for tool in apt-cache apt-get dpkg-deb lz4 python3 sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found (see --help for packages)"
done
busybox_bin=/bin/busybox
[[ -x $busybox_bin ]] || die "$busybox_bin not found (install busybox-static)"
# busybox has mke2fs but no e2fsck; guests check file systems with this one.
e2fsck_bin=/sbin/e2fsck.static
[[ -x $e2fsck_bin ]] || die "$e2fsck_bin not found (install e2fsck-static)"
python3 "$kit_dir/kit_tools.py" is-static "$busybox_bin" ||
  die "$busybox_bin is dynamically linked; install busybox-static (not busybox)"

# One build at a time per cache; a second caller waits and then finds the kit.
if command -v flock >/dev/null; then
  exec 9>"$cache/kit.lock"
  flock 9
fi

# --- which kernel -----------------------------------------------------------
if [[ -n "${KEEL_KERNEL_DEB:-}" ]]; then
  [[ -f "$KEEL_KERNEL_DEB" ]] || die "KEEL_KERNEL_DEB=$KEEL_KERNEL_DEB does not exist"
  kernel_package=$(dpkg-deb -f "$KEEL_KERNEL_DEB" Package) ||
    die "cannot read the package name of $KEEL_KERNEL_DEB"
  kernel_package_version=$(dpkg-deb -f "$KEEL_KERNEL_DEB" Version)
else
  kernel_package=${KEEL_KERNEL_PACKAGE:-}
  if [[ -z "$kernel_package" ]]; then
    kernel_package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
      awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }') || true
    [[ -n "$kernel_package" ]] ||
      die "apt-cache cannot resolve linux-image-cloud-amd64 to a versioned kernel" \
          "package; run 'apt-get update' (or set KEEL_KERNEL_DEB to a .deb)"
  fi
  kernel_package_version=$(apt-cache show --no-all-versions "$kernel_package" 2>/dev/null |
    awk '$1 == "Version:" { print $2; exit }') || true
  [[ -n "$kernel_package_version" ]] ||
    die "apt-cache show $kernel_package found no version; run 'apt-get update'"
fi
kernel_version=${kernel_package#linux-image-}

# --- kit identity -----------------------------------------------------------
# The kit depends on the kernel package, on every file of scripts/kit and on
# the busybox binary that goes into the initramfs.
inputs_hash=$(
  {
    echo "$kernel_package $kernel_package_version"
    (cd "$kit_dir" && find . -type f ! -name '*.md' ! -name '*.pyc' ! -path '*/__pycache__/*' |
       LC_ALL=C sort | xargs sha256sum)
    sha256sum < "$busybox_bin"
    sha256sum < "$e2fsck_bin"
  } | sha256sum | cut -c1-12)
kit_id="${kernel_version}_${kernel_package_version}_${inputs_hash}"
cached_kit="$cache/kits/$kit_id"

# --- download and unpack ----------------------------------------------------
fetch_deb() {
  local deb="$cache/debs/${kernel_package}_${kernel_package_version}_amd64.deb"
  if [[ -n "${KEEL_KERNEL_DEB:-}" ]]; then
    deb=$KEEL_KERNEL_DEB
  elif [[ ! -f "$deb" ]]; then
    local dl
    dl=$(mktemp -d "$cache/debs/download.XXXXXX")
    # apt drops privileges to _apt for downloads; give it the directory so
    # it does not warn about an unsandboxed download.
    if [[ $(id -u) -eq 0 ]] && id _apt >/dev/null 2>&1; then
      chown _apt "$dl"
    fi
    note "downloading $kernel_package=$kernel_package_version"
    if ! (cd "$dl" && apt-get download -q "$kernel_package=$kernel_package_version" \
            >"$dl/apt.log" 2>&1); then
      cat "$dl/apt.log" >&2
      rm -rf "$dl"
      die "apt-get download $kernel_package=$kernel_package_version failed"
    fi
    local got
    got=$(find "$dl" -name '*.deb' | head -n 1)
    [[ -n "$got" ]] || { rm -rf "$dl"; die "apt-get download produced no .deb"; }
    mv -f "$got" "$deb"
    rm -rf "$dl"
  fi
  echo "$deb"
}

unpacked="$cache/kernels/${kernel_package}_${kernel_package_version}"
if [[ ! -f "$unpacked/.complete" ]]; then
  deb=$(fetch_deb)
  rm -rf "$unpacked" "$unpacked.tmp"
  mkdir -p "$unpacked.tmp"
  dpkg-deb -x "$deb" "$unpacked.tmp/root" || die "dpkg-deb -x $deb failed"
  [[ -d "$unpacked.tmp/root/lib/modules/$kernel_version" ]] ||
    die "$deb has no lib/modules/$kernel_version"
  # The package ships no modules.dep; busybox's depmod writes one for the
  # unpacked tree (kmod's depmod -b would do the same).
  "$busybox_bin" depmod -b "$unpacked.tmp/root" "$kernel_version" ||
    die "depmod for $unpacked.tmp/root failed"
  touch "$unpacked.tmp/.complete"
  mv "$unpacked.tmp" "$unpacked"
fi
kroot="$unpacked/root"
kmods="$kroot/lib/modules/$kernel_version"

# --- build ------------------------------------------------------------------
# Modules the L2 guest loads, and those L1 needs to offer /dev/kvm and read
# its payload disk. Dependencies are added and ordered by kit_tools.py.
# button + evdev: the ACPI power button (PNP0C0C, notified through the GED)
# as an input device init watches; pvpanic-mmio: the ISA pvpanic (QEMU0001)
# the cloud kernel builds as a module.
l2_modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
  virtio_pci virtio_mmio virtio_blk failover net_failover virtio_net
  virtio_console virtio_balloon virtio-rng vsock
  vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
  button evdev pvpanic-mmio)
l1_modules=(irqbypass kvm kvm-amd virtio_ring virtio virtio_pci_legacy_dev
  virtio_pci_modern_dev virtio_pci virtio_blk tun llc stp bridge)

make_data_tree() {
  local dir=$1
  mkdir -p "$dir/nested/deeper"
  echo "hello from the keel data disk" > "$dir/hello.txt"
  seq 1 100000 > "$dir/numbers.txt"
  : > "$dir/empty"
  echo "a file three directories down" > "$dir/nested/deeper/file.txt"
  # 3 MiB of deterministic, incompressible bytes: block-level corruption
  # anywhere in the file changes its checksum.
  python3 - "$dir/random.bin" <<'PY'
import hashlib, sys
block, out = b"keel-data-disk", bytearray()
while len(out) < 3 * 1024 * 1024:
    block = hashlib.sha256(block).digest()
    out += block
open(sys.argv[1], "wb").write(out)
PY
  (cd "$dir" && find . -type f | LC_ALL=C sort | sed 's|^\./||' |
     xargs sha256sum > ../SHA256SUMS.tmp)
  mv "$dir/../SHA256SUMS.tmp" "$dir/SHA256SUMS"
}

build_kit() {
  local dest=$1
  local stage="$dest.stage"
  rm -rf "$stage"
  mkdir -p "$dest" "$stage"

  cp "$kroot/boot/vmlinuz-$kernel_version" "$dest/vmlinuz"
  cp "$kroot/boot/config-$kernel_version" "$dest/kernel.config"
  local pvh_entry
  pvh_entry=$(python3 "$kit_dir/kit_tools.py" extract-vmlinux \
                "$dest/vmlinuz" "$dest/vmlinux") ||
    die "extracting vmlinux from $kroot/boot/vmlinuz-$kernel_version failed"

  # Modules: one tree holding both sets, plus the load order of each.
  local l2_order l1_order path
  l2_order=$(python3 "$kit_dir/kit_tools.py" module-order "$kmods" "${l2_modules[@]}")
  l1_order=$(python3 "$kit_dir/kit_tools.py" module-order "$kmods" "${l1_modules[@]}")
  local modtree="$dest/modules/lib/modules/$kernel_version"
  mkdir -p "$modtree"
  for path in $(printf '%s\n%s\n' "$l2_order" "$l1_order" | LC_ALL=C sort -u); do
    mkdir -p "$modtree/$(dirname "$path")"
    cp "$kmods/$path" "$modtree/$path"
  done
  printf '%s\n' "$l2_order" > "$dest/modules/l2.order"
  printf '%s\n' "$l1_order" > "$dest/modules/l1.order"

  # L2 initramfs: busybox with its applet links, the agent, the modules.
  local ird="$stage/initramfs"
  mkdir -p "$ird"/{bin,sbin,usr/bin,usr/sbin,etc/keel,proc,sys,dev,tmp,run,mnt,root}
  cp "$busybox_bin" "$ird/bin/busybox"
  local applet
  for applet in $("$busybox_bin" --list-full); do
    [[ -e "$ird/$applet" ]] && continue
    ln -s /bin/busybox "$ird/$applet"
  done
  install -m 0755 "$kit_dir/init" "$ird/init"
  install -m 0755 "$e2fsck_bin" "$ird/sbin/e2fsck"
  # The vsock test tool (guest and host sides); static, so it runs in this
  # initramfs and in L1 alike.
  gcc -static -Os -Wall -o "$dest/keel-vsock" "$kit_dir/keel-vsock.c" ||
    die "compiling keel-vsock.c failed (gcc and libc6-dev are needed)"
  install -m 0755 "$dest/keel-vsock" "$ird/bin/keel-vsock"
  mkdir -p "$ird/lib/modules/$kernel_version"
  local -a l2_paths
  mapfile -t l2_paths <<< "$l2_order"
  for path in "${l2_paths[@]}"; do
    mkdir -p "$ird/lib/modules/$kernel_version/$(dirname "$path")"
    cp "$kmods/$path" "$ird/lib/modules/$kernel_version/$path"
  done
  grep -F -f <(printf '%s:\n' "${l2_paths[@]}") "$kmods/modules.dep" \
    > "$ird/lib/modules/$kernel_version/modules.dep" || true
  printf '%s\n' "$l2_order" > "$ird/etc/keel/modules"
  echo "root:x:0:0:root:/root:/bin/sh" > "$ird/etc/passwd"
  echo "root:x:0:" > "$ird/etc/group"
  echo 'PS1="keel-guest:\w# "' > "$ird/etc/profile"
  echo "$kit_id" > "$ird/etc/keel/kit-id"
  python3 "$kit_dir/mkcpio.py" --root "$ird" --out "$dest/initramfs.cpio.gz" \
    --node dev/console:c:5:1:600 --node dev/null:c:1:3:666 ||
    die "packing $dest/initramfs.cpio.gz failed"

  # Data disk with known contents.
  make_data_tree "$stage/data"
  cp "$stage/data/SHA256SUMS" "$dest/data.SHA256SUMS"
  "$kit_dir/make-disk.sh" --label keel-data \
    --uuid 6b65656c-6461-7461-0000-000000000001 "$stage/data" "$dest/data.ext4" ||
    die "building $dest/data.ext4 failed"

  cat > "$dest/kit.env" <<EOF
# Keel guest kit, written by scripts/kit/build-kit.sh. Shell-sourceable.
# File names are relative to the directory holding this file.
KEEL_KIT_ID=$kit_id
KERNEL_VERSION=$kernel_version
KERNEL_PACKAGE=$kernel_package
KERNEL_PACKAGE_VERSION=$kernel_package_version
KERNEL_PVH_ENTRY=$pvh_entry
KIT_VMLINUZ=vmlinuz
KIT_VMLINUX=vmlinux
KIT_INITRAMFS=initramfs.cpio.gz
KIT_VSOCK_TOOL=keel-vsock
KIT_DATA_DISK=data.ext4
KIT_DATA_SHA256SUMS=data.SHA256SUMS
KIT_KERNEL_CONFIG=kernel.config
KIT_MODULES_ROOT=modules
KIT_MODULES_DIR=modules/lib/modules/$kernel_version
KIT_L1_MODULE_ORDER=modules/l1.order
KIT_L2_MODULE_ORDER=modules/l2.order
EOF
  rm -rf "$stage"
}

if [[ $force -eq 1 || ! -f "$cached_kit/.complete" ]]; then
  note "building kit $kit_id"
  rm -rf "$cached_kit" "$cached_kit.tmp"
  build_kit "$cached_kit.tmp"
  touch "$cached_kit.tmp/.complete"
  mv "$cached_kit.tmp" "$cached_kit"
else
  note "using cached kit $kit_id"
fi

# --- install into OUTDIR ----------------------------------------------------
kit_files=(vmlinuz vmlinux initramfs.cpio.gz data.ext4 data.SHA256SUMS
  kernel.config kit.env keel-vsock)
current_id=$( (grep -s '^KEEL_KIT_ID=' "$outdir/kit.env" || true) | cut -d= -f2)
if [[ "$current_id" == "$kit_id" && $force -eq 0 ]] &&
   cmp -s "$cached_kit/data.ext4" "$outdir/data.ext4"; then
  note "$outdir already holds kit $kit_id"
else
  # Copies, not hard links: a test that writes to its kit (a disk image
  # opened read-write) must not change the cached original.
  for f in "${kit_files[@]}"; do rm -f "$outdir/$f"; done
  rm -rf "$outdir/modules"
  for f in "${kit_files[@]}"; do cp "$cached_kit/$f" "$outdir/$f"; done
  cp -r "$cached_kit/modules" "$outdir/modules"
fi

# Keep the cache bounded: the three most recent kits and kernels.
prune() {
  local dir=$1 keep=$2
  find "$dir" -mindepth 1 -maxdepth 1 -type d ! -name '*.tmp' -printf '%T@ %p\n' |
    sort -rn | tail -n +$((keep + 1)) | cut -d' ' -f2- |
    while read -r old; do rm -rf "$old"; done
}
touch "$cached_kit" "$unpacked"
prune "$cache/kits" 3
prune "$cache/kernels" 3

elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
note "kit $kit_id ready in $outdir ($((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000))) s)"
