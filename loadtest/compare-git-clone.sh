#!/usr/bin/env bash
# Client cost of a clone: gitplane-load's simulated clones versus real `git clone` processes,
# against the same gitplane server, as clones per second of *client* CPU (user + system,
# children included, from getrusage). Also prints the wall-clock rate of each. The server runs
# with one shard pinned to one CPU and the clients to another when there are two or more CPUs.
#
#   loadtest/compare-git-clone.sh
#
# Environment (optional):
#   LOAD_CLONES=400   simulated clones per repository    LOAD_CONCURRENCY=8
#   GIT_CLONES=40     real clones per repository (sequential)
#   FIXTURE_DIR=bench/fixture/cache/fixture.git  (the ~50 MB fixture; skipped when absent)
#   BUILD=1           cargo build --release -p gitplane -p gitplane-load first
#
# Everything listens on 127.0.0.1, runs from a temp dir, and is stopped (by pid) and removed
# (bench/lib/common.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_TAG=compare-git-clone
BENCH_CGROUP=0
# shellcheck source=bench/lib/common.sh
source "$ROOT/bench/lib/common.sh"
LOAD_CLONES=${LOAD_CLONES:-400}
LOAD_CONCURRENCY=${LOAD_CONCURRENCY:-8}
GIT_CLONES=${GIT_CLONES:-40}
GP=$ROOT/target/release/gitplane
LOAD=$ROOT/target/release/gitplane-load
if [[ ${BUILD:-1} == 1 ]]; then
    (cd "$ROOT" && cargo build --release -q -p gitplane -p gitplane-load)
fi
bench_init gitplane-compare-git-clone

pin_server_cpu
start_gitplane "$GP" 1 || die "${NOTE[gitplane]}"
addr=$GITPLANE_HTTP
pw=$(cat "$GITPLANE_DATA/initial-admin-password")

# Repositories: a small one (what CI fetches most) and the ~50 MB fixture.
make_small_repo "$GP" admin/small
declare -A URL_PATH=([small]=admin/small.git)
repos=(small)
if [[ -d $FIXTURE_DIR ]]; then
    prepare_fixture "$FIXTURE_DIR"
    gitplane_fixture "$GP" || die "${NOTE[gitplane]}"
    URL_PATH[fixture]=$REPO_PATH
    repos+=(fixture)
fi

printf '| repo | pack | client | clones | client CPU s | clones per client CPU-s | wall s | clones/s (wall) |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for repo in "${repos[@]}"; do
    url="http://admin:$pw@$addr/${URL_PATH[$repo]}"
    "$LOAD" clone --url "$url" -n 2 -q --verify --verify-samples 1 --json "$TMP/warm.json" >/dev/null
    pack=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['bytes']/r['ok']/1e6:.2f} MB\")" "$TMP/warm.json")
    n=$LOAD_CLONES; [[ $repo == fixture ]] && n=$(( LOAD_CLONES / 10 ))
    read -r cpu wall < <(client_cpu taskset -c "$CLIENT_CPU" "$LOAD" clone --url "$url" -n "$n" \
        -c "$LOAD_CONCURRENCY" -t 1 -q --json "$TMP/load-$repo.json")
    errors=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['errors_total'])" "$TMP/load-$repo.json")
    [[ $errors == 0 ]] || die "gitplane-load had $errors errors"
    awk -v r="$repo" -v p="$pack" -v k="$LOAD_CONCURRENCY" -v n="$n" -v c="$cpu" -v w="$wall" 'BEGIN {
        printf "| %s | %s | gitplane-load (1 thread, -c %s) | %d | %.2f | %.1f | %.2f | %.1f |\n", r, p, k, n, c, n / c, w, n / w }'
    load_rate=$(awk -v n="$n" -v c="$cpu" 'BEGIN { print n / c }')
    g=$GIT_CLONES; [[ $repo == fixture ]] && g=$(( GIT_CLONES / 10 > 2 ? GIT_CLONES / 10 : 2 ))
    for mode in checkout bare; do
        flag=; [[ $mode == bare ]] && flag=--bare
        read -r cpu wall < <(client_cpu taskset -c "$CLIENT_CPU" bash -c '
            for i in $(seq "$1"); do git clone -q '"$flag"' "$2" "$3/c$i"; done' _ "$g" "$url" "$TMP/clones-$repo-$mode")
        rm -rf "$TMP/clones-$repo-$mode"
        awk -v r="$repo" -v p="$pack" -v m="$mode" -v n="$g" -v c="$cpu" -v w="$wall" -v l="$load_rate" 'BEGIN {
            printf "| %s | %s | git clone (%s, sequential) | %d | %.2f | %.1f (gitplane-load: %.1fx) | %.2f | %.1f |\n", r, p, m, n, c, n / c, l / (n / c), w, n / w }'
    done
done
