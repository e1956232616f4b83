#!/usr/bin/env bash
# Sets up, builds and runs every Keel test: unit and tiny-guest tests, the
# nested real-Linux system tests, then the unit and tiny-guest tests again
# under AddressSanitizer + UndefinedBehaviorSanitizer.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/test.sh [--no-system] [--no-sanitize] [--no-fuzz]

Runs all of Keel's tests on a Debian 12 machine, installing what is missing:
  1. scripts/setup.sh (Debian packages)
  2. build/ : unit tests, tiny guests on /dev/kvm, system tests that boot a
     real Linux guest inside a nested L1 (QEMU TCG + kvm-amd)
  3. build-asan/ : unit and tiny-guest tests under ASan + UBSan
  4. build-fuzz/ : every libFuzzer target for a bounded time (KEEL_FUZZ_SECONDS,
     default 30), corpora kept in ~/.cache/keel/fuzz
Logs of the system tests are in build/system/. The last line sums up
"N passed, N failed, N skipped" across all runs.

  --no-system     skip the nested system tests (they take a few minutes)
  --no-sanitize   skip the sanitizer build
  --no-fuzz       skip the fuzzers
USAGE
}

run_system=1
run_sanitize=1
run_fuzz=1
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --no-system) run_system=0 ;;
    --no-sanitize) run_sanitize=0 ;;
    --no-fuzz) run_fuzz=0 ;;
    *) echo "test.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

"$KEEL_ROOT/scripts/setup.sh"
cd "$KEEL_ROOT"
results_dir="$KEEL_ROOT/build/test-results"
mkdir -p "$results_dir"
rm -f "$results_dir"/*.xml
status=0

keel_build "$KEEL_ROOT/build"
label_regex='unit|guest'
[[ $run_system -eq 1 ]] && label_regex='unit|guest|system'
echo "== ctest (build/): labels $label_regex"
ctest --test-dir build -L "$label_regex" --output-on-failure --no-tests=error \
  --output-junit "$results_dir/main.xml" || status=1

if [[ $run_sanitize -eq 1 ]]; then
  keel_build "$KEEL_ROOT/build-asan" -DKEEL_SANITIZE=ON -DKEEL_SYSTEM_TESTS=OFF \
    -DCMAKE_BUILD_TYPE=Debug
  echo "== ctest (build-asan/, ASan+UBSan): labels unit|guest"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan -L 'unit|guest' --output-on-failure --no-tests=error \
    --output-junit "$results_dir/asan.xml" || status=1
fi

if [[ $run_fuzz -eq 1 ]]; then
  fuzz_seconds=${KEEL_FUZZ_SECONDS:-30}
  echo "== fuzzers (build-fuzz/, clang + libFuzzer): ${fuzz_seconds}s each"
  fuzz_status=0
  "$KEEL_ROOT/scripts/fuzz.sh" "$fuzz_seconds" || fuzz_status=1
  [[ $fuzz_status -eq 0 ]] || status=1
  # Reported like a test, so the closing line counts it.
  if [[ $fuzz_status -eq 0 ]]; then
    echo '<testsuite><testcase name="fuzzers" status="run"/></testsuite>' > "$results_dir/fuzz.xml"
  else
    echo '<testsuite><testcase name="fuzzers" status="fail"><failure/></testcase></testsuite>' \
      > "$results_dir/fuzz.xml"
  fi
fi

# One closing line over every run, counted from ctest's JUnit reports.
python3 - "$results_dir" "$KEEL_ROOT/build/tests/system/out" <<'PY'
import json, os, sys, glob, xml.etree.ElementTree as ET
passed = failed = skipped = 0
failures, skips = [], []
for path in sorted(glob.glob(sys.argv[1] + "/*.xml")):
    run = path.rsplit("/", 1)[-1].removesuffix(".xml")
    for case in ET.parse(path).getroot().iter("testcase"):
        status = case.get("status", "")
        name = f"{run}: {case.get('name', '?')}"
        if case.find("skipped") is not None or status in ("notrun", "disabled") or status == "skipped":
            skipped += 1
            skips.append(name)
        elif case.find("failure") is not None or case.find("error") is not None or status == "fail":
            failed += 1
            failures.append(name)
        else:
            passed += 1
# Named here, next to the closing line, because CI keeps only the tail of
# the output and a long run's failure is otherwise far above it.
for name in skips:
    print(f"skipped: {name}")
for name in failures:
    print(f"FAILED: {name}")
    # A failed system test: the harness's verdict and the scenario's last
    # words (before the guest consoles it appends) say why.
    scenario = name.split(": system.", 1)[1] if ": system." in name else ""
    out = sys.argv[2]
    try:
        results = json.load(open(f"{out}/results.json"))
    except (OSError, ValueError):
        results = {}
    for attempt in results.get("attempts", []):
        if attempt.get("outcome") != "ok":
            print(f"  L1 attempt {attempt.get('attempt')}: {attempt.get('outcome')} {attempt.get('reason', '')}")
    verdict = results.get("scenarios", {}).get(scenario)
    if verdict:
        print(f"  {scenario}: {verdict.get('status')}: {verdict.get('reason', '')}")
    if scenario and os.path.exists(f"{out}/{scenario}.log"):
        with open(f"{out}/{scenario}.log", errors="replace") as f:
            text = f.read()
        lines = text.split("\n----- ", 1)[0].splitlines()
        for line in lines[-15:]:
            print(f"  {scenario}| {line}")
        # The guests' dumps follow: each console's and each VMM stderr's
        # last lines (a VMM that exited says why there).
        for section in text.split("\n----- ")[1:]:
            head, _, body = section.partition("\n")
            if head.startswith("end of "):
                continue
            body = body.split("\n----- end of ", 1)[0].splitlines()
            print(f"  ----- {head.split(': ', 1)[0].rstrip(' -')} (last {min(len(body), 12)} lines)")
            for line in body[-12:]:
                print(f"  {line}")
print(f"keel-tests: {passed} passed, {failed} failed, {skipped} skipped")
PY
exit $status
