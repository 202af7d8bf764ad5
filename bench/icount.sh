#!/usr/bin/env bash
# Instruction counts of gitplane's wire-codec hot paths under valgrind's callgrind, compared with
# a committed baseline: a regression gate that a noisy shared machine cannot fool, because the
# count for a given binary, input and machine is exact and repeatable (the script checks that on
# every run).
#
#   bench/icount.sh                    # build, measure every case, compare with the baseline
#   bench/icount.sh --update           # measure and rewrite the baseline (after a reviewed change)
#   bench/icount.sh --tolerance 5      # allowed rise per case in percent (default 2, or $ICOUNT_TOLERANCE)
#   bench/icount.sh --self-test        # also prove the gate fails on a baseline 10% lower
#   bench/icount.sh CASE...            # only these cases (names from `gitplane-icount list`)
#   ICOUNT_BASELINE=FILE bench/icount.sh   # compare with another baseline file
#
# What is counted: instructions executed inside `gitplane_icount_measured` and everything it
# calls (callgrind --toggle-collect), i.e. ITERATIONS passes of one case after a warm-up pass.
# Process start-up, input construction and the warm-up are not counted; no subtraction is made.
# The table shows instructions per iteration = total / ITERATIONS.
#
# Counts depend on the machine as well as the code: the CPU features valgrind passes on decide
# which glibc (ifunc) and crate (SIMD) variants run, and glibc and rustc change code generation.
# The baseline records that fingerprint (rustc, CPU model and relevant flags, glibc, valgrind).
# On another machine the regression gate does not apply: the script still measures every case,
# checks that a repeated run gives the identical count, says so, and exits 0 only if it did.
#
# Exit status: 0 pass; 1 regression, non-deterministic count, failed self-test or a case that
# crashed; 2 usage; 3 valgrind missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

baseline="${ICOUNT_BASELINE:-$root/bench/icount.baseline}"
tolerance="${ICOUNT_TOLERANCE:-2}"
update=0
self_test=0
only=()
while [ $# -gt 0 ]; do
    case "$1" in
        --update) update=1 ;;
        --self-test) self_test=1 ;;
        --tolerance)
            [ $# -ge 2 ] || { echo "icount.sh: --tolerance needs a percentage" >&2; exit 2; }
            tolerance="$2"; shift ;;
        --tolerance=*) tolerance="${1#*=}" ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "icount.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) only+=("$1") ;;
    esac
    shift
done
if ! [[ "$tolerance" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "icount.sh: --tolerance must be a percentage such as 2 or 0.5, not \`$tolerance'" >&2
    exit 2
fi

if ! valgrind="$(command -v valgrind)"; then
    echo "icount.sh: valgrind is not installed; the instruction counts need it." >&2
    echo "icount.sh: install it with \`apt-get install valgrind' (scripts/test.sh does this itself)." >&2
    exit 3
fi

# --- build (release: the code users run) -----------------------------------------------------------
echo "icount.sh: cargo build --release -p gitplane-icount"
cargo build --release --quiet -p gitplane-icount
bin_dir="${CARGO_TARGET_DIR:-$root/target}/release"
[ -x "$bin_dir/gitplane-icount" ] || { echo "icount.sh: no $bin_dir/gitplane-icount after the build" >&2; exit 1; }

# --- machine fingerprint ---------------------------------------------------------------------------
cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
# The flags that decide which SIMD variants glibc and the crates pick (as valgrind reports them).
cpu_flags="$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -n1 | tr ' ' '\n' |
    grep -Ex 'sse4_2|avx|avx2|bmi1|bmi2|fma|f16c|abm|lzcnt|popcnt|rdrand|sha_ni|avx512f|avx512bw|erms|fsrm' |
    sort | tr '\n' ' ' | sed 's/ $//')"
glibc="$(getconf GNU_LIBC_VERSION 2>/dev/null || echo unknown)"
if command -v dpkg-query >/dev/null 2>&1; then
    glibc="$glibc ($(dpkg-query -W -f='${Version}' libc6 2>/dev/null || echo '?'))"
fi
fingerprint="fingerprint rustc: $(rustc -V)
fingerprint cpu: ${cpu_model:-unknown}
fingerprint cpu-flags: ${cpu_flags:-none}
fingerprint glibc: $glibc
fingerprint valgrind: $(valgrind --version)"

# --- measure -----------------------------------------------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

mapfile -t listing < <(cd "$bin_dir" && ./gitplane-icount list)
declare -A iterations_of=()
names=()
for line in "${listing[@]}"; do
    IFS=$'\t' read -r name iters _ <<<"$line"
    iterations_of["$name"]=$iters
    names+=("$name")
done
if [ "${#only[@]}" -gt 0 ]; then
    for n in "${only[@]}"; do
        [ -n "${iterations_of[$n]:-}" ] || { echo "icount.sh: unknown case \`$n'; cases: ${names[*]}" >&2; exit 2; }
    done
    names=("${only[@]}")
fi

# Runs one case under callgrind and prints its total instruction count. The environment and argv
# are fixed (env -i; `./gitplane-icount run NAME' from the binary's directory, whatever the
# checkout path): the program copies them to the heap before the measured region, and a different
# heap history changes glibc malloc's work inside it (a longer argv[0] alone moved
# lfs_batch/upload-100 by 1.3%).
count() {
    local name="$1" out="$tmp/callgrind.$RANDOM.out"
    if ! (cd "$bin_dir" && env -i PATH=/usr/bin:/bin "$valgrind" --tool=callgrind -q \
        --toggle-collect=gitplane_icount_measured --collect-atstart=no \
        --callgrind-out-file="$out" ./gitplane-icount run "$name") >"$tmp/stdout" 2>"$tmp/stderr"; then
        echo "icount.sh: case $name failed under valgrind:" >&2
        cat "$tmp/stderr" >&2
        return 1
    fi
    local total
    total="$(sed -n 's/^totals: \([0-9]*\).*/\1/p' "$out")"
    [ -n "$total" ] || total="$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$out")"
    if [ -z "$total" ] || [ "$total" -eq 0 ]; then
        echo "icount.sh: case $name: callgrind counted nothing (is gitplane_icount_measured still exported?)" >&2
        return 1
    fi
    echo "$total"
}

# Every case is measured twice: the gate rests on the same binary, input and machine giving the
# identical count, so that is checked on every run rather than assumed.
results="$tmp/results"
: >"$results"
deterministic=1
start=$SECONDS
for name in "${names[@]}"; do
    total="$(count "$name")" || exit 1
    again="$(count "$name")" || exit 1
    if [ "$total" != "$again" ]; then
        deterministic=0
        echo "icount.sh: determinism check FAILED: $name counted $total, then $again instructions" >&2
    fi
    echo "$name ${iterations_of[$name]} $total" >>"$results"
done
[ "$deterministic" = 1 ] && echo "icount.sh: determinism check: each case counted the same twice"
echo "icount.sh: measured ${#names[@]} cases twice each in $((SECONDS - start)) s"

# --- compare -----------------------------------------------------------------------------------------
# compare BASELINE [GATE]: prints the table; exits 1 naming each case whose per-iteration count
# rose by more than the tolerance, or that has no baseline entry. GATE=0 only prints.
compare() {
    awk -v tol="$tolerance" -v gate="${2:-1}" '
        FNR == NR { if ($1 == "case") { base_iter[$2] = $3; base_total[$2] = $4 } next }
        {
            name = $1; iter = $2; total = $3; per = total / iter
            if (!(name in base_iter)) {
                printf "| %s | %d | %.1f | none | | NO BASELINE |\n", name, iter, per
                missing = missing " " name; next
            }
            bper = base_total[name] / base_iter[name]
            change = (per - bper) / bper * 100
            verdict = "ok"
            if (!gate) verdict = "not gated (other machine)"
            else if (change > tol) { verdict = "REGRESSION"; bad = bad " " name }
            else if (change < -tol) verdict = "faster (consider --update)"
            printf "| %s | %d | %.1f | %.1f | %+.2f%% | %s |\n", name, iter, per, bper, change, verdict
        }
        END {
            if (bad != "") {
                printf "icount.sh: instruction count rose by more than %s%%:%s\n", tol, bad > "/dev/stderr"
                print "icount.sh: see where with callgrind_annotate (docs/BENCHMARKS.md, \"Instruction counts\"); if the rise is accepted, run bench/icount.sh --update and commit bench/icount.baseline" > "/dev/stderr"
            }
            if (missing != "") printf "icount.sh: no baseline for:%s (record one with bench/icount.sh --update)\n", missing > "/dev/stderr"
            exit (bad != "" || missing != "") ? 1 : 0
        }' "$1" "$results"
}

table_head() {
    echo "| case | iterations | instructions/iter | baseline/iter | change | verdict |"
    echo "|---|---:|---:|---:|---:|---|"
}

write_baseline() {
    {
        echo "# gitplane instruction counts: callgrind, --toggle-collect=gitplane_icount_measured."
        echo "# Written by \`bench/icount.sh --update'; checked by \`bench/icount.sh' (scripts/test.sh)."
        echo "# The counts hold for this fingerprint only (see bench/icount.sh)."
        echo "$fingerprint"
        echo "# case NAME ITERATIONS TOTAL_INSTRUCTIONS"
        awk '{ print "case", $1, $2, $3 }' "$results"
    } >"$1"
}

status=0
if [ "$self_test" = 1 ]; then
    # The gate must pass against the counts just measured and fail against counts 10% lower.
    write_baseline "$tmp/same"
    awk '$1 == "case" { $4 = int($4 * 0.9) } { print }' "$tmp/same" >"$tmp/lower"
    if compare "$tmp/same" >/dev/null 2>&1 && ! compare "$tmp/lower" >"$tmp/lower.out" 2>&1; then
        echo "icount.sh: self-test: the gate passes on equal counts and fails on a baseline 10% lower"
        echo "icount.sh: self-test: ($(grep -c REGRESSION "$tmp/lower.out") of ${#names[@]} cases flagged as regressions)"
    else
        echo "icount.sh: self-test FAILED: the gate did not tell equal counts from a 10% rise" >&2
        status=1
    fi
fi

if [ "$update" = 1 ]; then
    if [ "$deterministic" != 1 ]; then
        echo "icount.sh: not writing the baseline: the counts are not repeatable on this machine" >&2
        exit 1
    fi
    if [ "${#only[@]}" -gt 0 ]; then
        echo "icount.sh: --update records every case; run it without case names" >&2
        exit 2
    fi
    write_baseline "$baseline"
    echo "icount.sh: wrote ${baseline#"$root"/}"
    table_head
    awk '{ printf "| %s | %d | %.1f | (new) | | |\n", $1, $2, $3 / $2 }' "$results"
    exit "$status"
fi

if [ ! -f "$baseline" ]; then
    echo "icount.sh: no baseline at ${baseline#"$root"/}; record one with bench/icount.sh --update" >&2
    table_head
    awk '{ printf "| %s | %d | %.1f | | | |\n", $1, $2, $3 / $2 }' "$results"
    exit 1
fi

if [ "$fingerprint" = "$(grep '^fingerprint ' "$baseline")" ]; then
    table_head
    compare "$baseline" || status=1
    [ "$deterministic" = 1 ] || status=1
    [ "$status" = 0 ] && echo "icount.sh: no case rose by more than $tolerance% (baseline ${baseline#"$root"/})"
    exit "$status"
fi

echo "icount.sh: this machine differs from the one the baseline was recorded on:"
{ diff <(grep '^fingerprint ' "$baseline") <(echo "$fingerprint") || true; } |
    sed -n 's/^</  baseline:/p; s/^>/  here:    /p'
table_head
compare "$baseline" 0 2>/dev/null || true
echo "icount.sh: the regression gate applies only to the recorded machine; the figures above are"
echo "icount.sh: for information. To gate on this machine, record a baseline here with"
echo "icount.sh: \`bench/icount.sh --update' (and commit it if this is the machine CI runs on)."
if [ "$deterministic" = 1 ]; then
    echo "icount.sh: passed: counts are repeatable here (gate not applied)"
else
    status=1
fi
exit "$status"
