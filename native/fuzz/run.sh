#!/usr/bin/env bash
# Runs the engine's fuzz harnesses (built by `make fuzz` into build/fuzz/) for a bounded time:
#   native/fuzz/run.sh SECONDS HARNESS...
# For each harness: first the reproducers of known findings (native/fuzz/crashes/HARNESS-*),
# then libFuzzer for SECONDS on a temporary copy of native/fuzz/corpus/HARNESS (the checked-in
# seeds stay as they are). Any crash, sanitizer report, leak, timeout or hang fails the run;
# the failing input is kept in build/fuzz/artifacts/. Environment: FUZZ_MAX_LEN (65536),
# FUZZ_TIMEOUT (25 s per input), FUZZ_HANG_SECONDS (10: the harness's own hang limit),
# FUZZ_ARGS (more libFuzzer options).
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
seconds=${1:?usage: run.sh SECONDS HARNESS...}
shift
bin=$root/build/fuzz
arts=$bin/artifacts
mkdir -p "$arts"
work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
export FUZZ_HANG_SECONDS=${FUZZ_HANG_SECONDS:-10}
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
for h in "$@"; do
    exe=$bin/fuzz_$h
    log=$work/$h.log
    repros=("$root"/native/fuzz/crashes/"$h"-*)
    if [ -e "${repros[0]}" ]; then
        echo "fuzz $h: ${#repros[@]} known reproducer(s) from native/fuzz/crashes/"
        if ! "$exe" -timeout="${FUZZ_TIMEOUT:-25}" "${repros[@]}" >"$log" 2>&1; then
            grep -E "tandem fuzz harness|ERROR|SUMMARY|Running:" "$log" | tail -n 20
            echo "fuzz $h: FAILED on a known reproducer (fixed yet? see native/fuzz/README.md)"
            status=1
            continue
        fi
    fi
    mkdir -p "$work/corpus-$h"
    cp "$root"/native/fuzz/corpus/"$h"/* "$work/corpus-$h/"
    dict=()
    [ -f "$root/native/fuzz/$h.dict" ] && dict=(-dict="$root/native/fuzz/$h.dict")
    echo "fuzz $h: ${seconds}s"
    # shellcheck disable=SC2086
    "$exe" -max_total_time="$seconds" -max_len="${FUZZ_MAX_LEN:-65536}" \
        -timeout="${FUZZ_TIMEOUT:-25}" -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="$arts/$h-" "${dict[@]}" ${FUZZ_ARGS:-} "$work/corpus-$h" >"$log" 2>&1
    rc=$?
    done_line=$(grep -E "^#[0-9]+[[:space:]]+DONE" "$log" | tail -n 1)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    if [ $rc -ne 0 ] || grep -qE "ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|tandem fuzz harness" "$log"; then
        tail -n 60 "$log"
        echo "fuzz $h: FAILED (exit $rc); the input is in $arts/"
        status=1
    else
        echo "fuzz $h: ok, ${execs:-?} inputs, ${speed:-?} exec/s; ${done_line:-}"
    fi
done
exit $status
