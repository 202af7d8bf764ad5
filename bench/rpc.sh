#!/usr/bin/env bash
# gRPC API throughput, measured: h2load (nghttp2-client) drives ListBranches and CommitLog with
# 64 concurrent streams on one HTTP/2 connection; beside it, the naive approach the API replaces:
# one `git for-each-ref` / `git log` process per request, 64 at a time, asking for the same data.
#
#   bench/rpc.sh                      # N=20000 RPCs and GIT_N=2000 git processes per method
#   N=5000 GIT_N=500 bench/rpc.sh     # shorter
#
# The server runs with one shard pinned to CPU 0 (its git2 workers share CPU 0 too); the load
# generators run on CPU 1. The git baseline's processes also run on CPU 0. Every RPC is checked
# afterwards in /metrics: the run fails unless all N calls of a method ended with grpc-status 0.
# Prints a Markdown table for docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
N=${N:-20000}
GIT_N=${GIT_N:-2000}
C=64

if ! command -v h2load >/dev/null 2>&1; then
    echo "rpc bench: installing nghttp2-client (h2load)" >&2
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nghttp2-client
fi
cargo build --release --quiet --bin gitplane

tmp=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

bin="$root/target/release/gitplane"
data="$tmp/data"
mkfifo "$tmp/ready"
taskset -c 0 "$bin" --data-dir "$data" serve --shards 1 \
    --http-listen 127.0.0.1:0 --ssh-listen 127.0.0.1:0 --rpc-listen 127.0.0.1:0 \
    >"$tmp/ready" 2>"$tmp/server.log" &
server_pid=$!
http_addr= rpc_addr=
while read -r line; do
    case "$line" in
        "gitplane: http listening on "*) http_addr=${line##* } ;;
        "gitplane: rpc listening on "*) rpc_addr=${line##* } ;;
        "gitplane: ready") break ;;
    esac
done <"$tmp/ready"
cat "$tmp/ready" >/dev/null &
"$bin" --data-dir "$data" repo create admin/fixture >/dev/null
bare="$data/repos/admin/fixture.git"
bash tests/rpc/make_fixture.sh "$bare" "$tmp/work" 0
token=$(cat "$data/rpc-token")

# Request bodies: a gRPC frame around each protobuf message (encoded by hand: two string fields).
python3 - "$tmp" <<'EOF'
import struct, sys
def s(field, v):
    b = v.encode()
    return bytes([field << 3 | 2, len(b)]) + b
def frame(m):
    return b"\0" + struct.pack(">I", len(m)) + m
out = sys.argv[1]
open(out + "/ListBranches.bin", "wb").write(frame(s(1, "admin/fixture")))
open(out + "/CommitLog.bin", "wb").write(frame(s(1, "admin/fixture") + s(2, "main")))
EOF

p99() { sort -n | awk '{a[NR]=$1} END {i=int(NR*0.99); if (i<1) i=1; printf "%.2f", a[i]/1000}'; }

metric() {
    curl -s "http://$http_addr/metrics" |
        awk -v want="gitplane_rpc_responses_total{method=\"gitplane.v1.RepositoryService/$1\",code=\"0\"}" \
            '$1 == want {print $2}'
}

rows=()
for method in ListBranches CommitLog; do
    before=$(metric "$method"); before=${before:-0}
    cmd=(taskset -c 1 h2load -n "$N" -c 1 -m "$C" -t 1 -d "$tmp/$method.bin"
        -H "content-type: application/grpc" -H "te: trailers" -H "authorization: Bearer $token"
        --log-file="$tmp/$method.log" "http://$rpc_addr/gitplane.v1.RepositoryService/$method")
    echo "rpc bench: ${cmd[*]/$token/TOKEN}" >&2
    "${cmd[@]}" >"$tmp/$method.out"
    rps=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' "$tmp/$method.out")
    lat=$(cut -f3 "$tmp/$method.log" | p99)
    after=$(metric "$method")
    ok=$((after - before))
    if [ "$ok" -ne "$N" ]; then
        echo "rpc bench: only $ok of $N $method calls ended with grpc-status 0" >&2
        cat "$tmp/$method.out" >&2
        exit 1
    fi
    case $method in
        ListBranches) git_cmd="git for-each-ref --format='%(refname:short) %(objectname) %(tree) %(parent) %(subject) %(authorname) %(authoremail) %(authordate:unix) %(committername) %(committeremail) %(committerdate:unix)' refs/heads/" ;;
        CommitLog) git_cmd="git log -n 50 --date-order --format='%H %T %P %an %ae %at %cn %ce %ct%n%B' main" ;;
    esac
    echo "rpc bench: $GIT_N x (taskset -c 0 $git_cmd), $C at a time" >&2
    read -r git_rps git_p99 < <(taskset -c 1 python3 - "$bare" "$GIT_N" "$C" "$git_cmd" <<'EOF'
import concurrent.futures, os, subprocess, sys, time
bare, n, c, cmd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
env = dict(os.environ, GIT_DIR=bare, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
def one(_):
    t = time.perf_counter()
    out = subprocess.run(["taskset", "-c", "0", "sh", "-c", "exec " + cmd], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert out.returncode == 0 and out.stdout, out.stderr
    return time.perf_counter() - t
start = time.perf_counter()
with concurrent.futures.ThreadPoolExecutor(c) as pool:
    lat = sorted(pool.map(one, range(n)))
took = time.perf_counter() - start
print("%.0f %.2f" % (n / took, lat[max(0, int(n * 0.99) - 1)] * 1000))
EOF
    )
    ratio=$(awk -v a="$rps" -v b="$git_rps" 'BEGIN {printf "%.1f", a / b}')
    rows+=("| $method | $rps | $lat | $git_rps | $git_p99 | ${ratio}x |")
done

echo
echo "| method | gRPC req/s | gRPC p99 ms | git process req/s | git process p99 ms | speed-up |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
