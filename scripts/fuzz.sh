#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/) with clang in build-fuzz/ and
# runs each for a bounded time. Corpora and crash artifacts live outside the
# clone, under $KEEL_CACHE_DIR/fuzz/<fuzzer>/, so they grow across runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/fuzz.sh [SECONDS] [FUZZER...]

Configures build-fuzz/ with CC=clang CXX=clang++ (ASan + UBSan, libFuzzer
coverage on every Keel library), builds the fuzzers and runs each for
SECONDS (default 60). Without FUZZER names, runs them all.
  corpus:    $KEEL_CACHE_DIR/fuzz/<fuzzer>/corpus
  crashes:   $KEEL_CACHE_DIR/fuzz/<fuzzer>/artifacts
Exits non-zero if any fuzzer found a crash.
USAGE
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac
seconds=${1:-60}
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || (( seconds == 0 )); then
  echo "fuzz.sh: SECONDS must be a positive integer, got '$seconds'" >&2
  exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))
all_fuzzers=(virtqueue_fuzz virtio_pci_fuzz qcow2_header_fuzz snapshot_reader_fuzz
             migration_stream_fuzz)
if (( $# > 0 )); then fuzzers=("$@"); else fuzzers=("${all_fuzzers[@]}"); fi

build="$KEEL_ROOT/build-fuzz"
if [[ ! -f "$build/build.ninja" ]]; then
  CC=clang CXX=clang++ cmake -S "$KEEL_ROOT" -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKEEL_SANITIZE=ON -DKEEL_SYSTEM_TESTS=OFF \
    -DCMAKE_C_FLAGS=-fsanitize=fuzzer-no-link -DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link
fi
if ! grep -q '^CMAKE_CXX_COMPILER:.*clang' "$build/CMakeCache.txt"; then
  echo "fuzz.sh: $build is not configured with clang; remove it and rerun" >&2
  exit 2
fi
if ! cmake --build "$build" --target "${fuzzers[@]}"; then
  echo "fuzz.sh: build failed (is add_subdirectory(tests/fuzz) in CMakeLists.txt?)" >&2
  exit 1
fi

failed=0
for fuzzer in "${fuzzers[@]}"; do
  dir="$KEEL_CACHE_DIR/fuzz/$fuzzer"
  mkdir -p "$dir/corpus" "$dir/artifacts"
  log="$build/$fuzzer.log"
  echo "== $fuzzer: ${seconds}s, corpus $dir/corpus, log $log"
  # libFuzzer prints a line per new input; keep that in the log and show
  # the final statistics, or the crash report, here.
  if "$build/tests/fuzz/$fuzzer" -max_total_time="$seconds" -print_final_stats=1 \
      -artifact_prefix="$dir/artifacts/" "$dir/corpus" > "$log" 2>&1; then
    grep -E '^(Done |stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb)' "$log" |
      sed "s/^/   /"
  else
    tail -n 60 "$log" >&2
    echo "== $fuzzer: FOUND A CRASH; reproducer in $dir/artifacts/ (whole output: $log)" >&2
    failed=1
  fi
done
exit "$failed"
