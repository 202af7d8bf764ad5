#!/usr/bin/env bash
# Side-by-side Git clone throughput on loopback:
#   gitplane (smart HTTP)  vs  nginx + fcgiwrap + git-http-backend  vs  git daemon
#
#   bench/compare-http.sh
#
# Environment (all optional):
#   CONCURRENCY="1 8 32"   concurrency levels
#   CLONES=N               clones per level (default max(2*c, 8))
#   SERVERS="nginx git-daemon gitplane"   which servers, in this order
#   PROTO_V0=0             1: extra rows with `git -c protocol.version=0` (HTTP servers)
#   OUT=bench/results/http-compare.md    Markdown result (raw JSON lines beside it, .jsonl)
#   FIXTURE_DIR=bench/fixture/cache/fixture.git
#   GITPLANE_BIN=target/release/gitplane
#   GITPLANE_BUILD=missing  missing: `cargo build --release` if the binary is absent;
#                           always: always run it; never: do not build
#   GITPLANE_BUILD_TIMEOUT=1800  GITPLANE_READY_TIMEOUT=30  GITPLANE_SHARDS=2
#   NGINX_WORKERS=2        FCGI_CHILDREN=<max concurrency>  (fcgiwrap serves one request per child)
#   CLONE_TIMEOUT=300      per clone, seconds
#   LEVEL_TIMEOUT=900      per (server, concurrency) batch, seconds
#   FSCK_SAMPLES=1         clones per batch verified with `git fsck` + ref comparison
#   KEEP_TMP=0             1: keep the temp dir (logs) after the run
#
# Everything listens on 127.0.0.1 only, runs as the current user from a temp
# dir, and is stopped (by pid) and removed on exit.  Method: docs/BENCHMARKS.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIB="$ROOT/bench/lib"
DRIVER="$LIB/clone_driver.py"

CONCURRENCY=${CONCURRENCY:-"1 8 32"}
CLONES=${CLONES:-}
SERVERS=${SERVERS:-"nginx git-daemon gitplane"}
PROTO_V0=${PROTO_V0:-0}
OUT=${OUT:-$ROOT/bench/results/http-compare.md}
FIXTURE_DIR=${FIXTURE_DIR:-$ROOT/bench/fixture/cache/fixture.git}
GITPLANE_BIN=${GITPLANE_BIN:-$ROOT/target/release/gitplane}
GITPLANE_BUILD=${GITPLANE_BUILD:-missing}
GITPLANE_BUILD_TIMEOUT=${GITPLANE_BUILD_TIMEOUT:-1800}
GITPLANE_READY_TIMEOUT=${GITPLANE_READY_TIMEOUT:-30}
GITPLANE_SHARDS=${GITPLANE_SHARDS:-2}
NGINX_WORKERS=${NGINX_WORKERS:-2}
CLONE_TIMEOUT=${CLONE_TIMEOUT:-300}
LEVEL_TIMEOUT=${LEVEL_TIMEOUT:-900}
FSCK_SAMPLES=${FSCK_SAMPLES:-1}
KEEP_TMP=${KEEP_TMP:-0}

REPO_PATH=bench/fixture.git # OWNER/NAME.git as served by every server
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf '[compare-http] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for v in $CONCURRENCY; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "bad CONCURRENCY entry: $v"; done
[[ -z $CLONES || $CLONES =~ ^[1-9][0-9]*$ ]] || die "bad CLONES: $CLONES"
max_c=1
for v in $CONCURRENCY; do ((v > max_c)) && max_c=$v; done
FCGI_CHILDREN=${FCGI_CHILDREN:-$max_c}

# Loopback only: never let a proxy from the environment carry the traffic,
# and keep the user's/system git config out of both client and servers.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY GIT_PROXY_COMMAND
export no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0
export LC_ALL=C

# ---------------------------------------------------------------- cleanup
TMP=""
PIDS=()     # every server process this script started (killed by pid on exit)
CLIENT_PID="" # the running clone driver, if any

is_running() { # PID: exists and is not a zombie
    local st
    st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && ${st:0:1} != Z ]]
}

kill_started() {
    local pid i alive all=()
    ((${#PIDS[@]})) || return 0
    # The started processes and everything below them (fcgiwrap's and nginx's
    # workers, in-flight git children), each by pid.
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
        # The driver (timeout -> python3 -> git clone ...) and everything below it.
        local p cps
        IFS=, read -r -a cps <<<"$(tree_pids "$CLIENT_PID" 2>/dev/null || true)"
        for p in "${cps[@]}" "$CLIENT_PID"; do kill -TERM "$p" 2>/dev/null || true; done
        wait "$CLIENT_PID" 2>/dev/null || true
    fi
    kill_started
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- packages
ensure_packages() {
    local missing=() pkgs=() tmp_policy=0
    command -v git >/dev/null || die "git not found"
    command -v python3 >/dev/null || missing+=(python3)
    command -v nginx >/dev/null || missing+=(nginx)
    command -v fcgiwrap >/dev/null || missing+=(fcgiwrap)
    command -v timeout >/dev/null || missing+=(coreutils)
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them (apt-get install nginx-light fcgiwrap) or run as root"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get"
    log "installing: ${missing[*]} (apt-get update once)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    for p in "${missing[@]}"; do
        if [[ $p == nginx ]]; then
            # nginx-light is enough (fastcgi is built in); fall back to nginx.
            if apt-cache show nginx-light >/dev/null 2>&1; then p=nginx-light; fi
        fi
        pkgs+=("$p")
    done
    # Keep the package from starting a system-wide nginx on port 80.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        tmp_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2 || rc=$?
    ((tmp_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${pkgs[*]} failed"
    if ! command -v nginx >/dev/null || ! command -v fcgiwrap >/dev/null; then die "nginx/fcgiwrap still missing"; fi
}

# ---------------------------------------------------------------- helpers
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_tcp() { # PORT TIMEOUT PID
    local port=$1 t=$2 pid=$3 i
    for ((i = 0; i < t * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()' "$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

children_of() { # PID -> direct children pids
    python3 - "$1" <<'PY'
import os, sys
want = sys.argv[1]
for n in os.listdir("/proc"):
    if n.isdigit():
        try:
            s = open(f"/proc/{n}/stat", "rb").read()
        except OSError:
            continue
        if s[s.rindex(b")") + 2:].split()[1].decode() == want:
            print(n)
PY
}

wait_children() { # PID COUNT TIMEOUT
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        (($(children_of "$1" | wc -l) >= $2)) && return 0
        sleep 0.1
    done
    return 1
}

tree_pids() { python3 "$DRIVER" tree "$@" | paste -sd, -; }

# Check that URL serves the fixture, and which protocol version was used.
# Prints "v2" / "v0"; returns non-zero if ls-remote fails or refs differ.
probe() { # URL [git -c options...]
    local url=$1 trace refs
    shift
    trace="$TMP/probe.trace"
    refs=$(GIT_TRACE_PACKET="$trace" timeout 60 git "$@" ls-remote --refs "$url" 2>"$TMP/probe.err" |
        awk '{print $1 " " $2}') || { cat "$TMP/probe.err" >&2; return 1; }
    if [[ "$refs" != "$(awk '{print $1 " " $2}' <<<"$EXPECTED_REFS_TEXT")" ]]; then
        log "ls-remote $url: refs differ from the fixture"
        return 1
    fi
    if grep -q 'version 2' "$trace"; then echo v2; else echo v0; fi
    rm -f "$trace"
}

# ---------------------------------------------------------------- results
RESULTS_JSONL=""
declare -A NOTE # server -> reason it was not measured

run_levels() { # SERVER LABEL URL ROOTS LONG_LIVED CGI_TIMES_DIR|- [git -c k=v ...]
    local server=$1 label=$2 url=$3 roots=$4 long=$5 cgi=$6 c n out rootargs=() r
    shift 6
    local cfg=()
    [[ $cgi == - ]] || cfg+=(--cgi-times-dir "$cgi")
    for r in "$@"; do cfg+=(--git-config "$r"); done
    IFS=, read -r -a rs <<<"$roots"
    for r in "${rs[@]}"; do rootargs+=(--root "$r"); done
    # Warm-up (page cache, server start-up paths): one clone, not measured.
    rm -rf "$TMP/work/warm.git"
    local gc=()
    for r in "$@"; do gc+=(-c "$r"); done
    timeout "$CLONE_TIMEOUT" git "${gc[@]}" clone --bare -q "$url" "$TMP/work/warm.git" ||
        log "$label: warm-up clone failed"
    rm -rf "$TMP/work/warm.git"
    for c in $CONCURRENCY; do
        if [[ -n $CLONES ]]; then n=$CLONES; else n=$((2 * c > 8 ? 2 * c : 8)); fi
        log "$label: concurrency $c, $n clones"
        # In the background + wait, so that a TERM/INT to this script runs the
        # cleanup trap at once instead of after the batch.
        timeout $((LEVEL_TIMEOUT + CLONE_TIMEOUT + 900)) python3 "$DRIVER" \
            --url "$url" --concurrency "$c" --clones "$n" --work "$TMP/work" \
            "${rootargs[@]}" --long-lived "$long" "${cfg[@]}" \
            --expected-refs "$TMP/expected-refs" --fsck-samples "$FSCK_SAMPLES" \
            --clone-timeout "$CLONE_TIMEOUT" --level-timeout "$LEVEL_TIMEOUT" \
            >"$TMP/driver.out" 2>"$TMP/driver.err" &
        CLIENT_PID=$!
        if wait "$CLIENT_PID" && out=$(cat "$TMP/driver.out") && [[ -n $out ]]; then
            :
        else
            log "$label: driver failed at concurrency $c: $(tail -3 "$TMP/driver.err" | tr '\n' ' ')"
            out="{\"concurrency\": $c, \"clones\": $n, \"driver_failed\": true}"
        fi
        CLIENT_PID=""
        printf '{"server": "%s", "label": "%s", "result": %s}\n' "$server" "$label" "$out" >>"$RESULTS_JSONL"
        log "$label c=$c: $out"
    done
}

# ---------------------------------------------------------------- servers
start_nginx() {
    local port sock dir be fpid npid long
    dir="$TMP/nginx"
    mkdir -p "$dir/tmp"
    sock="$TMP/fcgiwrap.sock"
    be="$(git --exec-path)/git-http-backend"
    [[ -x $be ]] || { NOTE[nginx]="git-http-backend not found at $be"; return 1; }
    # Measurement shim: fcgiwrap ignores SIGCHLD, so its CGI children are
    # auto-reaped and their CPU never reaches fcgiwrap's cutime.  The shim runs
    # git-http-backend as its own child, waits, and appends bash's `times`
    # (self line, children line) to a per-pid file; the driver adds the
    # children lines to the server CPU.  Only the shim's exec (~2 ms CPU per
    # request, not counted) differs from pointing SCRIPT_FILENAME at git-http-backend.
    NGINX_CPU_DIR="$TMP/cgi-times"
    mkdir -p "$NGINX_CPU_DIR"
    cat >"$TMP/git-http-backend-shim" <<EOF
#!/bin/bash
"$be"
rc=\$?
times >>"$NGINX_CPU_DIR/\$\$"
exit "\$rc"
EOF
    chmod +x "$TMP/git-http-backend-shim"
    fcgiwrap -s "unix:$sock" -c "$FCGI_CHILDREN" >"$TMP/fcgiwrap.log" 2>&1 &
    fpid=$!
    PIDS+=("$fpid")
    local i
    for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.1; done
    [[ -S $sock ]] || { NOTE[nginx]="fcgiwrap did not create its socket"; return 1; }
    port=$(free_port)
    local user_line=""
    [[ $(id -u) == 0 ]] && user_line="user root;"
    cat >"$dir/nginx.conf" <<EOF
# generated by bench/compare-http.sh
$user_line
worker_processes $NGINX_WORKERS;
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
            fastcgi_param SCRIPT_FILENAME $TMP/git-http-backend-shim;
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
    nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
    npid=$!
    PIDS+=("$npid")
    if ! wait_tcp "$port" 20 "$npid"; then
        NOTE[nginx]="nginx did not start: $(tail -3 "$dir/error.log" "$dir/stdout.log" 2>/dev/null | tr '\n' ' ')"
        return 1
    fi
    wait_children "$npid" "$NGINX_WORKERS" 10 || log "nginx: fewer workers than $NGINX_WORKERS"
    wait_children "$fpid" "$FCGI_CHILDREN" 10 || log "fcgiwrap: fewer children than $FCGI_CHILDREN"
    long=$(tree_pids "$npid" "$fpid")
    NGINX_URL="http://127.0.0.1:$port/$REPO_PATH"
    NGINX_ROOTS="$npid,$fpid"
    NGINX_LONG=$long
    log "nginx on 127.0.0.1:$port (master $npid, fcgiwrap $fpid; long-lived: $long)"
}

start_daemon() {
    local port dpid
    port=$(free_port)
    # Run git-daemon itself (not the `git` wrapper) so its pid is the one that
    # forks and reaps the per-connection children.
    "$(git --exec-path)/git-daemon" --export-all --base-path="$TMP/root" --reuseaddr \
        --listen=127.0.0.1 --port="$port" --max-connections=0 --informative-errors \
        >"$TMP/git-daemon.log" 2>&1 &
    dpid=$!
    PIDS+=("$dpid")
    if ! wait_tcp "$port" 20 "$dpid"; then
        NOTE[git-daemon]="git daemon did not start: $(tail -3 "$TMP/git-daemon.log" | tr '\n' ' ')"
        return 1
    fi
    DAEMON_URL="git://127.0.0.1:$port/$REPO_PATH"
    DAEMON_ROOTS=$dpid
    DAEMON_LONG=$(tree_pids "$dpid")
    log "git daemon on 127.0.0.1:$port (pid $dpid)"
}

start_gitplane() {
    local port gpid data repo i rc=0
    if [[ ! -x $GITPLANE_BIN || $GITPLANE_BUILD == always ]] && [[ $GITPLANE_BUILD != never ]]; then
        log "gitplane: cargo build --release (timeout ${GITPLANE_BUILD_TIMEOUT}s)"
        (cd "$ROOT" && timeout "$GITPLANE_BUILD_TIMEOUT" cargo build --release) >"$TMP/gitplane-build.log" 2>&1 || rc=$?
        if ((rc)); then
            NOTE[gitplane]="cargo build --release failed (exit $rc): $(grep -m1 -E '^error' "$TMP/gitplane-build.log" || tail -1 "$TMP/gitplane-build.log")"
            return 1
        fi
    fi
    [[ -x $GITPLANE_BIN ]] || { NOTE[gitplane]="binary $GITPLANE_BIN missing (GITPLANE_BUILD=$GITPLANE_BUILD)"; return 1; }
    data="$TMP/gitplane-data"
    mkdir -p "$data"
    if ! timeout 60 "$GITPLANE_BIN" --data-dir "$data" repo create bench/fixture --public >"$TMP/gitplane-create.log" 2>&1; then
        NOTE[gitplane]="\`gitplane --data-dir DIR repo create bench/fixture --public\` failed: $(tail -2 "$TMP/gitplane-create.log" | tr '\n' ' ')"
        return 1
    fi
    repo="$data/repos/$REPO_PATH"
    [[ -d $repo/objects ]] || { NOTE[gitplane]="repo create did not make $repo"; return 1; }
    # Give it the fixture's exact objects and refs (same pack, bitmap and refs).
    rm -rf "$repo/objects" "$repo/refs" "$repo/packed-refs"
    cp -a "$TMP/root/$REPO_PATH/refs" "$TMP/root/$REPO_PATH/packed-refs" "$TMP/root/$REPO_PATH/HEAD" "$repo/"
    copy_objects "$TMP/root/$REPO_PATH/objects" "$repo/objects"
    port=$(free_port)
    "$GITPLANE_BIN" serve --data-dir "$data" --http-listen "127.0.0.1:$port" --shards "$GITPLANE_SHARDS" \
        >"$TMP/gitplane.log" 2>&1 &
    gpid=$!
    PIDS+=("$gpid")
    for ((i = 0; i < GITPLANE_READY_TIMEOUT * 10; i++)); do
        kill -0 "$gpid" 2>/dev/null || break
        if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 --noproxy '*' "http://127.0.0.1:$port/healthz" 2>/dev/null) == 200 ]]; then
            GITPLANE_URL="http://127.0.0.1:$port/$REPO_PATH"
            GITPLANE_ROOTS=$gpid
            GITPLANE_LONG=$(tree_pids "$gpid")
            log "gitplane on 127.0.0.1:$port (pid $gpid)"
            return 0
        fi
        sleep 0.1
    done
    if kill -0 "$gpid" 2>/dev/null; then
        NOTE[gitplane]="gitplane serve did not answer GET /healthz with 200 within ${GITPLANE_READY_TIMEOUT}s: $(tail -2 "$TMP/gitplane.log" | tr '\n' ' ')"
    else
        NOTE[gitplane]="gitplane serve exited: $(tail -2 "$TMP/gitplane.log" | tr '\n' ' ')"
    fi
    return 1
}

copy_objects() { # SRC DST: hard links when possible (same inodes, same page cache)
    cp -al "$1" "$2" 2>/dev/null || { rm -rf "$2"; cp -a "$1" "$2"; }
}

bench_server() { # SERVER
    local s=$1 proto
    case $s in
    nginx)
        start_nginx || { log "nginx: ${NOTE[nginx]}"; kill_started; return 0; }
        if ! proto=$(probe "$NGINX_URL"); then NOTE[nginx]="ls-remote against nginx failed"; kill_started; return 0; fi
        log "nginx: ls-remote ok, protocol $proto"
        run_levels nginx "nginx+fcgiwrap+git-http-backend ($proto)" "$NGINX_URL" "$NGINX_ROOTS" "$NGINX_LONG" "$NGINX_CPU_DIR" protocol.version=2
        if [[ $PROTO_V0 == 1 ]]; then
            run_levels nginx-v0 "nginx+fcgiwrap+git-http-backend (v0)" "$NGINX_URL" "$NGINX_ROOTS" "$NGINX_LONG" "$NGINX_CPU_DIR" protocol.version=0
        fi
        ;;
    git-daemon)
        start_daemon || { log "git-daemon: ${NOTE[git-daemon]}"; kill_started; return 0; }
        if ! proto=$(probe "$DAEMON_URL"); then NOTE[git-daemon]="ls-remote against git daemon failed"; kill_started; return 0; fi
        log "git daemon: ls-remote ok, protocol $proto"
        run_levels git-daemon "git daemon ($proto)" "$DAEMON_URL" "$DAEMON_ROOTS" "$DAEMON_LONG" - protocol.version=2
        ;;
    gitplane)
        start_gitplane || { log "gitplane: ${NOTE[gitplane]}"; kill_started; return 0; }
        if ! proto=$(probe "$GITPLANE_URL"); then
            NOTE[gitplane]="gitplane started but \`git ls-remote $GITPLANE_URL\` failed or returned other refs: $(tail -2 "$TMP/probe.err" 2>/dev/null | tr '\n' ' ')"
            log "gitplane: ${NOTE[gitplane]}"
            kill_started
            return 0
        fi
        log "gitplane: ls-remote ok, protocol $proto"
        run_levels gitplane "gitplane ($proto)" "$GITPLANE_URL" "$GITPLANE_ROOTS" "$GITPLANE_LONG" - protocol.version=2
        if [[ $PROTO_V0 == 1 ]]; then
            run_levels gitplane-v0 "gitplane (v0)" "$GITPLANE_URL" "$GITPLANE_ROOTS" "$GITPLANE_LONG" - protocol.version=0
        fi
        if ! kill -0 "$GITPLANE_ROOTS" 2>/dev/null; then
            NOTE[gitplane]="gitplane exited during the run: $(tail -2 "$TMP/gitplane.log" | tr '\n' ' ')"
        fi
        ;;
    *) die "unknown server: $s" ;;
    esac
    kill_started
}

# ---------------------------------------------------------------- main
ensure_packages
mkdir -p "$(dirname "$OUT")"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gitplane-compare.XXXXXX")
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

# The served copy: hard links to the fixture's pack where possible.
served="$TMP/root/$REPO_PATH"
mkdir -p "$served"
cp -a "$FIXTURE_DIR/HEAD" "$FIXTURE_DIR/config" "$FIXTURE_DIR/packed-refs" "$FIXTURE_DIR/refs" "$served/"
copy_objects "$FIXTURE_DIR/objects" "$served/objects"
git --git-dir="$FIXTURE_DIR" for-each-ref --format='%(objectname) %(refname)' >"$TMP/expected-refs"
EXPECTED_REFS_TEXT=$(cat "$TMP/expected-refs")

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $SERVERS; do
    bench_server "$s"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
versions() {
    printf -- '- date: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf -- '- host: %s, %s cores, kernel %s\n' "$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release 2>/dev/null)" "$(nproc)" "$(uname -r)"
    printf -- '- git: %s (client and servers)\n' "$(git --version | awk '{print $3}')"
    printf -- '- nginx: %s; fcgiwrap: %s (%s children); nginx workers: %s\n' \
        "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$(dpkg-query -W -f='${Version}' fcgiwrap 2>/dev/null || echo '?')" "$FCGI_CHILDREN" "$NGINX_WORKERS"
    local bin_info="not present"
    if [[ -x $GITPLANE_BIN ]]; then
        bin_info="built $(date -u -r "$GITPLANE_BIN" +%Y-%m-%dT%H:%M:%SZ)"
        if [[ -n $(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$GITPLANE_BIN" -print -quit 2>/dev/null) ]]; then
            bin_info+=", OLDER than src/ or Cargo.* (GITPLANE_BUILD=always rebuilds)"
        fi
    fi
    printf -- '- gitplane: %s (%s), --shards %s; worktree HEAD %s\n' "$GITPLANE_BIN" "$bin_info" "$GITPLANE_SHARDS" \
        "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'none')"
    printf -- '- fixture: %s\n' "$(tr '\n' ';' <<<"$FIXTURE_INFO" | sed 's/;$//; s/;/; /g')"
    printf -- '- load average (1/5/15 min) before: %s; after: %s (client and servers share the same cores)\n' "$LOAD_START" "$LOAD_END"
    printf -- '- concurrency: %s; clones per level: %s; fsck-verified clones per level: %s\n' \
        "$CONCURRENCY" "${CLONES:-max(2*c, 8)}" "$FSCK_SAMPLES"
}

notes_json() {
    local k
    for k in "${!NOTE[@]}"; do printf '%s\t%s\n' "$k" "${NOTE[$k]}"; done
}

{
    echo "### Smart HTTP clone throughput: gitplane vs nginx + git-http-backend vs git daemon"
    echo
    versions
    echo
    notes_json | python3 "$LIB/report.py" "$RESULTS_JSONL" "$CONCURRENCY"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cat "$OUT"
log "written: $OUT (raw: $RESULTS_JSONL)"
