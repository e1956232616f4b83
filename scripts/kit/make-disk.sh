#!/usr/bin/env bash
# Builds an ext4 disk image from a directory without mounting anything
# (mkfs.ext4 -d copies the tree in), so it works unprivileged and in CI.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: make-disk.sh [--label NAME] [--uuid UUID] SRC_DIR OUT.ext4 [SIZE]

Writes an ext4 image OUT.ext4 holding the contents of SRC_DIR (owned by root).
SIZE is anything truncate(1) accepts (64M, 1G, ...). Default: the tree's size
plus a quarter plus 16 MiB, rounded up to a MiB. The image is sparse, so free
space costs nothing on the host. The output is written to a temporary file
and renamed, so an interrupted run never leaves a half-written image behind.

  --label NAME   filesystem label (default: keel)
  --uuid UUID    filesystem UUID (default: random; fix it for reproducibility)
EOF
}

die() { echo "make-disk.sh: error: $*" >&2; exit 1; }

label=keel
uuid=
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --label) [[ $# -ge 2 ]] || die "--label needs a value"; label=$2; shift 2 ;;
    --uuid) [[ $# -ge 2 ]] || die "--uuid needs a value"; uuid=$2; shift 2 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 2 && $# -le 3 ]] || { usage >&2; exit 2; }
src=$1
out=$2
size=${3:-}

[[ -d "$src" ]] || die "source directory $src does not exist"
mkfs=$(command -v mkfs.ext4 || true)
[[ -n "$mkfs" ]] || mkfs=/usr/sbin/mkfs.ext4
[[ -x "$mkfs" ]] || die "mkfs.ext4 not found (install the e2fsprogs package)"

if [[ -z "$size" ]]; then
  used_kib=$(du -sk --apparent-size "$src" | cut -f1)
  files=$(find "$src" | wc -l)
  # Room for the tree, ext4 metadata (one inode and some slack per file), the
  # journal and some free space for tests that write.
  size_kib=$(( used_kib + used_kib / 4 + files * 4 + 16 * 1024 ))
  size="$(( (size_kib + 1023) / 1024 ))M"
fi

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
rm -f "$tmp"
truncate -s "$size" "$tmp" || die "cannot create $tmp with size $size"
uuid_args=()
[[ -n "$uuid" ]] && uuid_args=(-U "$uuid")
if ! "$mkfs" -q -F -L "$label" "${uuid_args[@]}" -m 0 -E root_owner=0:0 \
      -d "$src" "$tmp" >"$tmp.log" 2>&1; then
  cat "$tmp.log" >&2
  rm -f "$tmp.log"
  die "mkfs.ext4 failed building $out from $src (size $size)"
fi
rm -f "$tmp.log"
mv -f "$tmp" "$out"
trap - EXIT
