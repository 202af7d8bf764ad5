#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time and fails on any crash.
#
#   FUZZ_SECONDS=60 scripts/fuzz.sh            # all targets, 60 s each (default 20)
#   scripts/fuzz.sh chunked pktline            # only these targets
#
# Seeds are read from fuzz/corpus/<target> and never written to; what the fuzzer finds goes to
# fuzz/target/corpus/<target>, so later runs start from there. Crashes land in
# fuzz/artifacts/<target>/ and can be replayed with `cargo fuzz run <target> <file>`.
set -euo pipefail

seconds="${FUZZ_SECONDS:-20}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"

# cargo-fuzz passes nightly-only flags (-Zsanitizer=...) to rustc; only a stable toolchain is
# installed, and this lets it accept them.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd "$fuzz_dir"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# One build for all targets, so the runs below do not rebuild.
cargo fuzz build

passed=0
failed=0
failures=()
log_dir="$fuzz_dir/target/fuzz-logs"
mkdir -p "$log_dir"
for target in "${targets[@]}"; do
    work="$fuzz_dir/target/corpus/$target"
    mkdir -p "$work" "$fuzz_dir/corpus/$target"
    args=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
    case "$target" in
        http_head | chunked) args+=(-dict="$fuzz_dir/dict/http.dict") ;;
    esac
    log="$log_dir/$target.log"
    echo "fuzz: $target for ${seconds}s"
    if cargo fuzz run "$target" "$work" "$fuzz_dir/corpus/$target" -- "${args[@]}" >"$log" 2>&1; then
        passed=$((passed + 1))
        summary="$(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1 || true)"
        cov="$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9A-Za-z]+' || true)"
        echo "fuzz: $target ok: ${summary:-finished} ${cov:+($cov)}"
    else
        failed=$((failed + 1))
        failures+=("$target")
        echo "fuzz: $target FAILED, last lines of $log:"
        tail -n 40 "$log"
    fi
done

echo "fuzz: $passed passed, $failed failed"
if [ "$failed" -gt 0 ]; then
    echo "fuzz: failing targets: ${failures[*]}; crash inputs are under $fuzz_dir/artifacts/" >&2
    exit 1
fi
