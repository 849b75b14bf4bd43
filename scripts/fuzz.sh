#!/usr/bin/env bash
# Fuzzes the wire layer with libFuzzer (README: Security):
#
#   scripts/fuzz.sh [RUNS]   builds Fuzz/ with -sanitize=fuzzer,address (scratch path .build-fuzz) and
#                            runs RUNS inputs (default 200000) from a copy of Fuzz/Corpus/; exits
#                            non-zero on a crash, naming the input that caused it
#   scripts/fuzz.sh seed     rewrites Fuzz/Corpus/ from WireFuzzing.seedCorpus()
#
# FUZZ_JOBS=N splits the RUNS over N processes run at once (CI uses both cores); FUZZ_OPTIONS adds
# libFuzzer options, e.g. FUZZ_OPTIONS="-fork=2 -ignore_crashes=1" for a long run on both cores that
# goes on past a crash.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ "${1:-}" = "seed" ]; then
    cd "$root"
    TESSERA_WRITE_FUZZ_CORPUS=1 swift test --filter WireFuzzingTests
    echo "wrote $(ls "$root/Fuzz/Corpus" | wc -l) seeds to Fuzz/Corpus"
    exit 0
fi

runs="${1:-200000}"
scratch="$root/.build-fuzz"
swift build -c release -Xswiftc -sanitize=fuzzer,address \
    --package-path "$root/Fuzz" --scratch-path "$scratch" --product tessera-fuzz
binary="$scratch/release/tessera-fuzz"

# New inputs go to a copy, so the committed corpus stays as `seed` wrote it; crash inputs go where
# they outlive the run.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/corpus" "$scratch/crashes"
cp "$root/Fuzz/Corpus/"* "$work/corpus/"
marker="$work/started"
touch "$marker"

# Swift's backtracer would take the crash signals (libFuzzer leaves a signal alone that already has
# a handler), and then libFuzzer saves no crash input.
export SWIFT_BACKTRACE=enable=no
status=0
jobs="${FUZZ_JOBS:-1}"
# -max_len is WireFuzzing.maxInputBytes.
options=(-max_len=1048576 -timeout=30 -print_final_stats=1 -artifact_prefix="$scratch/crashes/")
if [ "$jobs" -gt 1 ]; then
    # Each job writes its log to fuzz-<job>.log in the working directory; they share the corpus.
    # shellcheck disable=SC2086 # FUZZ_OPTIONS is a list of options
    (cd "$work" && "$binary" -jobs="$jobs" -workers="$jobs" -runs=$(((runs + jobs - 1) / jobs)) "${options[@]}" \
        ${FUZZ_OPTIONS:-} "$work/corpus") 2>&1 | tee "$work/log" || status=$?
    executed="$(cat "$work"/fuzz-*.log | sed -n 's/^stat::number_of_executed_units: *//p' | awk '{ s += $1 } END { print s }')"
else
    # shellcheck disable=SC2086 # FUZZ_OPTIONS is a list of options
    "$binary" -runs="$runs" "${options[@]}" ${FUZZ_OPTIONS:-} "$work/corpus" 2>&1 | tee "$work/log" || status=$?
    # A single process prints its count in the final stats; -fork prints the total as it wraps up.
    executed="$(sed -n -e 's/^stat::number_of_executed_units: *//p' \
        -e 's/^INFO: fuzzed for \([0-9]*\) iterations.*/\1/p' "$work/log" | tail -1)"
fi
found="$(find "$scratch/crashes" -type f -newer "$marker")"
echo "--- fuzzing: $executed inputs executed, exit status $status"
if [ "$status" -ne 0 ] || [ -n "$found" ]; then
    for input in $found; do
        # The input in base64 too: CI's clone is gone after the run, its log is not.
        echo "crash input: $input ($(wc -c < "$input") bytes): $(head -c 4096 "$input" | base64 -w0)"
    done
    echo "reproduce: $binary <input>" >&2
    exit 1
fi
