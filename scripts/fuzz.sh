#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo fuzz, libFuzzer) for SECONDS each, one after
# another, and prints the executions of each (full logs: fuzz/target/logs/<target>.log). Fails if any target crashes, panics on an
# invariant, leaks, or hangs; the reproducer is left in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS]          (default 60; `make fuzz FUZZ_SECONDS=...`)
#   scripts/fuzz.sh --build-only       build every target and stop (`make fuzz-build`, CI)
#   FUZZ_TARGETS="token ticket" scripts/fuzz.sh 30      only some targets
#
# Seeds (committed) are read from fuzz/seeds/<target>/; new interesting inputs go to
# fuzz/corpus/<target>/ (git-ignored), so later runs start from where earlier ones got.
# The toolchain is stable: cargo-fuzz's nightly-only flags are enabled with
# RUSTC_BOOTSTRAP=1. Targets are built with debug assertions (overflow checks on).
set -euo pipefail

BUILD_ONLY=0
if [[ "${1:-}" == "--build-only" ]]; then BUILD_ONLY=1; shift; fi
SECS="${1:-60}"
[[ "$SECS" =~ ^[0-9]+$ ]] || { echo "usage: $0 [--build-only] [SECONDS]" >&2; exit 2; }
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz not found; installing it (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

ALL_TARGETS=$(cd fuzz && cargo fuzz list)
TARGETS="${FUZZ_TARGETS:-$ALL_TARGETS}"

dict_for() {
  case "$1" in
    token|token_signed|ticket) echo "$PWD/fuzz/dicts/token.dict" ;;
    config|config_json) echo "$PWD/fuzz/dicts/config.dict" ;;
    admin|admin_json) echo "$PWD/fuzz/dicts/admin.dict" ;;
    *) echo "" ;;
  esac
}

echo "building fuzz targets (debug assertions on)..."
(cd fuzz && cargo fuzz build --debug-assertions)
if [[ $BUILD_ONLY -eq 1 ]]; then
  echo "built: $(echo $ALL_TARGETS | wc -w) fuzz targets ($(echo $ALL_TARGETS))"
  exit 0
fi

start_all=$(date +%s)
declare -a summary
failed=0
for t in $TARGETS; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  seeds=()
  [[ -d "fuzz/seeds/$t" ]] && seeds=("fuzz/seeds/$t")
  dict=$(dict_for "$t")
  args=(-max_total_time="$SECS" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  [[ -n "$dict" ]] && args+=(-dict="$dict")
  mkdir -p fuzz/target/logs
  log="fuzz/target/logs/$t.log"
  echo "== $t (${SECS}s)"
  t0=$(date +%s)
  status=0
  (cd fuzz && cargo fuzz run --debug-assertions "$t" "corpus/$t" "${seeds[@]/#fuzz\//}" -- "${args[@]}") >"$log" 2>&1 || status=$?
  t1=$(date +%s)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  [[ -n "$execs" ]] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || true)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  if [[ $status -eq 0 ]]; then
    verdict=ok
  else
    verdict="FAILED (exit $status)"
    failed=1
    echo "   $t failed; see $log"
    grep -E "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written|artifact_prefix" "$log" | head -8 | sed 's/^/   /'
  fi
  line=$(printf "%-14s %12s execs %6ss  cov %6s  corpus %5s  %s" "$t" "${execs:-?}" "$((t1 - t0))" "${cov:-?}" "$corpus" "$verdict")
  echo "   $line"
  summary+=("$line")
done
end_all=$(date +%s)

echo
echo "fuzz summary (${SECS}s per target, total $((end_all - start_all))s wall clock including runs):"
printf '  %s\n' "${summary[@]}"
if [[ $failed -ne 0 ]]; then
  echo "at least one target failed: reproduce with"
  echo "  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz <target> fuzz/artifacts/<target>/<crash-file>"
  exit 1
fi
