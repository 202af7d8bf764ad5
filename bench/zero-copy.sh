#!/usr/bin/env bash
# Proves where a clone's pack bytes go inside the gitplane process.
#
#   bench/zero-copy.sh [SIZE_MB]      (default 50)
#
# Starts target/release/gitplane on loopback with a temporary data dir and a repository holding
# SIZE_MB of incompressible data, clones it once with the real git client while
#   1. strace follows every gitplane thread (not the git children) and sums the bytes each
#      data syscall moved (splice vs write/send/read/recv), and
#   2. ../shared/tools/uring-bytes (when present; needs root and tracefs) sums the bytes each
#      io_uring opcode moved, since strace cannot see io_uring work,
# and prints both tables. A zero-copy server shows the pack under splice and only framing and
# headers under write/send.
set -euo pipefail
size_mb="${1:-50}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release/gitplane"
command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace; }
[ -x "$bin" ] || (cd "$root" && cargo build --release --bin gitplane)

tmp="$(mktemp -d)"
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
"$bin" --data-dir "$tmp/d" serve --http-listen 127.0.0.1:0 --shards 2 >"$tmp/out" 2>"$tmp/log" &
server_pid=$!
for _ in $(seq 100); do grep -q "gitplane: ready" "$tmp/out" 2>/dev/null && break; sleep 0.1; done
addr="$(sed -n 's/^gitplane: http listening on //p' "$tmp/out")"
"$bin" --data-dir "$tmp/d" repo create admin/big >/dev/null
pw="$(cat "$tmp/d/initial-admin-password")"

mkdir "$tmp/w" && cd "$tmp/w"
git init -q -b main
head -c "$((size_mb << 20))" /dev/urandom >big.bin
git add big.bin && git -c user.name=b -c user.email=b@b commit -qm big
git push -q "$tmp/d/repos/admin/big.git" main
cd "$tmp"

tids=()
for t in /proc/"$server_pid"/task/*; do tids+=(-p "${t##*/}"); done
strace -qq -e trace=splice,write,writev,sendto,sendmsg,read,readv,recvfrom,recvmsg -e signal=none \
    -o "$tmp/strace.txt" "${tids[@]}" &
strace_pid=$!
sleep 1
url="http://admin:$pw@$addr/admin/big.git"
if [ -x "$root/../shared/tools/uring-bytes" ]; then
    echo "== io_uring bytes by opcode in the gitplane process (uring-bytes) =="
    "$root/../shared/tools/uring-bytes" "$server_pid" git clone -q --bare "$url" "$tmp/clone1" || true
    rm -rf "$tmp/clone1"
fi
git clone -q --bare "$url" "$tmp/clone"
sleep 0.5
kill -INT "$strace_pid" 2>/dev/null; wait "$strace_pid" 2>/dev/null || true
git -C "$tmp/clone" fsck --no-progress 2>/dev/null && echo "clone verified with git fsck"
pack_bytes="$(du -cb "$tmp"/clone/objects/pack/*.pack | tail -1 | cut -f1)"
echo "pack size on disk: $pack_bytes bytes"
echo "== syscall bytes in the gitplane process (strace, 2 clones: uring-bytes run + this one) =="
python3 - "$tmp/strace.txt" <<'PY'
import re, sys
totals, counts = {}, {}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\s*(?:\d+\s+)?(\w+)\(.*\)\s+=\s+(-?\d+)", line)
    if not m:
        continue
    call, ret = m.group(1), int(m.group(2))
    counts[call] = counts.get(call, 0) + 1
    if ret > 0:
        totals[call] = totals.get(call, 0) + ret
for call in sorted(counts, key=lambda c: -totals.get(c, 0)):
    print(f"{call:10} calls={counts[call]:7} bytes={totals.get(call, 0)}")
PY
echo "== server metrics =="
curl -s "http://$addr/metrics" | grep -E '^gitplane_bytes_(spliced|written)_total'
