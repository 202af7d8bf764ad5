#!/usr/bin/env bash
# Client cost of a clone over SSH: gitplane-load's `ssh-clone` (russh, one SSH connection per
# clone) versus real sequential `git clone --bare` processes with the OpenSSH client, as clones
# per second of *client* CPU (user + system, children included, from getrusage). Both against
# gitplane's SSH front end and, when run as root with /usr/sbin/sshd present, against OpenSSH
# sshd + git-shell (forced command, AcceptEnv GIT_PROTOCOL, as bench/compare-ssh.sh sets it up).
# The server runs on CPU 1 and the clients on CPU 0 when there are two or more CPUs.
#
#   loadtest/compare-ssh-clone.sh
#
# Environment (optional):
#   N=300      simulated clones per server      C=8   their concurrency (one thread)
#   G=30       real clones per server (sequential)
#   PROFILE=release   which build of gitplane and gitplane-load to use (or debug)
#   BUILD=1    cargo build -p gitplane -p gitplane-load in that profile first
#   KEX=curve25519-sha256   key exchange the OpenSSH client asks for (russh negotiates its own)
#
# Everything listens on 127.0.0.1, runs from a temp dir, and is stopped (by pid) and removed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-300}
C=${C:-8}
G=${G:-30}
PROFILE=${PROFILE:-release}
KEX=${KEX:-curve25519-sha256}
GP=$ROOT/target/$PROFILE/gitplane
LOAD=$ROOT/target/$PROFILE/gitplane-load
if [[ ${BUILD:-1} == 1 ]]; then
    flag=--release
    [[ $PROFILE == debug ]] && flag=
    (cd "$ROOT" && cargo build $flag -q -p gitplane -p gitplane-load)
fi
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null GIT_TERMINAL_PROMPT=0
unset SSH_AUTH_SOCK

if (($(nproc) >= 2)); then SERVER_CPU=1; CLIENT_CPU=0; else SERVER_CPU=0; CLIENT_CPU=0; fi
tmp=$(mktemp -d)
chmod 755 "$tmp" # sshd's git-shell only needs to traverse it
server_pid=
sshd_pid=
cleanup() {
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    [[ -n $sshd_pid ]] && kill "$sshd_pid" 2>/dev/null && wait "$sshd_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

data=$tmp/data
taskset -c "$SERVER_CPU" "$GP" --data-dir "$data" serve --http-listen 127.0.0.1:0 \
    --ssh-listen 127.0.0.1:0 --rpc-listen 127.0.0.1:0 --shards 1 >"$tmp/out" 2>"$tmp/log" &
server_pid=$!
for _ in $(seq 300); do grep -q '^gitplane: ready' "$tmp/out" 2>/dev/null && break; sleep 0.1; done
sshaddr=$(sed -n 's/^gitplane: ssh listening on //p' "$tmp/out")
[[ -n $sshaddr ]] || { cat "$tmp/log"; echo "server did not start" >&2; exit 1; }

# The repository: 20 commits of text files (the `small` repository of compare-git-clone.sh).
"$GP" --data-dir "$data" repo create admin/small >/dev/null
w=$tmp/work
mkdir -p "$w"
git -C "$w" init -q -b main
for i in $(seq 20); do
    seq "$i" 2000 | sed "s/^/line $i /" >"$w/file$i.txt"
    git -C "$w" add . && git -C "$w" -c user.name=b -c user.email=b@x commit -q -m "c$i"
done
git -C "$w" push -q "$data/repos/admin/small.git" main

ssh-keygen -q -t ed25519 -N '' -C load -f "$tmp/key"
"$GP" --data-dir "$data" key add admin "$tmp/key.pub" >/dev/null
printf '[127.0.0.1]:%s %s\n' "${sshaddr##*:}" "$(cut -d' ' -f1-2 "$data/ssh_host_ed25519_key.pub")" >"$tmp/kh"
servers=("gitplane ssh://git@$sshaddr/admin/small.git")

if [[ $(id -u) == 0 && -x /usr/sbin/sshd ]]; then
    mkdir -p /run/sshd "$tmp/sshd"
    ssh-keygen -q -t ed25519 -N '' -f "$tmp/sshd/host"
    printf 'command="git-shell -c \\"$SSH_ORIGINAL_COMMAND\\"",no-port-forwarding,no-X11-forwarding,no-agent-forwarding,no-pty %s\n' \
        "$(cat "$tmp/key.pub")" >"$tmp/sshd/authorized_keys"
    chmod 600 "$tmp/sshd/authorized_keys"
    sport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$tmp/sshd/config" <<CFG
Port $sport
ListenAddress 127.0.0.1
HostKey $tmp/sshd/host
PidFile $tmp/sshd/pid
AuthorizedKeysFile $tmp/sshd/authorized_keys
AllowUsers root
PermitRootLogin forced-commands-only
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitTTY no
AcceptEnv GIT_PROTOCOL
SetEnv SHLVL=1
MaxStartups 100:30:200
CFG
    taskset -c "$SERVER_CPU" /usr/sbin/sshd -D -e -f "$tmp/sshd/config" 2>"$tmp/sshd/log" &
    sshd_pid=$!
    sleep 1
    printf '[127.0.0.1]:%s %s\n' "$sport" "$(cut -d' ' -f1-2 "$tmp/sshd/host.pub")" >>"$tmp/kh"
    servers+=("sshd ssh://root@127.0.0.1:$sport$data/repos/admin/small.git")
else
    echo "compare-ssh-clone: OpenSSH sshd rows skipped (needs root and /usr/sbin/sshd)" >&2
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

printf '| server | client | clones | client CPU s | clones per client CPU-s | wall s | clones/s (wall) |\n'
printf '|---|---|---|---|---|---|---|\n'
for entry in "${servers[@]}"; do
    read -r s url <<<"$entry"
    "$LOAD" ssh-clone --url "$url" --identity "$tmp/key" --known-hosts "$tmp/kh" -n 2 -q \
        --verify --verify-samples 1 >/dev/null
    read -r cpu wall < <(measure taskset -c "$CLIENT_CPU" "$LOAD" ssh-clone --url "$url" \
        --identity "$tmp/key" --known-hosts "$tmp/kh" -n "$N" -c "$C" -t 1 -q --json "$tmp/$s.json")
    read -r errors proto < <(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['errors_total'], ','.join(r['protocols']))" "$tmp/$s.json")
    [[ $errors == 0 ]] || { echo "gitplane-load had $errors errors against $s" >&2; exit 1; }
    awk -v s="$s" -v n="$N" -v k="$C" -v c="$cpu" -v w="$wall" -v p="$proto" 'BEGIN {
        printf "| %s | gitplane-load ssh-clone (1 thread, -c %s, %s) | %d | %.2f | %.1f | %.2f | %.1f |\n", s, k, p, n, c, n / c, w, n / w }'
    rate=$(awk -v n="$N" -v c="$cpu" 'BEGIN { print n / c }')
    export GIT_SSH_COMMAND="ssh -F /dev/null -i $tmp/key -o IdentitiesOnly=yes -o IdentityAgent=none -o UserKnownHostsFile=$tmp/kh -o StrictHostKeyChecking=yes -o BatchMode=yes -o KexAlgorithms=$KEX"
    read -r cpu wall < <(measure taskset -c "$CLIENT_CPU" bash -c '
        for i in $(seq "$1"); do git -c protocol.version=2 clone -q --bare "$2" "$3/c$i"; done' _ "$G" "$url" "$tmp/clones-$s")
    unset GIT_SSH_COMMAND
    rm -rf "$tmp/clones-$s"
    awk -v s="$s" -v n="$G" -v c="$cpu" -v w="$wall" -v l="$rate" 'BEGIN {
        printf "| %s | git clone --bare over ssh (sequential) | %d | %.2f | %.1f (gitplane-load: %.1fx) | %.2f | %.1f |\n", s, n, c, n / c, l / (n / c), w, n / w }'
done
