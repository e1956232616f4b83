#!/usr/bin/env bash
# Installs every Debian package Keel's build, tests and demo need.
# Idempotent: when everything is already installed it does nothing (and does
# not touch the network); otherwise it runs apt-get update, then installs.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/setup.sh [--check]

Installs the Debian 12 packages that Keel needs to build, test and run its
demo (compiler, CMake, libraries, QEMU and the guest-kit tools). Safe to run
again: it installs only what is missing. Needs root (or sudo) to install.

  --check   only report missing packages; exit 1 if any are missing
USAGE
}

PACKAGES=(
  # Build
  build-essential g++ cmake ninja-build ccache pkg-config git
  # keel-vmm's link (its hot functions laid out together; src/vmm/CMakeLists.txt)
  lld
  # Libraries
  libspdlog-dev libfmt-dev nlohmann-json3-dev libcli11-dev liburing-dev libboost-dev
  zlib1g-dev libzstd-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  # Sanitizers and fuzzers (clang's libFuzzer runtime)
  clang libclang-rt-14-dev
  # ACPI table checks in tests
  acpica-tools
  # bench/blk.sh's comparison; bench/hot-functions.sh's profile
  fio valgrind
  # Guest kit and the nested system-test harness
  qemu-system-x86 qemu-utils busybox-static e2fsprogs e2fsck-static lz4 zstd python3 coreutils util-linux
)

check_only=0
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --check) check_only=1 ;;
  "") ;;
  *) echo "setup.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac

missing=()
for package in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$package")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup: all ${#PACKAGES[@]} packages are installed"
  exit 0
fi
echo "setup: missing packages: ${missing[*]}"
if [[ $check_only -eq 1 ]]; then exit 1; fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "setup: not root and no sudo; install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "setup: installed ${#missing[@]} packages"
