#!/usr/bin/env bash
# Side-by-side Git over SSH on loopback:
#   gitplane (russh sidecars)  vs  OpenSSH sshd + git-shell (forced command)
#
#   bench/compare-ssh.sh
#
# Measures, for both servers with the same repository and the same client (issue #3,
# "Measured, not timed"):
#   * clones/s at each CONCURRENCY (real `git clone --bare` over ssh, bench/lib/clone_driver.py),
#     failures counted (sshd drops connections past MaxStartups), server CPU per clone,
#     server peak RSS (sum over the server process tree, sampled every 50 ms);
#   * sessions/s: ssh + key exchange + public-key auth + `git-upload-pack` ref advertisement,
#     nothing fetched (bench/lib/ssh_driver.py sessions);
#   * RSS per idle pre-auth connection: IDLE_CONNS TCP connections that send only the SSH
#     version line, server tree RSS before/after (bench/lib/ssh_driver.py idle).
#
# Environment (all optional):
#   CONCURRENCY="8 32"        clone concurrency levels
#   CLONES=N                  clones per level (default max(2*c, 8))
#   SERVERS="sshd gitplane"   which servers, in this order
#   SESSIONS=200              sessions per session level; SESSION_CONCURRENCY="8 32"
#   IDLE_CONNS=500            idle pre-auth connections; IDLE_PER_SOURCE=30 (per 127.0.0.x source)
#   IDLE_MODE=version         version: send only "SSH-2.0-..."; silent: send nothing
#   SSH_KEX=curve25519-sha256 key exchange the client asks of both servers (the same for
#                             both: sshd 9.x would otherwise pick sntrup761x25519-sha512,
#                             which gitplane does not offer); "default": the client's defaults
#   SSH_CIPHERS=default       cipher list the client offers both servers (ssh -o Ciphers=...);
#                             default: the client's own list, each server picks from it
#                             what it offers (gitplane offers only AES-GCM on CPUs with AES
#                             instructions, sshd also chacha20-poly1305, OpenSSH's first choice)
#   OUT=bench/results/ssh-compare.md   Markdown result (raw JSON lines beside it, .jsonl)
#   FIXTURE_DIR=bench/fixture/cache/fixture.git
#   GITPLANE_BIN=target/release/gitplane
#   GITPLANE_CONFIG=FILE      gitplane's config file (e.g. "[git]\npack_cache = false" to
#                             make every clone generate its pack); default: none
#   GITPLANE_BUILD=auto       auto: `cargo build --release --bin gitplane` if the binary is
#                             missing or older than src/, build.rs, Cargo.toml or Cargo.lock;
#                             always: always run it; never: do not build
#   GITPLANE_BUILD_TIMEOUT=1800  GITPLANE_READY_TIMEOUT=30  GITPLANE_SHARDS=2
#   CLONE_TIMEOUT=300  LEVEL_TIMEOUT=900  SESSION_TIMEOUT=30  FSCK_SAMPLES=1
#   KEEP_TMP=0                1: keep the temp dir (logs, sshd_config) after the run
#   BENCH_CGROUP=0            1: run each server in a cgroup of its own and take its CPU
#                             counter (bench/lib/servertree.py) instead of the /proc tree
#
# Everything listens on 127.0.0.1 only and runs from a temp dir.  sshd is our own
# `sshd -D -f CONFIG` on a free port (the system ssh service is never started); it runs
# as root when the script does (sshd needs it), and logs in the current user with
# `PermitRootLogin forced-commands-only` when that is root.  Every process started here
# is stopped by pid, and the temp dir removed, on exit.  Method: docs/BENCHMARKS.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_TAG=compare-ssh
BENCH_CGROUP=${BENCH_CGROUP:-0}
# shellcheck source=bench/lib/common.sh
source "$ROOT/bench/lib/common.sh"
DRIVER="$BENCH_LIB/clone_driver.py"
SSH_DRIVER="$BENCH_LIB/ssh_driver.py"

CONCURRENCY=${CONCURRENCY:-"8 32"}
CLONES=${CLONES:-}
SERVERS=${SERVERS:-"sshd gitplane"}
SESSIONS=${SESSIONS:-200}
SESSION_CONCURRENCY=${SESSION_CONCURRENCY:-"8 32"}
IDLE_CONNS=${IDLE_CONNS:-500}
IDLE_PER_SOURCE=${IDLE_PER_SOURCE:-30}
IDLE_MODE=${IDLE_MODE:-version}
SSH_KEX=${SSH_KEX:-curve25519-sha256}
SSH_CIPHERS=${SSH_CIPHERS:-default}
OUT=${OUT:-$ROOT/bench/results/ssh-compare.md}
GITPLANE_BUILD=${GITPLANE_BUILD:-auto}
CLONE_TIMEOUT=${CLONE_TIMEOUT:-300}
LEVEL_TIMEOUT=${LEVEL_TIMEOUT:-900}
SESSION_TIMEOUT=${SESSION_TIMEOUT:-30}
FSCK_SAMPLES=${FSCK_SAMPLES:-1}

for v in $CONCURRENCY $SESSION_CONCURRENCY; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "bad concurrency entry: $v"; done
[[ -z $CLONES || $CLONES =~ ^[1-9][0-9]*$ ]] || die "bad CLONES: $CLONES"
[[ $SESSIONS =~ ^[1-9][0-9]*$ && $SESSIONS -le 100000 ]] || die "bad SESSIONS: $SESSIONS"
[[ $IDLE_CONNS =~ ^[1-9][0-9]*$ && $IDLE_CONNS -le 7500 ]] || die "bad IDLE_CONNS: $IDLE_CONNS"
[[ $IDLE_MODE == version || $IDLE_MODE == silent ]] || die "IDLE_MODE must be version or silent"
case $GITPLANE_BUILD in auto | missing | always | never) ;; *) die "bad GITPLANE_BUILD: $GITPLANE_BUILD" ;; esac

SSH_BASE="" # set in main: the ssh command line used by every client (git and sessions)

# ---------------------------------------------------------------- results
RESULTS_JSONL=""
declare -A LABEL # server -> row label
declare -A EXTRA # server -> extra facts (log counters) for the report

record() { # SERVER KIND JSON
    printf '{"server": "%s", "label": "%s", "kind": "%s", "result": %s}\n' \
        "$1" "${LABEL[$1]}" "$2" "$3" >>"$RESULTS_JSONL"
}

measure() { # SERVER URL SSH_DEST REMOTE_REPO PORT ROOT_PID LONG_LIVED
    local server=$1 url=$2 dest=$3 rrepo=$4 port=$5 root=$6 long=$7 c n out cg=()
    [[ -z $SERVER_CG ]] || cg=(--cgroup "$SERVER_CG")
    # Idle pre-auth connections first, on the freshly started server: after the clone
    # batches its allocator holds freed-but-resident memory that new connections would
    # reuse without growing RSS, which would understate the cost per connection.
    log "$server: $IDLE_CONNS idle pre-auth connections ($IDLE_MODE)"
    if run_bg "$TMP/driver.out" "$TMP/driver.err" 120 \
        python3 "$SSH_DRIVER" idle --port "$port" --root "$root" --long-lived "$long" \
        --connections "$IDLE_CONNS" --per-source "$IDLE_PER_SOURCE" --mode "$IDLE_MODE" &&
        out=$(cat "$TMP/driver.out") && [[ -n $out ]]; then
        :
    else
        log "$server: idle driver failed: $(tail -3 "$TMP/driver.err" | tr '\n' ' ')"
        out="{\"connections\": $IDLE_CONNS, \"driver_failed\": true}"
    fi
    record "$server" idle "$out"
    log "$server idle: $out"
    export GIT_SSH_COMMAND="$SSH_BASE"
    # Warm-up (page cache, server start-up paths): one clone, not measured.
    rm -rf "$TMP/work/warm.git"
    timeout "$CLONE_TIMEOUT" git -c protocol.version=2 clone --bare -q "$url" "$TMP/work/warm.git" ||
        log "$server: warm-up clone failed"
    rm -rf "$TMP/work/warm.git"

    for c in $CONCURRENCY; do
        if [[ -n $CLONES ]]; then n=$CLONES; else n=$((2 * c > 8 ? 2 * c : 8)); fi
        log "$server: clones, concurrency $c, $n clones"
        if run_bg "$TMP/driver.out" "$TMP/driver.err" $((LEVEL_TIMEOUT + CLONE_TIMEOUT + 900)) \
            python3 "$DRIVER" --url "$url" --concurrency "$c" --clones "$n" --work "$TMP/work" \
            --root "$root" --long-lived "$long" "${cg[@]}" --git-config protocol.version=2 \
            --expected-refs "$TMP/expected-refs" --fsck-samples "$FSCK_SAMPLES" \
            --clone-timeout "$CLONE_TIMEOUT" --level-timeout "$LEVEL_TIMEOUT" &&
            out=$(cat "$TMP/driver.out") && [[ -n $out ]]; then
            :
        else
            log "$server: clone driver failed at concurrency $c: $(tail -3 "$TMP/driver.err" | tr '\n' ' ')"
            out="{\"concurrency\": $c, \"clones\": $n, \"driver_failed\": true}"
        fi
        record "$server" clones "$out"
        log "$server clones c=$c: $out"
    done

    for c in $SESSION_CONCURRENCY; do
        log "$server: sessions, concurrency $c, $SESSIONS sessions"
        if run_bg "$TMP/driver.out" "$TMP/driver.err" $((LEVEL_TIMEOUT + SESSION_TIMEOUT + 120)) \
            python3 "$SSH_DRIVER" sessions --ssh "$SSH_BASE" --port "$port" --dest "$dest" \
            --remote-command "git-upload-pack '$rrepo'" --expect "refs/heads/main" \
            --count "$SESSIONS" --concurrency "$c" --root "$root" --long-lived "$long" "${cg[@]}" \
            --session-timeout "$SESSION_TIMEOUT" --level-timeout "$LEVEL_TIMEOUT" &&
            out=$(cat "$TMP/driver.out") && [[ -n $out ]]; then
            :
        else
            log "$server: session driver failed at concurrency $c: $(tail -3 "$TMP/driver.err" | tr '\n' ' ')"
            out="{\"concurrency\": $c, \"sessions\": $SESSIONS, \"driver_failed\": true}"
        fi
        record "$server" sessions "$out"
        log "$server sessions c=$c: $out"
    done

    unset GIT_SSH_COMMAND
}

# ---------------------------------------------------------------- servers
start_server() { # SERVER: in a cgroup of its own when BENCH_CGROUP=1
    server_cgroup "$1"
    case $1 in
    sshd)
        # MaxStartups (10:30:100), MaxSessions and LoginGraceTime: OpenSSH defaults.
        start_sshd || return 1
        SRV_PORT=$SSHD_PORT SRV_ROOT=$SSHD_PID SRV_URL=$SSHD_URL
        SRV_DEST="$SSHD_USER@127.0.0.1" SRV_RREPO="$TMP/root/$REPO_PATH"
        ;;
    gitplane)
        if ! gitplane_build "$GITPLANE_BUILD" "$GITPLANE_BIN" gitplane; then NOTE[gitplane]=$BUILD_FAILED; return 1; fi
        start_gitplane "$GITPLANE_BIN" "$GITPLANE_SHARDS" ${GITPLANE_CONFIG:+--config "$GITPLANE_CONFIG"} &&
            gitplane_fixture "$GITPLANE_BIN" &&
            gitplane_add_key "$GITPLANE_BIN" admin "$TMP/client_key.pub" "$TMP/known_hosts" || return 1
        SRV_PORT=${GITPLANE_SSH##*:} SRV_ROOT=$GITPLANE_PID SRV_URL="ssh://git@$GITPLANE_SSH/$REPO_PATH"
        SRV_DEST="git@127.0.0.1" SRV_RREPO=$REPO_PATH
        ;;
    esac
    SRV_LONG=$(tree_pids "$SRV_ROOT") # sshd: the listener; every connection is a child of it
}

gitplane_metrics() { # the SSH handshake counters, for the notes
    [[ -n ${GITPLANE_HTTP:-} ]] || return 0
    curl -s --max-time 5 --noproxy '*' "http://$GITPLANE_HTTP/metrics" 2>/dev/null |
        grep -E '^gitplane_ssh_(handshakes_total|auth_rejected_total)' | tr '\n' ';' | sed 's/;$//; s/;/; /g' || true
}

bench_server() { # SERVER
    local s=$1
    case $s in
    sshd) LABEL[sshd]="OpenSSH sshd + git-shell" ;;
    gitplane) LABEL[gitplane]="gitplane" ;;
    *) die "unknown server: $s" ;;
    esac
    start_server "$s" || { log "$s: ${NOTE[$s]:-did not start}"; kill_started; return 0; }
    if ! GIT_SSH_COMMAND="$SSH_BASE -v" probe "$SRV_URL" -c protocol.version=2; then
        NOTE[$s]="ls-remote over ssh against $s failed or returned other refs: $(tail -2 "$TMP/probe.err" | tr '\n' ' ')"
        log "$s: ${NOTE[$s]}"; kill_started; return 0
    fi
    LABEL[$s]+=" ($PROBE_PROTO)"
    EXTRA[$s]="kex $PROBE_KEX, cipher $PROBE_CIPHER"
    log "$s: ls-remote ok, protocol $PROBE_PROTO, kex $PROBE_KEX, cipher $PROBE_CIPHER"
    measure "$s" "$SRV_URL" "$SRV_DEST" "$SRV_RREPO" "$SRV_PORT" "$SRV_ROOT" "$SRV_LONG"
    case $s in
    sshd) EXTRA[sshd]+="; sshd log: 'beginning MaxStartups throttling' $(grep -c 'beginning MaxStartups throttling' "$TMP/sshd/sshd.log" || true) times (sshd logs only the first drop of each episode)" ;;
    gitplane) EXTRA[gitplane]+="; metrics at the end: $(gitplane_metrics)" ;;
    esac
    is_running "$SRV_ROOT" || NOTE[$s]="$s exited during the run"
    kill_started
}

# ---------------------------------------------------------------- main
command -v git-shell >/dev/null || [[ -x $(git --exec-path)/git-shell ]] || die "git-shell not found"
ensure_packages ssh=openssh-client ssh-keygen=openssh-client /usr/sbin/sshd=openssh-server
bench_init gitplane-compare-ssh
mkdir -p "$(dirname "$OUT")" "$TMP/work"
RESULTS_JSONL="${OUT%.md}.jsonl"
: >"$RESULTS_JSONL"
prepare_fixture "$FIXTURE_DIR"

# One client key and one known_hosts for both servers; strict host key checking.
client_ssh_key
SSH_BASE="ssh -F /dev/null -i $TMP/client_key -o IdentitiesOnly=yes -o IdentityAgent=none -o UserKnownHostsFile=$TMP/known_hosts -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes -o ControlMaster=no -o ControlPath=none -o ConnectTimeout=10 -o LogLevel=ERROR"
[[ $SSH_KEX == default ]] || SSH_BASE+=" -o KexAlgorithms=$SSH_KEX"
[[ $SSH_CIPHERS == default ]] || SSH_BASE+=" -o Ciphers=$SSH_CIPHERS"

LOAD_START=$(loadavg)
for s in $SERVERS; do
    bench_server "$s"
done
LOAD_END=$(loadavg)

# ---------------------------------------------------------------- report
versions() {
    host_facts
    printf -- '- git: %s (client, git-shell and upload-pack); ssh client: %s\n' "$(git --version | awk '{print $3}')" "$(ssh -V 2>&1)"
    printf -- '- sshd: %s (package %s), MaxStartups/MaxSessions/LoginGraceTime at their defaults\n' \
        "${SSHD_VERSION:-?}" "$(dpkg-query -W -f='${Version}' openssh-server 2>/dev/null || echo '?')"
    printf -- '- gitplane: %s, --shards %s\n' "$(gitplane_bin_info "$GITPLANE_BIN")" "$GITPLANE_SHARDS"
    printf -- '- fixture: %s\n' "$FIXTURE_INFO"
    printf -- '- load average (1/5/15 min) before: %s; after: %s (client and servers share the same cores)\n' "$LOAD_START" "$LOAD_END"
    printf -- '- clones: concurrency %s, clones per level %s, fsck-verified per level %s; sessions: %s per level at concurrency %s; idle: %s connections (%s per 127.0.0.x source), mode %s; client KexAlgorithms: %s; client Ciphers: %s; server CPU: %s\n' \
        "$CONCURRENCY" "${CLONES:-max(2*c, 8)}" "$FSCK_SAMPLES" "$SESSIONS" "$SESSION_CONCURRENCY" "$IDLE_CONNS" "$IDLE_PER_SOURCE" "$IDLE_MODE" "$SSH_KEX" "$SSH_CIPHERS" \
        "$([[ $BENCH_CGROUP == 1 ]] && echo "each server's cgroup counter" || echo "/proc tree")"
    local k
    for k in "${!EXTRA[@]}"; do printf -- '- %s: %s\n' "$k" "${EXTRA[$k]}"; done | sort
}

{
    echo "### Git over SSH: gitplane vs OpenSSH sshd + git-shell"
    echo
    versions
    echo
    notes_tsv | python3 "$BENCH_LIB/ssh_report.py" "$RESULTS_JSONL" "$CONCURRENCY" "$SESSION_CONCURRENCY"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cat "$OUT"
log "written: $OUT (raw: $RESULTS_JSONL)"
