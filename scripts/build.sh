#!/usr/bin/env bash
# Builds Keel in build/ (or build-asan/ with --sanitize).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case "${1:-}" in
  -h|--help)
    echo "Usage: scripts/build.sh [--sanitize]"
    echo "Configures and builds Keel with CMake and Ninja in build/ (RelWithDebInfo),"
    echo "or in build-asan/ with AddressSanitizer and UndefinedBehaviorSanitizer."
    exit 0 ;;
  --sanitize) keel_build "$KEEL_ROOT/build-asan" -DKEEL_SANITIZE=ON -DKEEL_SYSTEM_TESTS=OFF \
                -DCMAKE_BUILD_TYPE=Debug ;;
  "") keel_build "$KEEL_ROOT/build" ;;
  *) echo "build.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac
