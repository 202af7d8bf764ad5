#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time and fails on any crash.
#
#   FUZZ_SECONDS=60 scripts/fuzz.sh            # all targets, 60 s each (default 20)
#   scripts/fuzz.sh chunked pktline            # only these targets
#   scripts/fuzz.sh --build-only               # build every target, run none
#
# Seeds are read from fuzz/corpus/<target> and never written to; what the fuzzer finds goes to
# fuzz/target/corpus/<target>, so later runs start from there. Crashes land in
# fuzz/artifacts/<target>/ and can be replayed with `fuzz/target/<host>/release/<target> <file>`.
set -euo pipefail

seconds="${FUZZ_SECONDS:-20}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"

# The targets are built the way `cargo fuzz build` builds them (libFuzzer's coverage
# instrumentation, AddressSanitizer, debug assertions, `--cfg fuzzing`), but by cargo itself: a
# fresh machine then needs no `cargo install cargo-fuzz` (minutes of a CI run's 2 cores). The
# flags are nightly-only; only a stable toolchain is installed, and RUSTC_BOOTSTRAP lets it accept
# them. `--target` keeps the flags off build scripts and proc macros, as cargo-fuzz does.
export RUSTC_BOOTSTRAP=1
triple="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="$fuzz_dir/target"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions \
-Coverflow-checks -Zsanitizer=address"

build_only=0
if [ "${1:-}" = "--build-only" ]; then
    build_only=1
    shift
fi

cd "$fuzz_dir"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^gitplane-fuzz$')
fi

# One build for all targets, so the runs below do not rebuild.
cargo build --release --target "$triple" --bins
bin_dir="$CARGO_TARGET_DIR/$triple/release"
[ "$build_only" -eq 1 ] && exit 0

passed=0
failed=0
failures=()
log_dir="$fuzz_dir/target/fuzz-logs"
mkdir -p "$log_dir"
for target in "${targets[@]}"; do
    work="$fuzz_dir/target/corpus/$target"
    mkdir -p "$work" "$fuzz_dir/corpus/$target" "$fuzz_dir/artifacts/$target"
    args=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1
        -artifact_prefix="$fuzz_dir/artifacts/$target/")
    case "$target" in
        http_head | chunked) args+=(-dict="$fuzz_dir/dict/http.dict") ;;
    esac
    log="$log_dir/$target.log"
    echo "fuzz: $target for ${seconds}s"
    if "$bin_dir/$target" "${args[@]}" "$work" "$fuzz_dir/corpus/$target" >"$log" 2>&1; then
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
