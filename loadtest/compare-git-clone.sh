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
# Everything listens on 127.0.0.1, runs from a temp dir, and is stopped (by pid) and removed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOAD_CLONES=${LOAD_CLONES:-400}
LOAD_CONCURRENCY=${LOAD_CONCURRENCY:-8}
GIT_CLONES=${GIT_CLONES:-40}
FIXTURE_DIR=${FIXTURE_DIR:-$ROOT/bench/fixture/cache/fixture.git}
GP=$ROOT/target/release/gitplane
LOAD=$ROOT/target/release/gitplane-load
if [[ ${BUILD:-1} == 1 ]]; then
    (cd "$ROOT" && cargo build --release -q -p gitplane -p gitplane-load)
fi
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null GIT_TERMINAL_PROMPT=0

ncpu=$(nproc)
if (( ncpu >= 2 )); then SERVER_CPU=1; CLIENT_CPU=0; else SERVER_CPU=0; CLIENT_CPU=0; fi

tmp=$(mktemp -d)
server_pid=
cleanup() {
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

data=$tmp/data
taskset -c "$SERVER_CPU" "$GP" --data-dir "$data" serve --http-listen 127.0.0.1:0 --shards 1 \
    >"$tmp/server.out" 2>"$tmp/server.log" &
server_pid=$!
for _ in $(seq 300); do grep -q '^gitplane: ready' "$tmp/server.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^gitplane: http listening on //p' "$tmp/server.out")
[[ -n $addr ]] || { cat "$tmp/server.log"; echo "server did not start" >&2; exit 1; }
pw=$(cat "$data/initial-admin-password")

# Repositories: a small one (what CI fetches most) and the ~50 MB fixture.
"$GP" --data-dir "$data" repo create admin/small >/dev/null
w=$tmp/work; mkdir -p "$w"
git -C "$w" init -q -b main
for i in $(seq 20); do
    seq "$i" 2000 | sed "s/^/line $i /" >"$w/file$i.txt"
    git -C "$w" add . && git -C "$w" -c user.name=b -c user.email=b@x commit -q -m "c$i"
done
git -C "$w" push -q "$data/repos/admin/small.git" main
repos=(small)
if [[ -d $FIXTURE_DIR ]]; then
    "$GP" --data-dir "$data" repo create admin/fixture >/dev/null
    git -C "$FIXTURE_DIR" push -q --mirror "$data/repos/admin/fixture.git"
    repos+=(fixture)
fi

# measure CMD...: runs CMD, prints "CPU WALL" of it and every process it waited for.
measure() {
    python3 - "$@" <<'PY'
import resource, subprocess, sys, time
t = time.monotonic()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{r.ru_utime + r.ru_stime:.3f} {time.monotonic() - t:.3f}")
PY
}

printf '| repo | pack | client | clones | client CPU s | clones per client CPU-s | wall s | clones/s (wall) |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for repo in "${repos[@]}"; do
    url="http://admin:$pw@$addr/admin/$repo.git"
    "$LOAD" clone --url "$url" -n 2 -q --verify --verify-samples 1 --json "$tmp/warm.json" >/dev/null
    pack=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['bytes']/r['ok']/1e6:.2f} MB\")" "$tmp/warm.json")
    n=$LOAD_CLONES; [[ $repo == fixture ]] && n=$(( LOAD_CLONES / 10 ))
    read -r cpu wall < <(measure taskset -c "$CLIENT_CPU" "$LOAD" clone --url "$url" -n "$n" \
        -c "$LOAD_CONCURRENCY" -t 1 -q --json "$tmp/load-$repo.json")
    errors=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['errors_total'])" "$tmp/load-$repo.json")
    [[ $errors == 0 ]] || { echo "gitplane-load had $errors errors" >&2; exit 1; }
    awk -v r="$repo" -v p="$pack" -v k="$LOAD_CONCURRENCY" -v n="$n" -v c="$cpu" -v w="$wall" 'BEGIN {
        printf "| %s | %s | gitplane-load (1 thread, -c %s) | %d | %.2f | %.1f | %.2f | %.1f |\n", r, p, k, n, c, n / c, w, n / w }'
    load_rate=$(awk -v n="$n" -v c="$cpu" 'BEGIN { print n / c }')
    g=$GIT_CLONES; [[ $repo == fixture ]] && g=$(( GIT_CLONES / 10 > 2 ? GIT_CLONES / 10 : 2 ))
    for mode in checkout bare; do
        flag=; [[ $mode == bare ]] && flag=--bare
        read -r cpu wall < <(measure taskset -c "$CLIENT_CPU" bash -c '
            for i in $(seq "$1"); do git clone -q '"$flag"' "$2" "$3/c$i"; done' _ "$g" "$url" "$tmp/clones-$repo-$mode")
        rm -rf "$tmp/clones-$repo-$mode"
        awk -v r="$repo" -v p="$pack" -v m="$mode" -v n="$g" -v c="$cpu" -v w="$wall" -v l="$load_rate" 'BEGIN {
            printf "| %s | %s | git clone (%s, sequential) | %d | %.2f | %.1f (gitplane-load: %.1fx) | %.2f | %.1f |\n", r, p, m, n, c, n / c, l / (n / c), w, n / w }'
    done
done
