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
#   OUT=bench/results/ssh-compare.md   Markdown result (raw JSON lines beside it, .jsonl)
#   FIXTURE_DIR=bench/fixture/cache/fixture.git
#   GITPLANE_BIN=target/release/gitplane
#   GITPLANE_BUILD=auto       auto: `cargo build --release --bin gitplane` if the binary is
#                             missing or older than src/, build.rs, Cargo.toml or Cargo.lock;
#                             always: always run it; never: do not build
#   GITPLANE_BUILD_TIMEOUT=1800  GITPLANE_READY_TIMEOUT=30  GITPLANE_SHARDS=2
#   CLONE_TIMEOUT=300  LEVEL_TIMEOUT=900  SESSION_TIMEOUT=30  FSCK_SAMPLES=1
#   KEEP_TMP=0                1: keep the temp dir (logs, sshd_config) after the run
#
# Everything listens on 127.0.0.1 only and runs from a temp dir.  sshd is our own
# `sshd -D -f CONFIG` on a free port (the system ssh service is never started); it runs
# as root when the script does (sshd needs it), and logs in the current user with
# `PermitRootLogin forced-commands-only` when that is root.  Every process started here
# is stopped by pid, and the temp dir removed, on exit.  Method: docs/BENCHMARKS.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIB="$ROOT/bench/lib"
DRIVER="$LIB/clone_driver.py"
SSH_DRIVER="$LIB/ssh_driver.py"

CONCURRENCY=${CONCURRENCY:-"8 32"}
CLONES=${CLONES:-}
SERVERS=${SERVERS:-"sshd gitplane"}
SESSIONS=${SESSIONS:-200}
SESSION_CONCURRENCY=${SESSION_CONCURRENCY:-"8 32"}
IDLE_CONNS=${IDLE_CONNS:-500}
IDLE_PER_SOURCE=${IDLE_PER_SOURCE:-30}
IDLE_MODE=${IDLE_MODE:-version}
SSH_KEX=${SSH_KEX:-curve25519-sha256}
OUT=${OUT:-$ROOT/bench/results/ssh-compare.md}
FIXTURE_DIR=${FIXTURE_DIR:-$ROOT/bench/fixture/cache/fixture.git}
GITPLANE_BIN=${GITPLANE_BIN:-$ROOT/target/release/gitplane}
GITPLANE_BUILD=${GITPLANE_BUILD:-auto}
GITPLANE_BUILD_TIMEOUT=${GITPLANE_BUILD_TIMEOUT:-1800}
GITPLANE_READY_TIMEOUT=${GITPLANE_READY_TIMEOUT:-30}
GITPLANE_SHARDS=${GITPLANE_SHARDS:-2}
CLONE_TIMEOUT=${CLONE_TIMEOUT:-300}
LEVEL_TIMEOUT=${LEVEL_TIMEOUT:-900}
SESSION_TIMEOUT=${SESSION_TIMEOUT:-30}
FSCK_SAMPLES=${FSCK_SAMPLES:-1}
KEEP_TMP=${KEEP_TMP:-0}

REPO_PATH=bench/fixture.git
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf '[compare-ssh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for v in $CONCURRENCY $SESSION_CONCURRENCY; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "bad concurrency entry: $v"; done
[[ -z $CLONES || $CLONES =~ ^[1-9][0-9]*$ ]] || die "bad CLONES: $CLONES"
[[ $SESSIONS =~ ^[1-9][0-9]*$ && $SESSIONS -le 100000 ]] || die "bad SESSIONS: $SESSIONS"
[[ $IDLE_CONNS =~ ^[1-9][0-9]*$ && $IDLE_CONNS -le 7500 ]] || die "bad IDLE_CONNS: $IDLE_CONNS"
[[ $IDLE_MODE == version || $IDLE_MODE == silent ]] || die "IDLE_MODE must be version or silent"
case $GITPLANE_BUILD in auto | missing | always | never) ;; *) die "bad GITPLANE_BUILD: $GITPLANE_BUILD" ;; esac

unset SSH_AUTH_SOCK SSH_AGENT_PID GIT_SSH GIT_SSH_VARIANT GIT_PROXY_COMMAND
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0
export LC_ALL=C

# ---------------------------------------------------------------- cleanup
TMP=""
PIDS=()       # every server process this script started (killed by pid on exit)
CLIENT_PID="" # the running driver, if any
MADE_RUN_SSHD=0

is_running() { # PID: exists and is not a zombie
    local st
    st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && ${st:0:1} != Z ]]
}

tree_pids() { python3 "$DRIVER" tree "$@" | paste -sd, -; }

kill_started() {
    local pid i alive all=()
    ((${#PIDS[@]})) || return 0
    # The started servers and everything below them (sshd's per-connection children,
    # in-flight git processes), each by pid.
    IFS=, read -r -a all <<<"$(tree_pids "${PIDS[@]}" 2>/dev/null || true)"
    all+=("${PIDS[@]}")
    for pid in "${all[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "${all[@]}"; do is_running "$pid" && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${all[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $CLIENT_PID ]]; then
        local p cps
        IFS=, read -r -a cps <<<"$(tree_pids "$CLIENT_PID" 2>/dev/null || true)"
        for p in "${cps[@]}" "$CLIENT_PID"; do kill -TERM "$p" 2>/dev/null || true; done
        wait "$CLIENT_PID" 2>/dev/null || true
    fi
    kill_started
    ((MADE_RUN_SSHD)) && rmdir /run/sshd 2>/dev/null
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- packages
SSHD=/usr/sbin/sshd
ensure_packages() {
    local missing=() tmp_policy=0 rc=0
    command -v git >/dev/null || die "git not found"
    command -v git-shell >/dev/null || [[ -x $(git --exec-path)/git-shell ]] || die "git-shell not found"
    command -v python3 >/dev/null || missing+=(python3)
    command -v timeout >/dev/null || missing+=(coreutils)
    command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || missing+=(openssh-client)
    [[ -x $SSHD ]] || missing+=(openssh-server)
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get"
    log "installing: ${missing[*]} (apt-get update once)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # Keep the package from starting the system-wide ssh service (port 22).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        tmp_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || rc=$?
    ((tmp_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${missing[*]} failed"
    [[ -x $SSHD ]] || die "$SSHD still missing"
}

# ---------------------------------------------------------------- helpers
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_banner() { # PORT TIMEOUT PID: until the port answers with an SSH version line
    local port=$1 t=$2 pid=$3 i
    for ((i = 0; i < t * 10; i++)); do
        is_running "$pid" || return 1
        if python3 - "$port" 2>/dev/null <<'PY'; then
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5)
s.settimeout(1)
ok = s.recv(64).startswith(b"SSH-2.0-")
s.close()
sys.exit(0 if ok else 1)
PY
            return 0
        fi
        sleep 0.1
    done
    return 1
}

copy_objects() { # SRC DST: hard links when possible (same inodes, same page cache)
    cp -al "$1" "$2" 2>/dev/null || { rm -rf "$2"; cp -a "$1" "$2"; }
}

SSH_BASE="" # set in main: the ssh command line used by every client (git and sessions)

# ls-remote over ssh: refs must match the fixture; prints the protocol version and the
# negotiated kex / cipher (from ssh -v) as "v2|KEX|CIPHER".
probe() { # URL
    local url=$1 refs trace="$TMP/probe.trace" kex cipher
    refs=$(GIT_TRACE_PACKET="$trace" GIT_SSH_COMMAND="$SSH_BASE -v" timeout 60 \
        git -c protocol.version=2 ls-remote --refs "$url" 2>"$TMP/probe.err" |
        awk '{print $1 " " $2}') || { tail -5 "$TMP/probe.err" >&2; return 1; }
    if [[ "$refs" != "$(awk '{print $1 " " $2}' "$TMP/expected-refs")" ]]; then
        log "ls-remote $url: refs differ from the fixture"
        return 1
    fi
    kex=$(sed -n 's/.*debug1: kex: algorithm: \([^ ]*\).*/\1/p' "$TMP/probe.err" | head -1)
    cipher=$(sed -n 's/.*debug1: kex: server->client cipher: \([^ ]*\).*/\1/p' "$TMP/probe.err" | head -1)
    if grep -q 'version 2' "$trace"; then printf 'v2|%s|%s\n' "$kex" "$cipher"; else printf 'v0|%s|%s\n' "$kex" "$cipher"; fi
    rm -f "$trace"
}

# ---------------------------------------------------------------- results
RESULTS_JSONL=""
declare -A NOTE  # server -> reason it was not measured
declare -A LABEL # server -> row label
declare -A EXTRA # server -> extra facts (log counters) for the report

record() { # SERVER KIND JSON
    printf '{"server": "%s", "label": "%s", "kind": "%s", "result": %s}\n' \
        "$1" "${LABEL[$1]}" "$2" "$3" >>"$RESULTS_JSONL"
}

run_driver() { # OUTFILE ERRFILE TIMEOUT CMD...: in the background + wait, so TERM/INT cleans up at once
    local out=$1 err=$2 t=$3
    shift 3
    timeout "$t" "$@" >"$out" 2>"$err" &
    CLIENT_PID=$!
    local rc=0
    wait "$CLIENT_PID" || rc=$?
    CLIENT_PID=""
    return $rc
}

measure() { # SERVER URL SSH_DEST REMOTE_REPO PORT ROOT_PID LONG_LIVED
    local server=$1 url=$2 dest=$3 rrepo=$4 port=$5 root=$6 long=$7 c n out
    # Idle pre-auth connections first, on the freshly started server: after the clone
    # batches its allocator holds freed-but-resident memory that new connections would
    # reuse without growing RSS, which would understate the cost per connection.
    log "$server: $IDLE_CONNS idle pre-auth connections ($IDLE_MODE)"
    if run_driver "$TMP/driver.out" "$TMP/driver.err" 120 \
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
        if run_driver "$TMP/driver.out" "$TMP/driver.err" $((LEVEL_TIMEOUT + CLONE_TIMEOUT + 900)) \
            python3 "$DRIVER" --url "$url" --concurrency "$c" --clones "$n" --work "$TMP/work" \
            --root "$root" --long-lived "$long" --git-config protocol.version=2 \
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
        if run_driver "$TMP/driver.out" "$TMP/driver.err" $((LEVEL_TIMEOUT + SESSION_TIMEOUT + 120)) \
            python3 "$SSH_DRIVER" sessions --ssh "$SSH_BASE" --port "$port" --dest "$dest" \
            --remote-command "git-upload-pack '$rrepo'" --expect "refs/heads/main" \
            --count "$SESSIONS" --concurrency "$c" --root "$root" --long-lived "$long" \
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
SSHD_VERSION=""
start_sshd() {
    local dir="$TMP/sshd" port pid user
    mkdir -p "$dir"
    [[ $(id -u) == 0 ]] || { NOTE[sshd]="sshd with privilege separation needs root (run the script as root)"; return 1; }
    if [[ ! -d /run/sshd ]]; then
        mkdir -m 0755 /run/sshd
        MADE_RUN_SSHD=1
    fi
    ssh-keygen -q -t ed25519 -N '' -C bench-sshd-host -f "$dir/ssh_host_ed25519_key"
    user=$(id -un)
    # The forced command, as a git-shell deployment with keys in authorized_keys has it.
    printf 'command="git-shell -c \\"$SSH_ORIGINAL_COMMAND\\"",no-port-forwarding,no-X11-forwarding,no-agent-forwarding,no-pty %s\n' \
        "$(cat "$TMP/client_key.pub")" >"$dir/authorized_keys"
    chmod 600 "$dir/authorized_keys"
    port=$(free_port)
    local root_line=""
    [[ $user == root ]] && root_line="PermitRootLogin forced-commands-only"
    cat >"$dir/sshd_config" <<EOF
# generated by bench/compare-ssh.sh
Port $port
ListenAddress 127.0.0.1
AddressFamily inet
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
AllowUsers $user
$root_line
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UsePAM no
StrictModes no
PermitTTY no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
AllowStreamLocalForwarding no
PermitTunnel no
PrintMotd no
PrintLastLog no
UseDNS no
# git sends GIT_PROTOCOL (SendEnv) for protocol v2 over ssh.
AcceptEnv GIT_PROTOCOL
# The forced command runs through the user's login shell ($user: $(getent passwd "$user" | cut -d: -f7)).
# SHLVL=1 keeps bash from sourcing ~/.bashrc for an ssh command (it does so only at
# shell level 1), as a dedicated git user with git-shell as its shell would not.
SetEnv SHLVL=1
LogLevel INFO
# MaxStartups, MaxSessions, LoginGraceTime: OpenSSH defaults (10:30:100, 10, 120 s).
EOF
    "$SSHD" -t -f "$dir/sshd_config" 2>"$dir/check.log" || {
        NOTE[sshd]="sshd -t rejected the config: $(tail -2 "$dir/check.log" | tr '\n' ' ')"
        return 1
    }
    "$SSHD" -D -e -f "$dir/sshd_config" >"$dir/sshd.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    if ! wait_banner "$port" 20 "$pid"; then
        NOTE[sshd]="sshd did not start: $(tail -3 "$dir/sshd.log" | tr '\n' ' ')"
        return 1
    fi
    printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1-2 "$dir/ssh_host_ed25519_key.pub")" >>"$TMP/known_hosts"
    # The version line sshd sends (sshd has no version flag).
    SSHD_VERSION=$(python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2); s.settimeout(2); print(s.recv(128).decode(errors="replace").strip()); s.close()' "$port" 2>/dev/null || echo '?')
    SSHD_PORT=$port
    SSHD_ROOT=$pid
    SSHD_LONG=$pid # the listener; every connection is a child of it
    SSHD_URL="ssh://$user@127.0.0.1:$port$TMP/root/$REPO_PATH"
    SSHD_DEST="$user@127.0.0.1"
    SSHD_RREPO="$TMP/root/$REPO_PATH"
    log "sshd on 127.0.0.1:$port (pid $pid)"
}

binary_stale() { # newer sources than the binary?
    [[ -n $(find "$ROOT/src" "$ROOT/build.rs" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" \
        -newer "$GITPLANE_BIN" -print -quit 2>/dev/null) ]]
}

BUILD_INFO="not built by this run"
build_gitplane() {
    local rc=0 why=""
    case $GITPLANE_BUILD in
    never) return 0 ;;
    always) why="GITPLANE_BUILD=always" ;;
    missing) [[ -x $GITPLANE_BIN ]] || why="binary missing" ;;
    auto)
        if [[ ! -x $GITPLANE_BIN ]]; then why="binary missing"
        elif binary_stale; then why="binary older than src/ or Cargo.*"; fi
        ;;
    esac
    [[ -n $why ]] || return 0
    log "gitplane: cargo build --release --bin gitplane ($why; timeout ${GITPLANE_BUILD_TIMEOUT}s; the target dir may be locked by other builds)"
    (cd "$ROOT" && timeout "$GITPLANE_BUILD_TIMEOUT" cargo build --release --bin gitplane) >"$TMP/gitplane-build.log" 2>&1 || rc=$?
    if ((rc)); then
        NOTE[gitplane]="cargo build --release --bin gitplane failed (exit $rc): $(grep -m1 -E '^error' "$TMP/gitplane-build.log" || tail -1 "$TMP/gitplane-build.log")"
        return 1
    fi
    BUILD_INFO="cargo build ran ($why)"
}

start_gitplane() {
    local gpid data repo i line sshaddr=""
    build_gitplane || return 1
    [[ -x $GITPLANE_BIN ]] || { NOTE[gitplane]="binary $GITPLANE_BIN missing (GITPLANE_BUILD=$GITPLANE_BUILD)"; return 1; }
    data="$TMP/gitplane-data"
    mkdir -p "$data"
    if ! timeout 60 "$GITPLANE_BIN" --data-dir "$data" repo create bench/fixture --public >"$TMP/gitplane-create.log" 2>&1; then
        NOTE[gitplane]="\`gitplane repo create bench/fixture --public\` failed: $(tail -2 "$TMP/gitplane-create.log" | tr '\n' ' ')"
        return 1
    fi
    repo="$data/repos/$REPO_PATH"
    [[ -d $repo/objects ]] || { NOTE[gitplane]="repo create did not make $repo"; return 1; }
    # The fixture's exact objects and refs (same pack, bitmap and refs as sshd serves).
    rm -rf "$repo/objects" "$repo/refs" "$repo/packed-refs"
    cp -a "$TMP/root/$REPO_PATH/refs" "$TMP/root/$REPO_PATH/packed-refs" "$TMP/root/$REPO_PATH/HEAD" "$repo/"
    copy_objects "$TMP/root/$REPO_PATH/objects" "$repo/objects"
    "$GITPLANE_BIN" --data-dir "$data" serve --http-listen 127.0.0.1:0 --ssh-listen 127.0.0.1:0 \
        --rpc-listen 127.0.0.1:0 --shards "$GITPLANE_SHARDS" \
        >"$TMP/gitplane.out" 2>"$TMP/gitplane.log" </dev/null &
    gpid=$!
    PIDS+=("$gpid")
    for ((i = 0; i < GITPLANE_READY_TIMEOUT * 10; i++)); do
        is_running "$gpid" || break
        grep -qx 'gitplane: ready' "$TMP/gitplane.out" 2>/dev/null && break
        sleep 0.1
    done
    if ! grep -qx 'gitplane: ready' "$TMP/gitplane.out" 2>/dev/null; then
        NOTE[gitplane]="gitplane serve not ready within ${GITPLANE_READY_TIMEOUT}s: $(tail -2 "$TMP/gitplane.log" | tr '\n' ' ')"
        return 1
    fi
    line=$(grep -m1 '^gitplane: ssh listening on ' "$TMP/gitplane.out" || true)
    sshaddr=${line#gitplane: ssh listening on }
    [[ -n $line && $sshaddr == 127.0.0.1:* ]] || { NOTE[gitplane]="no 'gitplane: ssh listening on 127.0.0.1:PORT' line: $(head -5 "$TMP/gitplane.out" | tr '\n' ' ')"; return 1; }
    GITPLANE_HTTP=$(sed -n 's/^gitplane: http listening on //p' "$TMP/gitplane.out" | head -1)
    [[ -s $data/ssh_host_ed25519_key.pub ]] || { NOTE[gitplane]="no host key at $data/ssh_host_ed25519_key.pub"; return 1; }
    printf '[127.0.0.1]:%s %s\n' "${sshaddr##*:}" "$(cut -d' ' -f1-2 "$data/ssh_host_ed25519_key.pub")" >>"$TMP/known_hosts"
    if ! timeout 60 "$GITPLANE_BIN" --data-dir "$data" key add admin "$TMP/client_key.pub" >"$TMP/gitplane-key.log" 2>&1; then
        NOTE[gitplane]="\`gitplane key add admin KEY.pub\` failed: $(tail -2 "$TMP/gitplane-key.log" | tr '\n' ' ')"
        return 1
    fi
    GITPLANE_PORT=${sshaddr##*:}
    GITPLANE_ROOT=$gpid
    GITPLANE_LONG=$(tree_pids "$gpid")
    GITPLANE_URL="ssh://git@127.0.0.1:$GITPLANE_PORT/$REPO_PATH"
    GITPLANE_DEST="git@127.0.0.1"
    GITPLANE_RREPO="$REPO_PATH"
    log "gitplane ssh on $sshaddr (pid $gpid; $(cat "$TMP/gitplane-key.log"))"
}

gitplane_metrics() { # the SSH handshake counters, for the notes
    [[ -n ${GITPLANE_HTTP:-} ]] || return 0
    curl -s --max-time 5 --noproxy '*' "http://$GITPLANE_HTTP/metrics" 2>/dev/null |
        grep -E '^gitplane_ssh_(handshakes_total|auth_rejected_total)' | tr '\n' ';' | sed 's/;$//; s/;/; /g' || true
}

bench_server() { # SERVER
    local s=$1 p
    case $s in
    sshd)
        start_sshd || { log "sshd: ${NOTE[sshd]}"; kill_started; return 0; }
        if ! p=$(probe "$SSHD_URL"); then
            NOTE[sshd]="ls-remote over ssh against sshd failed: $(tail -2 "$TMP/probe.err" | tr '\n' ' ')"
            log "sshd: ${NOTE[sshd]}"; kill_started; return 0
        fi
        IFS='|' read -r proto kex cipher <<<"$p"
        LABEL[sshd]="OpenSSH sshd + git-shell ($proto)"
        EXTRA[sshd]="kex $kex, cipher $cipher"
        log "sshd: ls-remote ok, protocol $proto, kex $kex, cipher $cipher"
        measure sshd "$SSHD_URL" "$SSHD_DEST" "$SSHD_RREPO" "$SSHD_PORT" "$SSHD_ROOT" "$SSHD_LONG"
        is_running "$SSHD_ROOT" || NOTE[sshd]="sshd exited during the run"
        EXTRA[sshd]+="; sshd log: 'beginning MaxStartups throttling' $(grep -c 'beginning MaxStartups throttling' "$TMP/sshd/sshd.log" || true) times (sshd logs only the first drop of each episode)"
        ;;
    gitplane)
        start_gitplane || { log "gitplane: ${NOTE[gitplane]}"; kill_started; return 0; }
        if ! p=$(probe "$GITPLANE_URL"); then
            NOTE[gitplane]="gitplane started but \`git ls-remote $GITPLANE_URL\` failed or returned other refs: $(tail -2 "$TMP/probe.err" | tr '\n' ' ')"
            log "gitplane: ${NOTE[gitplane]}"; kill_started; return 0
        fi
        IFS='|' read -r proto kex cipher <<<"$p"
        LABEL[gitplane]="gitplane ($proto)"
        EXTRA[gitplane]="kex $kex, cipher $cipher"
        log "gitplane: ls-remote ok, protocol $proto, kex $kex, cipher $cipher"
        measure gitplane "$GITPLANE_URL" "$GITPLANE_DEST" "$GITPLANE_RREPO" "$GITPLANE_PORT" "$GITPLANE_ROOT" "$GITPLANE_LONG"
        EXTRA[gitplane]+="; metrics at the end: $(gitplane_metrics)"
        is_running "$GITPLANE_ROOT" || NOTE[gitplane]="gitplane exited during the run: $(tail -2 "$TMP/gitplane.log" | tr '\n' ' ')"
        ;;
    *) die "unknown server: $s" ;;
    esac
    kill_started
}

# ---------------------------------------------------------------- main
ensure_packages
mkdir -p "$(dirname "$OUT")"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gitplane-compare-ssh.XXXXXX")
chmod 755 "$TMP" # sshd's unprivileged child and git-shell only need to traverse it
mkdir -p "$TMP/work" "$TMP/root/bench"
RESULTS_JSONL="${OUT%.md}.jsonl"
: >"$RESULTS_JSONL"

log "fixture: $FIXTURE_DIR"
"$ROOT/bench/fixture/make_repo.sh" "$FIXTURE_DIR" >"$TMP/fixture.log" 2>&1 || {
    cat "$TMP/fixture.log" >&2
    die "fixture build failed"
}
FIXTURE_INFO=$(grep -E '^fixture: (pack size|main=)' "$TMP/fixture.log" | sed 's/^fixture: //')
log "$FIXTURE_INFO"
served="$TMP/root/$REPO_PATH"
mkdir -p "$served"
cp -a "$FIXTURE_DIR/HEAD" "$FIXTURE_DIR/config" "$FIXTURE_DIR/packed-refs" "$FIXTURE_DIR/refs" "$served/"
copy_objects "$FIXTURE_DIR/objects" "$served/objects"
git --git-dir="$FIXTURE_DIR" for-each-ref --format='%(objectname) %(refname)' >"$TMP/expected-refs"

# One client key and one known_hosts for both servers; strict host key checking.
ssh-keygen -q -t ed25519 -N '' -C bench-client -f "$TMP/client_key"
: >"$TMP/known_hosts"
SSH_BASE="ssh -F /dev/null -i $TMP/client_key -o IdentitiesOnly=yes -o IdentityAgent=none -o UserKnownHostsFile=$TMP/known_hosts -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes -o ControlMaster=no -o ControlPath=none -o ConnectTimeout=10 -o LogLevel=ERROR"
[[ $SSH_KEX == default ]] || SSH_BASE+=" -o KexAlgorithms=$SSH_KEX"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $SERVERS; do
    bench_server "$s"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
versions() {
    printf -- '- date: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf -- '- host: %s, %s cores, kernel %s\n' "$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release 2>/dev/null)" "$(nproc)" "$(uname -r)"
    printf -- '- git: %s (client, git-shell and upload-pack); ssh client: %s\n' "$(git --version | awk '{print $3}')" "$(ssh -V 2>&1)"
    printf -- '- sshd: %s (package %s), MaxStartups/MaxSessions/LoginGraceTime at their defaults\n' \
        "${SSHD_VERSION:-?}" "$(dpkg-query -W -f='${Version}' openssh-server 2>/dev/null || echo '?')"
    local bin_info="not present"
    if [[ -x $GITPLANE_BIN ]]; then
        bin_info="built $(date -u -r "$GITPLANE_BIN" +%Y-%m-%dT%H:%M:%SZ); $BUILD_INFO"
        binary_stale && bin_info+="; OLDER than src/ or Cargo.* at report time"
    fi
    printf -- '- gitplane: %s (%s), --shards %s; worktree HEAD %s\n' "$GITPLANE_BIN" "$bin_info" "$GITPLANE_SHARDS" \
        "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'none')"
    printf -- '- fixture: %s\n' "$(tr '\n' ';' <<<"$FIXTURE_INFO" | sed 's/;$//; s/;/; /g')"
    printf -- '- load average (1/5/15 min) before: %s; after: %s (client and servers share the same cores)\n' "$LOAD_START" "$LOAD_END"
    printf -- '- clones: concurrency %s, clones per level %s, fsck-verified per level %s; sessions: %s per level at concurrency %s; idle: %s connections (%s per 127.0.0.x source), mode %s; client KexAlgorithms: %s\n' \
        "$CONCURRENCY" "${CLONES:-max(2*c, 8)}" "$FSCK_SAMPLES" "$SESSIONS" "$SESSION_CONCURRENCY" "$IDLE_CONNS" "$IDLE_PER_SOURCE" "$IDLE_MODE" "$SSH_KEX"
    local k
    for k in "${!EXTRA[@]}"; do printf -- '- %s: %s\n' "$k" "${EXTRA[$k]}"; done | sort
}

notes_tsv() {
    local k
    for k in "${!NOTE[@]}"; do printf '%s\t%s\n' "$k" "${NOTE[$k]}"; done
}

{
    echo "### Git over SSH: gitplane vs OpenSSH sshd + git-shell"
    echo
    versions
    echo
    notes_tsv | python3 "$LIB/ssh_report.py" "$RESULTS_JSONL" "$CONCURRENCY" "$SESSION_CONCURRENCY"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cat "$OUT"
log "written: $OUT (raw: $RESULTS_JSONL)"
