# Shared shell of the side-by-side benchmarks; sourced, not run:
#   bench/compare.sh, bench/compare-http.sh, bench/compare-ssh.sh,
#   loadtest/compare-git-clone.sh, loadtest/compare-ssh-clone.sh
#
#   LOG_TAG=compare source "$ROOT/bench/lib/common.sh"
#   bench_init                      # environment, traps, $TMP
#
# What it gives:
#   log / die; bench_init (loopback-only environment, git config off, cleanup trap, $TMP);
#   ensure_packages CMD=PKG...; free_port, wait_port, wait_children;
#   prepare_fixture (the served copy, hard-linked, and $TMP/expected-refs);
#   run_bg (a client in the background, so a signal cleans up at once);
#   server_cgroup NAME (a cgroup of our own per server, for its CPU counter; see servertree.py);
#   spawn (start a server process, in that cgroup, remembered by pid);
#   gitplane_build, start_gitplane, gitplane_fixture, gitplane_add_key;
#   start_nginx (nginx + fcgiwrap + git-http-backend), start_daemon (git daemon),
#   start_sshd (OpenSSH sshd + git-shell), client_ssh_key;
#   kill_started / cleanup: every process started here is stopped by pid (its tree and its
#   cgroup's members too), cgroups and the temp dir are removed, on any exit.
# Everything listens on 127.0.0.1 only.
# shellcheck shell=bash

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH_LIB="$BENCH_ROOT/bench/lib"
SERVERTREE="$BENCH_LIB/servertree.py"
REPO_PATH=bench/fixture.git # OWNER/NAME.git as every server serves the fixture
LOG_TAG=${LOG_TAG:-bench}
KEEP_TMP=${KEEP_TMP:-0}
# Defaults every script shares (the environment overrides them).
FIXTURE_DIR=${FIXTURE_DIR:-$BENCH_ROOT/bench/fixture/cache/fixture.git}
GITPLANE_BIN=${GITPLANE_BIN:-$BENCH_ROOT/target/release/gitplane}
GITPLANE_SHARDS=${GITPLANE_SHARDS:-2} # one per core
NGINX_WORKERS=${NGINX_WORKERS:-2}     # one per core

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

TMP=""
PIDS=()          # server processes started here (killed by pid, with their trees)
CGROUPS=()       # cgroups made here (emptied and removed on exit)
SERVER_CG=""     # the cgroup spawn() puts new server processes in ("" = none)
SERVER_WRAP=()   # a prefix for spawned servers, e.g. (taskset -c 1)
CLIENT_PID=""    # the running client/driver, if any
MADE_RUN_SSHD=0
declare -A NOTE  # server -> why it was not measured (or broke mid-run)

# Loopback only: never let a proxy or an agent from the environment carry the traffic, and
# keep the user's and the system's git config out of clients and servers.
bench_init() { # [TMP_PREFIX]
    export PATH="$PATH:/usr/sbin:/sbin"
    unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY GIT_PROXY_COMMAND
    unset SSH_AUTH_SOCK SSH_AGENT_PID GIT_SSH GIT_SSH_COMMAND GIT_SSH_VARIANT
    export no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost
    export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0
    export LC_ALL=C
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/${1:-gitplane-bench}.XXXXXX")
    chmod 755 "$TMP" # sshd's unprivileged child and git-shell only need to traverse it
}

# ---------------------------------------------------------------- processes
is_running() { # PID: exists and is not a zombie
    local st
    st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && ${st:0:1} != Z ]]
}

tree_pids() { python3 "$SERVERTREE" tree "$@" | paste -sd, -; }

cg_pids() { # CGROUP_DIR: its member pids, comma-separated
    [[ -r $1/cgroup.procs ]] && paste -sd, - <"$1/cgroup.procs"
}

stop_pids() { # PID...: TERM, up to 5 s, then KILL
    local pid i alive
    (($#)) || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "$@"; do is_running "$pid" && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
}

kill_started() {
    local all=() cg pid more=()
    if ((${#PIDS[@]})); then
        # The started processes and everything below them (workers, per-connection
        # children, in-flight git processes), each by pid.
        IFS=, read -r -a all <<<"$(tree_pids "${PIDS[@]}" 2>/dev/null || true)"
        all+=("${PIDS[@]}")
    fi
    for cg in "${CGROUPS[@]}"; do # and whatever was reparented away from that tree
        IFS=, read -r -a more <<<"$(cg_pids "$cg" || true)"
        all+=("${more[@]}")
    done
    stop_pids "${all[@]}"
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    for cg in "${CGROUPS[@]}"; do # empty once the killed members are gone
        for pid in 1 2 3 4 5 6 7 8 9 10; do rmdir "$cg" 2>/dev/null && break; sleep 0.2; done
        [[ -d $cg ]] && log "could not remove cgroup $cg: $(cg_pids "$cg")"
    done
    CGROUPS=()
    SERVER_CG=""
}

cleanup() {
    local rc=$? p cps
    trap - EXIT INT TERM
    if [[ -n $CLIENT_PID ]]; then
        # The driver (timeout -> python3 -> clients) and everything below it.
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

run_bg() { # OUTFILE ERRFILE TIMEOUT CMD...: in the background + wait, so TERM/INT cleans up at once
    local out=$1 err=$2 t=$3 rc=0
    shift 3
    timeout "$t" "$@" >"$out" 2>"$err" &
    CLIENT_PID=$!
    wait "$CLIENT_PID" || rc=$?
    CLIENT_PID=""
    return $rc
}

# A cgroup of our own for the next server, so that its CPU counter covers every process it
# starts, whoever reaps them (fcgiwrap auto-reaps its CGI children).  cgroup v2 (cpu.stat is
# there without any controller) where it is mounted, else v1 cpuacct.  Moving a process there
# changes nothing about its scheduling: no controller limits are set.  Sets SERVER_CG
# ("" when neither can be made: the /proc tree method is then the only CPU figure).
server_cgroup() { # NAME
    local base d
    SERVER_CG=""
    [[ ${BENCH_CGROUP:-1} == 1 ]] || return 0
    for base in /sys/fs/cgroup /sys/fs/cgroup/unified /sys/fs/cgroup/cpuacct; do
        if [[ -f $base/cgroup.procs && -w $base && ( -f $base/cpu.stat || -f $base/cpuacct.usage ) ]]; then
            d="$base/gitplane-bench-$$-$1"
            mkdir "$d" 2>/dev/null || continue
            if [[ -f $d/cpu.stat || -f $d/cpuacct.usage ]]; then
                CGROUPS+=("$d")
                SERVER_CG=$d
                return 0
            fi
            rmdir "$d" 2>/dev/null
        fi
    done
}

# pin_server_cpu: when there are two or more CPUs, spawned servers on CPU 1 (SERVER_WRAP)
# and clients meant for CPU 0 (CLIENT_CPU, for the caller's taskset).
pin_server_cpu() {
    if (($(nproc) >= 2)); then SERVER_CPU=1 CLIENT_CPU=0; else SERVER_CPU=0 CLIENT_CPU=0; fi
    SERVER_WRAP=(taskset -c "$SERVER_CPU")
}

SPAWNED=""
spawn() { # OUT ERR CMD...: a server process in the background (in $SERVER_CG), pid in SPAWNED
    local out=$1 err=$2
    shift 2
    if [[ -n $SERVER_CG ]]; then
        (echo "$BASHPID" >"$SERVER_CG/cgroup.procs" && exec "${SERVER_WRAP[@]}" "$@") >"$out" 2>"$err" </dev/null &
    else
        "${SERVER_WRAP[@]}" "$@" >"$out" 2>"$err" </dev/null &
    fi
    SPAWNED=$!
    PIDS+=("$SPAWNED")
}

# ---------------------------------------------------------------- packages
# ensure_packages CMD=PKG[|ALT]...: install (apt-get, as root) the package of each missing
# command; "|ALT" is tried when PKG is unknown (nginx-light|nginx).  apt-get update runs once,
# only when something is missing; a temporary policy-rc.d keeps the packages from starting
# system services (nginx on :80, ssh on :22).
ensure_packages() {
    local spec cmd pkg missing=() pkgs=() tmp_policy=0 rc=0
    command -v git >/dev/null || die "git not found"
    for spec in python3=python3 timeout=coreutils "$@"; do
        cmd=${spec%%=*}
        pkg=${spec#*=}
        if [[ $cmd == /* ]]; then [[ -x $cmd ]] && continue; else command -v "$cmd" >/dev/null && continue; fi
        missing+=("$cmd")
        pkgs+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install ${pkgs[*]} or run as root"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get"
    log "installing for: ${missing[*]} (apt-get update once)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    local i
    for i in "${!pkgs[@]}"; do
        pkg=${pkgs[$i]}
        if [[ $pkg == *"|"* ]]; then
            if apt-cache show "${pkg%%|*}" >/dev/null 2>&1; then pkg=${pkg%%|*}; else pkg=${pkg#*|}; fi
        fi
        pkgs[i]=$pkg
    done
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        tmp_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2 || rc=$?
    ((tmp_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${pkgs[*]} failed"
    for cmd in "${missing[@]}"; do
        if [[ $cmd == /* ]]; then [[ -x $cmd ]] || die "$cmd still missing"; else command -v "$cmd" >/dev/null || die "$cmd still missing"; fi
    done
}

# ---------------------------------------------------------------- ports
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # PORT TIMEOUT PID [ssh]: until the port accepts (ssh: and sends an SSH version line)
    local port=$1 t=$2 pid=$3 want=${4:-} i
    for ((i = 0; i < t * 10; i++)); do
        is_running "$pid" || return 1
        if python3 - "$port" "$want" 2>/dev/null <<'PY'; then
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5)
s.settimeout(1)
ok = sys.argv[2] != "ssh" or s.recv(64).startswith(b"SSH-2.0-")
s.close()
sys.exit(0 if ok else 1)
PY
            return 0
        fi
        sleep 0.1
    done
    return 1
}

wait_children() { # PID COUNT TIMEOUT: until PID has COUNT direct children
    local i n
    for ((i = 0; i < $3 * 10; i++)); do
        n=$(awk -v p="$1" '{ sub(/^.*\) /, ""); split($0, f, " "); if (f[2] == p) n++ } END { print n + 0 }' /proc/[0-9]*/stat 2>/dev/null)
        ((n >= $2)) && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- fixture
copy_objects() { # SRC DST: hard links when possible (same inodes, same page cache)
    cp -al "$1" "$2" 2>/dev/null || { rm -rf "$2"; cp -a "$1" "$2"; }
}

# Builds the fixture if needed (bench/fixture/make_repo.sh) and the served copy
# $TMP/root/$REPO_PATH (hard links to its pack); writes $TMP/expected-refs, sets FIXTURE_INFO.
prepare_fixture() { # FIXTURE_DIR
    local fixture=$1 served="$TMP/root/$REPO_PATH"
    log "fixture: $fixture"
    "$BENCH_ROOT/bench/fixture/make_repo.sh" "$fixture" >"$TMP/fixture.log" 2>&1 || {
        cat "$TMP/fixture.log" >&2
        die "fixture build failed"
    }
    FIXTURE_INFO=$(grep -E '^fixture: (pack size|main=)' "$TMP/fixture.log" | sed 's/^fixture: //' | paste -sd';' - | sed 's/;/; /g')
    log "$FIXTURE_INFO"
    mkdir -p "$served"
    cp -a "$fixture/HEAD" "$fixture/config" "$fixture/packed-refs" "$fixture/refs" "$served/"
    copy_objects "$fixture/objects" "$served/objects"
    git --git-dir="$fixture" for-each-ref --format='%(objectname) %(refname)' >"$TMP/expected-refs"
}

# probe URL [git options...]: `git ls-remote --refs` must list exactly the fixture's refs.
# Sets PROBE_PROTO (v2 or v0, from the packet trace) and, when GIT_SSH_COMMAND has -v,
# PROBE_KEX and PROBE_CIPHER (from ssh's debug output in $TMP/probe.err).
probe() {
    local url=$1 trace="$TMP/probe.trace" refs
    shift
    PROBE_PROTO="" PROBE_KEX="" PROBE_CIPHER=""
    refs=$(GIT_TRACE_PACKET="$trace" timeout 60 git "$@" ls-remote --refs "$url" 2>"$TMP/probe.err" |
        awk '{print $1 " " $2}') || { tail -5 "$TMP/probe.err" >&2; return 1; }
    if [[ "$refs" != "$(awk '{print $1 " " $2}' "$TMP/expected-refs")" ]]; then
        log "ls-remote $url: refs differ from the fixture"
        return 1
    fi
    if grep -q 'version 2' "$trace"; then PROBE_PROTO=v2; else PROBE_PROTO=v0; fi
    # ssh's debug lines end in \r\n.
    PROBE_KEX=$(tr -d '\r' <"$TMP/probe.err" | sed -n 's/.*debug1: kex: algorithm: \([^ ]*\).*/\1/p' | head -1)
    PROBE_CIPHER=$(tr -d '\r' <"$TMP/probe.err" | sed -n 's/.*debug1: kex: server->client cipher: \([^ ]*\).*/\1/p' | head -1)
    rm -f "$trace"
}

# ---------------------------------------------------------------- gitplane
binary_stale() { # BIN: sources (the server's, the wire crate's, the load generator's) newer than BIN?
    [[ -n $(find "$BENCH_ROOT/src" "$BENCH_ROOT/wire/src" "$BENCH_ROOT/loadtest/src" "$BENCH_ROOT/build.rs" \
        "$BENCH_ROOT/Cargo.toml" "$BENCH_ROOT/Cargo.lock" -newer "$1" -print -quit 2>/dev/null) ]]
}

# gitplane_build MODE BIN PACKAGE...: `cargo build --release -p PACKAGE...` when MODE says so
# (missing: BIN absent; auto: absent or older than the sources (binary_stale); always; never).
# Returns non-zero with BUILD_FAILED set when the build fails; BUILT[BIN] says why it ran.
declare -A BUILT
BUILD_FAILED=""
gitplane_build() {
    local mode=$1 bin=$2 why="" rc=0 p args=()
    shift 2
    case $mode in
    never) ;;
    always) why="build=always" ;;
    missing) [[ -x $bin ]] || why="binary missing" ;;
    auto)
        if [[ ! -x $bin ]]; then why="binary missing"
        elif binary_stale "$bin"; then why="binary older than the sources"; fi
        ;;
    *) die "bad build mode: $mode (auto, missing, always, never)" ;;
    esac
    [[ -n $why ]] || return 0
    for p in "$@"; do args+=(-p "$p"); done
    log "cargo build --release ${args[*]} ($why; timeout ${GITPLANE_BUILD_TIMEOUT:-1800}s; the target dir may be locked by other builds)"
    (cd "$BENCH_ROOT" && timeout "${GITPLANE_BUILD_TIMEOUT:-1800}" cargo build --release "${args[@]}") >"$TMP/build.log" 2>&1 || rc=$?
    if ((rc)); then
        BUILD_FAILED="cargo build --release ${args[*]} failed (exit $rc): $(grep -m1 -E '^error' "$TMP/build.log" || tail -1 "$TMP/build.log")"
        return 1
    fi
    BUILT[$bin]="cargo build ran ($why)"
}

# start_gitplane BIN SHARDS [serve flags...]: `gitplane serve` on free 127.0.0.1 ports (HTTP,
# SSH, gRPC) with a fresh data dir; waits for "gitplane: ready".  Sets GITPLANE_PID,
# GITPLANE_DATA, GITPLANE_HTTP and GITPLANE_SSH (HOST:PORT), or NOTE[gitplane] and returns 1.
start_gitplane() {
    local bin=$1 shards=$2 i data
    shift 2
    [[ -x $bin ]] || { NOTE[gitplane]="binary $bin missing"; return 1; }
    data=$(mktemp -d "$TMP/gitplane-data.XXXX")
    spawn "$data.out" "$data.log" "$bin" --data-dir "$data" serve --http-listen 127.0.0.1:0 \
        --ssh-listen 127.0.0.1:0 --rpc-listen 127.0.0.1:0 --shards "$shards" "$@"
    GITPLANE_PID=$SPAWNED
    GITPLANE_DATA=$data
    for ((i = 0; i < ${GITPLANE_READY_TIMEOUT:-30} * 10; i++)); do
        is_running "$GITPLANE_PID" || break
        grep -qx 'gitplane: ready' "$data.out" 2>/dev/null && break
        sleep 0.1
    done
    if ! grep -qx 'gitplane: ready' "$data.out" 2>/dev/null; then
        NOTE[gitplane]="gitplane serve not ready within ${GITPLANE_READY_TIMEOUT:-30}s: $(tail -2 "$data.log" | tr '\n' ' ')"
        return 1
    fi
    GITPLANE_HTTP=$(sed -n 's/^gitplane: http listening on //p' "$data.out" | head -1)
    GITPLANE_SSH=$(sed -n 's/^gitplane: ssh listening on //p' "$data.out" | head -1)
    [[ $GITPLANE_HTTP == 127.0.0.1:* && $GITPLANE_SSH == 127.0.0.1:* ]] || {
        NOTE[gitplane]="no 'gitplane: http/ssh listening on 127.0.0.1:PORT' lines: $(head -5 "$data.out" | tr '\n' ' ')"
        return 1
    }
    log "gitplane pid $GITPLANE_PID: http $GITPLANE_HTTP, ssh $GITPLANE_SSH"
}

gitplane_log() { cat "$GITPLANE_DATA.log"; }

# gitplane_fixture BIN: the public repository bench/fixture with the served fixture's exact
# objects (hard links: same pack, bitmap) and refs.  With GITPLANE_IMPORT=push it gets them the
# way an operator's import does instead: `git push --mirror` over HTTP, then the server's own
# housekeeping (waited for: a bitmap, a commit-graph, no pass running); the push's wall time and
# the housekeeping pass's duration go to the log and to HOUSEKEEPING_INFO.
gitplane_fixture() {
    local bin=$1 repo="$GITPLANE_DATA/repos/$REPO_PATH" src="$TMP/root/$REPO_PATH"
    if ! timeout 60 "$bin" --data-dir "$GITPLANE_DATA" repo create bench/fixture --public >"$TMP/gitplane-create.log" 2>&1; then
        NOTE[gitplane]="\`gitplane repo create bench/fixture --public\` failed: $(tail -2 "$TMP/gitplane-create.log" | tr '\n' ' ')"
        return 1
    fi
    [[ -d $repo/objects ]] || { NOTE[gitplane]="repo create did not make $repo"; return 1; }
    if [[ ${GITPLANE_IMPORT:-copy} == push ]]; then
        gitplane_import_by_push "$bin" "$repo" "$src"
        return
    fi
    rm -rf "$repo/objects" "$repo/refs" "$repo/packed-refs"
    cp -a "$src/refs" "$src/packed-refs" "$src/HEAD" "$repo/"
    copy_objects "$src/objects" "$repo/objects"
}

# gitplane_import_by_push BIN REPO SRC: see gitplane_fixture.
gitplane_import_by_push() {
    local bin=$1 repo=$2 src=$3 pw t0 t1 i metrics
    "$bin" --data-dir "$GITPLANE_DATA" repo grant bench/fixture admin write >/dev/null || {
        NOTE[gitplane]="repo grant bench/fixture admin write failed"
        return 1
    }
    pw=$(cat "$GITPLANE_DATA/initial-admin-password")
    t0=$(date +%s.%N)
    GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null timeout 600 git --git-dir="$src" push -q --mirror \
        "http://admin:$pw@$GITPLANE_HTTP/bench/fixture.git" 2>"$TMP/import.err" || {
        NOTE[gitplane]="push --mirror failed: $(tail -2 "$TMP/import.err" | tr '\n' ' ')"
        return 1
    }
    t1=$(date +%s.%N)
    for ((i = 0; i < 6000; i++)); do
        metrics=$(curl -s "http://$GITPLANE_HTTP/metrics")
        if ls "$repo"/objects/pack/*.bitmap >/dev/null 2>&1 && [[ -e $repo/objects/info/commit-graphs/commit-graph-chain ]] &&
            grep -qx 'gitplane_housekeeping_running 0' <<<"$metrics"; then
            break
        fi
        sleep 0.1
    done
    HOUSEKEEPING_INFO="push --mirror $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') s; housekeeping: $(grep -E '^gitplane_housekeeping_duration_seconds_sum' <<<"$metrics" | grep -v ' 0$' | sed 's/gitplane_housekeeping_duration_seconds_sum//' | paste -sd' ' -) s; packs: $(ls "$repo"/objects/pack/ | tr '\n' ' ')"
    log "gitplane import by push: $HOUSEKEEPING_INFO"
}

# gitplane_add_key BIN USER KEY.pub KNOWN_HOSTS: registers the client key and appends the
# server's host key for [127.0.0.1]:PORT.
gitplane_add_key() {
    local bin=$1 user=$2 pub=$3 kh=$4
    [[ -s $GITPLANE_DATA/ssh_host_ed25519_key.pub ]] || { NOTE[gitplane]="no host key at $GITPLANE_DATA/ssh_host_ed25519_key.pub"; return 1; }
    printf '[127.0.0.1]:%s %s\n' "${GITPLANE_SSH##*:}" "$(cut -d' ' -f1-2 "$GITPLANE_DATA/ssh_host_ed25519_key.pub")" >>"$kh"
    if ! timeout 60 "$bin" --data-dir "$GITPLANE_DATA" key add "$user" "$pub" >"$TMP/gitplane-key.log" 2>&1; then
        NOTE[gitplane]="\`gitplane key add $user KEY.pub\` failed: $(tail -2 "$TMP/gitplane-key.log" | tr '\n' ' ')"
        return 1
    fi
}

# make_small_repo BIN OWNER/NAME: the `small` repository of loadtest/compare-*-clone.sh
# (20 commits of generated text files, a 0.1 MB pack), created and pushed in $GITPLANE_DATA.
make_small_repo() {
    local bin=$1 name=$2 w="$TMP/small-work" i
    "$bin" --data-dir "$GITPLANE_DATA" repo create "$name" >/dev/null
    mkdir -p "$w"
    git -C "$w" init -q -b main
    for i in $(seq 20); do
        seq "$i" 2000 | sed "s/^/line $i /" >"$w/file$i.txt"
        git -C "$w" add . && git -C "$w" -c user.name=b -c user.email=b@x commit -q -m "c$i"
    done
    git -C "$w" push -q "$GITPLANE_DATA/repos/$name.git" main
}

# client_cpu CMD...: runs CMD (stdout discarded), prints "CPU WALL": user + system seconds of
# CMD and every process it waited for (getrusage(RUSAGE_CHILDREN)), and its wall time.
client_cpu() {
    python3 - "$@" <<'PY'
import resource, subprocess, sys, time
t = time.monotonic()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{r.ru_utime + r.ru_stime:.3f} {time.monotonic() - t:.3f}")
PY
}

# ---------------------------------------------------------------- nginx + fcgiwrap
# start_nginx WORKERS FCGI_CHILDREN: nginx (daemon off, generated config) in front of
# `fcgiwrap -c N` on a unix socket, running git-http-backend on $TMP/root.  Sets NGINX_URL,
# NGINX_ROOTS (master,fcgiwrap), NGINX_LONG (the long-lived pids), NGINX_CPU_DIR.
#
# Without a server cgroup, CPU comes from the /proc tree, and fcgiwrap ignores SIGCHLD, so its
# CGI children are auto-reaped and their CPU never reaches its cutime: SCRIPT_FILENAME is then
# a shim that runs git-http-backend as its child, waits, and appends bash's `times` (self
# line, children line) to $NGINX_CPU_DIR/PID, which servertree.py adds (the shim's own bash,
# ~2 ms CPU per request, is not counted).  With a cgroup its counter sees every CGI process,
# and nginx runs git-http-backend directly (NGINX_CPU_DIR empty).
start_nginx() {
    local workers=$1 children=$2 dir="$TMP/nginx" sock="$TMP/fcgiwrap.sock" be script port fpid npid i
    mkdir -p "$dir/tmp"
    be="$(git --exec-path)/git-http-backend"
    [[ -x $be ]] || { NOTE[nginx]="git-http-backend not found at $be"; return 1; }
    script=$be
    NGINX_CPU_DIR=""
    if [[ -z $SERVER_CG ]]; then
        NGINX_CPU_DIR="$TMP/cgi-times"
        mkdir -p "$NGINX_CPU_DIR"
        script="$TMP/git-http-backend-shim"
        cat >"$script" <<EOF
#!/bin/bash
"$be"
rc=\$?
times >>"$NGINX_CPU_DIR/\$\$"
exit "\$rc"
EOF
        chmod +x "$script"
    fi
    spawn "$TMP/fcgiwrap.log" "$TMP/fcgiwrap.log" fcgiwrap -s "unix:$sock" -c "$children"
    fpid=$SPAWNED
    for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.1; done
    [[ -S $sock ]] || { NOTE[nginx]="fcgiwrap did not create its socket"; return 1; }
    port=$(free_port)
    local user_line=""
    [[ $(id -u) == 0 ]] && user_line="user root;"
    cat >"$dir/nginx.conf" <<EOF
# generated by bench/lib/common.sh (start_nginx)
$user_line
worker_processes $workers;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/client;
    fastcgi_temp_path $dir/tmp/fastcgi;
    proxy_temp_path $dir/tmp/proxy;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen 127.0.0.1:$port;
        client_max_body_size 0;
        location / {
            fastcgi_pass unix:$sock;
            # Stream the pack to the client instead of spooling it to disk.
            fastcgi_buffering off;
            fastcgi_read_timeout 600s;
            fastcgi_param SCRIPT_FILENAME $script;
            fastcgi_param GIT_PROJECT_ROOT $TMP/root;
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param GIT_PROTOCOL \$http_git_protocol;
            fastcgi_param PATH_INFO \$uri;
            fastcgi_param QUERY_STRING \$query_string;
            fastcgi_param REQUEST_METHOD \$request_method;
            fastcgi_param CONTENT_TYPE \$content_type;
            fastcgi_param CONTENT_LENGTH \$content_length;
            fastcgi_param HTTP_CONTENT_ENCODING \$http_content_encoding;
            fastcgi_param REMOTE_ADDR \$remote_addr;
            fastcgi_param REMOTE_USER \$remote_user;
            fastcgi_param SERVER_PROTOCOL \$server_protocol;
            fastcgi_param GATEWAY_INTERFACE CGI/1.1;
        }
    }
}
EOF
    spawn "$dir/stdout.log" "$dir/stdout.log" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
    npid=$SPAWNED
    if ! wait_port "$port" 20 "$npid"; then
        NOTE[nginx]="nginx did not start: $(tail -3 "$dir/error.log" "$dir/stdout.log" 2>/dev/null | tr '\n' ' ')"
        return 1
    fi
    wait_children "$npid" "$workers" 10 || log "nginx: fewer workers than $workers"
    wait_children "$fpid" "$children" 10 || log "fcgiwrap: fewer children than $children"
    NGINX_URL="http://127.0.0.1:$port/$REPO_PATH"
    NGINX_ROOTS="$npid,$fpid"
    NGINX_LONG=$(tree_pids "$npid" "$fpid")
    log "nginx on 127.0.0.1:$port (master $npid, fcgiwrap $fpid with $children children)"
}

# ---------------------------------------------------------------- git daemon
# start_daemon: git-daemon itself (not the `git` wrapper, so that its pid is the one that
# forks and reaps the per-connection children).  Sets DAEMON_URL, DAEMON_PID.
start_daemon() {
    local port
    port=$(free_port)
    spawn "$TMP/git-daemon.log" "$TMP/git-daemon.log" "$(git --exec-path)/git-daemon" --export-all \
        --base-path="$TMP/root" --reuseaddr --listen=127.0.0.1 --port="$port" --max-connections=0 \
        --informative-errors
    DAEMON_PID=$SPAWNED
    if ! wait_port "$port" 20 "$DAEMON_PID"; then
        NOTE[git-daemon]="git daemon did not start: $(tail -3 "$TMP/git-daemon.log" | tr '\n' ' ')"
        return 1
    fi
    DAEMON_URL="git://127.0.0.1:$port/$REPO_PATH"
    log "git daemon on 127.0.0.1:$port (pid $DAEMON_PID)"
}

# ---------------------------------------------------------------- OpenSSH sshd + git-shell
# client_ssh_key: one Ed25519 client key ($TMP/client_key) and an empty known_hosts
# ($TMP/known_hosts) for every server of the run.
client_ssh_key() {
    ssh-keygen -q -t ed25519 -N '' -C bench-client -f "$TMP/client_key"
    : >"$TMP/known_hosts"
}

# start_sshd [sshd_config lines...]: our own `sshd -D -e -f CONFIG` on a free 127.0.0.1 port
# (the system ssh service is never started), as root (privilege separation needs it), with the
# client key in authorized_keys behind the forced command
# `git-shell -c "$SSH_ORIGINAL_COMMAND"` (no pty, no forwarding).  Extra arguments are appended
# to the config (e.g. "MaxStartups 256").  Appends its host key to $TMP/known_hosts; sets
# SSHD_PORT, SSHD_PID, SSHD_USER, SSHD_URL (the fixture by absolute path), SSHD_VERSION,
# SSHD_CONFIG.
start_sshd() {
    local dir="$TMP/sshd" user line root_line=""
    mkdir -p "$dir"
    [[ $(id -u) == 0 ]] || { NOTE[sshd]="sshd with privilege separation needs root (run the script as root)"; return 1; }
    if [[ ! -d /run/sshd ]]; then
        mkdir -m 0755 /run/sshd
        MADE_RUN_SSHD=1
    fi
    [[ -f $dir/ssh_host_ed25519_key ]] || ssh-keygen -q -t ed25519 -N '' -C bench-sshd-host -f "$dir/ssh_host_ed25519_key"
    user=$(id -un)
    printf 'command="git-shell -c \\"$SSH_ORIGINAL_COMMAND\\"",no-port-forwarding,no-X11-forwarding,no-agent-forwarding,no-pty %s\n' \
        "$(cat "$TMP/client_key.pub")" >"$dir/authorized_keys"
    chmod 600 "$dir/authorized_keys"
    SSHD_PORT=$(free_port)
    [[ $user == root ]] && root_line="PermitRootLogin forced-commands-only"
    SSHD_CONFIG="$dir/sshd_config"
    cat >"$SSHD_CONFIG" <<EOF
# generated by bench/lib/common.sh (start_sshd)
Port $SSHD_PORT
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
EOF
    for line in "$@"; do printf '%s\n' "$line" >>"$SSHD_CONFIG"; done
    /usr/sbin/sshd -t -f "$SSHD_CONFIG" 2>"$dir/check.log" || {
        NOTE[sshd]="sshd -t rejected the config: $(tail -2 "$dir/check.log" | tr '\n' ' ')"
        return 1
    }
    spawn "$dir/sshd.log" "$dir/sshd.log" /usr/sbin/sshd -D -e -f "$SSHD_CONFIG"
    SSHD_PID=$SPAWNED
    if ! wait_port "$SSHD_PORT" 20 "$SSHD_PID" ssh; then
        NOTE[sshd]="sshd did not start: $(tail -3 "$dir/sshd.log" | tr '\n' ' ')"
        return 1
    fi
    printf '[127.0.0.1]:%s %s\n' "$SSHD_PORT" "$(cut -d' ' -f1-2 "$dir/ssh_host_ed25519_key.pub")" >>"$TMP/known_hosts"
    # The version line sshd sends (sshd has no version flag).
    SSHD_VERSION=$(python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2); s.settimeout(2); print(s.recv(128).decode(errors="replace").strip()); s.close()' "$SSHD_PORT" 2>/dev/null || echo '?')
    SSHD_USER=$user
    SSHD_URL="ssh://$user@127.0.0.1:$SSHD_PORT$TMP/root/$REPO_PATH"
    log "sshd on 127.0.0.1:$SSHD_PORT (pid $SSHD_PID)"
}

sshd_log() { cat "$TMP/sshd/sshd.log"; }

# ---------------------------------------------------------------- report
host_facts() { # Markdown list items: date, host, git
    printf -- '- date: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf -- '- host: %s, %s cores, kernel %s\n' "$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release 2>/dev/null)" "$(nproc)" "$(uname -r)"
}

gitplane_bin_info() { # BIN: when it was built, and whether the sources are newer
    local bin=$1 info="not present"
    if [[ -x $bin ]]; then
        info="built $(date -u -r "$bin" +%Y-%m-%dT%H:%M:%SZ); ${BUILT[$bin]:-not built by this run}"
        binary_stale "$bin" && info+="; OLDER than the sources at report time"
    fi
    printf '%s (%s); worktree HEAD %s' "$bin" "$info" "$(git -C "$BENCH_ROOT" rev-parse --short HEAD 2>/dev/null || echo none)"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

notes_tsv() { # NOTE as "server<TAB>reason" lines, for the report scripts
    local k
    for k in "${!NOTE[@]}"; do printf '%s\t%s\n' "$k" "${NOTE[$k]}"; done
}
