#!/usr/bin/env bash
# Client cost of a clone over SSH: gitplane-load's `ssh-clone` (russh, one SSH connection per
# clone) versus real sequential `git clone --bare` processes with the OpenSSH client, as clones
# per second of *client* CPU (user + system, children included, from getrusage). Both against
# gitplane's SSH front end and, when run as root with /usr/sbin/sshd present, against OpenSSH
# sshd + git-shell (forced command, AcceptEnv GIT_PROTOCOL: bench/lib/common.sh start_sshd).
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
# Everything listens on 127.0.0.1, runs from a temp dir, and is stopped (by pid) and removed
# (bench/lib/common.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_TAG=compare-ssh-clone
BENCH_CGROUP=0
# shellcheck source=bench/lib/common.sh
source "$ROOT/bench/lib/common.sh"
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
bench_init gitplane-compare-ssh-clone

pin_server_cpu
start_gitplane "$GP" 1 || die "${NOTE[gitplane]}"
# The repository: 20 commits of text files (the `small` repository of compare-git-clone.sh).
make_small_repo "$GP" admin/small
client_ssh_key
gitplane_add_key "$GP" admin "$TMP/client_key.pub" "$TMP/known_hosts" || die "${NOTE[gitplane]}"
servers=("gitplane ssh://git@$GITPLANE_SSH/admin/small.git")

if [[ $(id -u) == 0 && -x /usr/sbin/sshd ]]; then
    start_sshd "MaxStartups 100:30:200" || die "${NOTE[sshd]}"
    servers+=("sshd ssh://$SSHD_USER@127.0.0.1:$SSHD_PORT$GITPLANE_DATA/repos/admin/small.git")
else
    log "OpenSSH sshd rows skipped (needs root and /usr/sbin/sshd)"
fi

printf '| server | client | clones | client CPU s | clones per client CPU-s | wall s | clones/s (wall) |\n'
printf '|---|---|---|---|---|---|---|\n'
for entry in "${servers[@]}"; do
    read -r s url <<<"$entry"
    "$LOAD" ssh-clone --url "$url" --identity "$TMP/client_key" --known-hosts "$TMP/known_hosts" -n 2 -q \
        --verify --verify-samples 1 >/dev/null
    read -r cpu wall < <(client_cpu taskset -c "$CLIENT_CPU" "$LOAD" ssh-clone --url "$url" \
        --identity "$TMP/client_key" --known-hosts "$TMP/known_hosts" -n "$N" -c "$C" -t 1 -q --json "$TMP/$s.json")
    read -r errors proto < <(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['errors_total'], ','.join(r['protocols']))" "$TMP/$s.json")
    [[ $errors == 0 ]] || die "gitplane-load had $errors errors against $s"
    awk -v s="$s" -v n="$N" -v k="$C" -v c="$cpu" -v w="$wall" -v p="$proto" 'BEGIN {
        printf "| %s | gitplane-load ssh-clone (1 thread, -c %s, %s) | %d | %.2f | %.1f | %.2f | %.1f |\n", s, k, p, n, c, n / c, w, n / w }'
    rate=$(awk -v n="$N" -v c="$cpu" 'BEGIN { print n / c }')
    export GIT_SSH_COMMAND="ssh -F /dev/null -i $TMP/client_key -o IdentitiesOnly=yes -o IdentityAgent=none -o UserKnownHostsFile=$TMP/known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes -o KexAlgorithms=$KEX"
    read -r cpu wall < <(client_cpu taskset -c "$CLIENT_CPU" bash -c '
        for i in $(seq "$1"); do git -c protocol.version=2 clone -q --bare "$2" "$3/c$i"; done' _ "$G" "$url" "$TMP/clones-$s")
    unset GIT_SSH_COMMAND
    rm -rf "$TMP/clones-$s"
    awk -v s="$s" -v n="$G" -v c="$cpu" -v w="$wall" -v l="$rate" 'BEGIN {
        printf "| %s | git clone --bare over ssh (sequential) | %d | %.2f | %.1f (gitplane-load: %.1fx) | %.2f | %.1f |\n", s, n, c, n / c, l / (n / c), w, n / w }'
done
