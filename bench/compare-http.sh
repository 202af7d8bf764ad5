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
#   BENCH_CGROUP=0         1: run each server in a cgroup of its own and take its CPU counter
#                          (bench/lib/servertree.py) instead of the /proc tree and CGI shim
#
# Everything listens on 127.0.0.1 only, runs as the current user from a temp
# dir, and is stopped (by pid) and removed on exit.  Method: docs/BENCHMARKS.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_TAG=compare-http
BENCH_CGROUP=${BENCH_CGROUP:-0}
# shellcheck source=bench/lib/common.sh
source "$ROOT/bench/lib/common.sh"
DRIVER="$BENCH_LIB/clone_driver.py"

CONCURRENCY=${CONCURRENCY:-"1 8 32"}
CLONES=${CLONES:-}
SERVERS=${SERVERS:-"nginx git-daemon gitplane"}
PROTO_V0=${PROTO_V0:-0}
OUT=${OUT:-$ROOT/bench/results/http-compare.md}
GITPLANE_BUILD=${GITPLANE_BUILD:-missing}
CLONE_TIMEOUT=${CLONE_TIMEOUT:-300}
LEVEL_TIMEOUT=${LEVEL_TIMEOUT:-900}
FSCK_SAMPLES=${FSCK_SAMPLES:-1}

for v in $CONCURRENCY; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "bad CONCURRENCY entry: $v"; done
[[ -z $CLONES || $CLONES =~ ^[1-9][0-9]*$ ]] || die "bad CLONES: $CLONES"
max_c=1
for v in $CONCURRENCY; do ((v > max_c)) && max_c=$v; done
FCGI_CHILDREN=${FCGI_CHILDREN:-$max_c}

# ---------------------------------------------------------------- results
RESULTS_JSONL=""

run_levels() { # SERVER LABEL URL ROOTS LONG_LIVED CGI_TIMES_DIR|- [git -c k=v ...]
    local server=$1 label=$2 url=$3 roots=$4 long=$5 cgi=$6 c n out rootargs=() r
    shift 6
    local cfg=()
    [[ $cgi == - || -z $cgi ]] || cfg+=(--cgi-times-dir "$cgi")
    [[ -z $SERVER_CG ]] || cfg+=(--cgroup "$SERVER_CG")
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
        if run_bg "$TMP/driver.out" "$TMP/driver.err" $((LEVEL_TIMEOUT + CLONE_TIMEOUT + 900)) python3 "$DRIVER" \
            --url "$url" --concurrency "$c" --clones "$n" --work "$TMP/work" \
            "${rootargs[@]}" --long-lived "$long" "${cfg[@]}" \
            --expected-refs "$TMP/expected-refs" --fsck-samples "$FSCK_SAMPLES" \
            --clone-timeout "$CLONE_TIMEOUT" --level-timeout "$LEVEL_TIMEOUT" &&
            out=$(cat "$TMP/driver.out") && [[ -n $out ]]; then
            :
        else
            log "$label: driver failed at concurrency $c: $(tail -3 "$TMP/driver.err" | tr '\n' ' ')"
            out="{\"concurrency\": $c, \"clones\": $n, \"driver_failed\": true}"
        fi
        printf '{"server": "%s", "label": "%s", "result": %s}\n' "$server" "$label" "$out" >>"$RESULTS_JSONL"
        log "$label c=$c: $out"
    done
}

# ---------------------------------------------------------------- servers
start_server() { # SERVER: in a cgroup of its own when BENCH_CGROUP=1; sets URL ROOTS LONG CGI
    server_cgroup "$1"
    case $1 in
    nginx)
        start_nginx "$NGINX_WORKERS" "$FCGI_CHILDREN" || return 1
        URL=$NGINX_URL ROOTS=$NGINX_ROOTS CGI=${NGINX_CPU_DIR:--}
        ;;
    git-daemon)
        start_daemon || return 1
        URL=$DAEMON_URL ROOTS=$DAEMON_PID CGI=-
        ;;
    gitplane)
        if ! gitplane_build "$GITPLANE_BUILD" "$GITPLANE_BIN" gitplane; then NOTE[gitplane]=$BUILD_FAILED; return 1; fi
        start_gitplane "$GITPLANE_BIN" "$GITPLANE_SHARDS" && gitplane_fixture "$GITPLANE_BIN" || return 1
        URL="http://$GITPLANE_HTTP/$REPO_PATH" ROOTS=$GITPLANE_PID CGI=-
        ;;
    esac
    LONG=$(tree_pids ${ROOTS//,/ })
}

bench_server() { # SERVER
    local s=$1 label
    case $s in
    nginx) label="nginx+fcgiwrap+git-http-backend" ;;
    git-daemon) label="git daemon" ;;
    gitplane) label="gitplane" ;;
    *) die "unknown server: $s" ;;
    esac
    start_server "$s" || { log "$s: ${NOTE[$s]:-did not start}"; kill_started; return 0; }
    if ! probe "$URL"; then
        NOTE[$s]="$s started but \`git ls-remote $URL\` failed or returned other refs: $(tail -2 "$TMP/probe.err" 2>/dev/null | tr '\n' ' ')"
        log "$s: ${NOTE[$s]}"
        kill_started
        return 0
    fi
    log "$s: ls-remote ok, protocol $PROBE_PROTO"
    run_levels "$s" "$label ($PROBE_PROTO)" "$URL" "$ROOTS" "$LONG" "$CGI" protocol.version=2
    if [[ $PROTO_V0 == 1 && $s != git-daemon ]]; then
        run_levels "$s-v0" "$label (v0)" "$URL" "$ROOTS" "$LONG" "$CGI" protocol.version=0
    fi
    is_running "${ROOTS%%,*}" || NOTE[$s]="$s exited during the run"
    kill_started
}

# ---------------------------------------------------------------- main
ensure_packages nginx='nginx-light|nginx' fcgiwrap=fcgiwrap
bench_init gitplane-compare
mkdir -p "$(dirname "$OUT")" "$TMP/work"
RESULTS_JSONL="${OUT%.md}.jsonl"
: >"$RESULTS_JSONL"
prepare_fixture "$FIXTURE_DIR"

LOAD_START=$(loadavg)
for s in $SERVERS; do
    bench_server "$s"
done
LOAD_END=$(loadavg)

# ---------------------------------------------------------------- report
versions() {
    host_facts
    printf -- '- git: %s (client and servers)\n' "$(git --version | awk '{print $3}')"
    printf -- '- nginx: %s; fcgiwrap: %s (%s children); nginx workers: %s\n' \
        "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$(dpkg-query -W -f='${Version}' fcgiwrap 2>/dev/null || echo '?')" "$FCGI_CHILDREN" "$NGINX_WORKERS"
    printf -- '- gitplane: %s, --shards %s\n' "$(gitplane_bin_info "$GITPLANE_BIN")" "$GITPLANE_SHARDS"
    printf -- '- fixture: %s\n' "$FIXTURE_INFO"
    printf -- '- load average (1/5/15 min) before: %s; after: %s (client and servers share the same cores)\n' "$LOAD_START" "$LOAD_END"
    printf -- '- concurrency: %s; clones per level: %s; fsck-verified clones per level: %s; server CPU: %s\n' \
        "$CONCURRENCY" "${CLONES:-max(2*c, 8)}" "$FSCK_SAMPLES" \
        "$([[ $BENCH_CGROUP == 1 ]] && echo "each server's cgroup counter" || echo "/proc tree (and the CGI shim for nginx)")"
}

{
    echo "### Smart HTTP clone throughput: gitplane vs nginx + git-http-backend vs git daemon"
    echo
    versions
    echo
    notes_tsv | python3 "$BENCH_LIB/report.py" "$RESULTS_JSONL" "$CONCURRENCY"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cat "$OUT"
log "written: $OUT (raw: $RESULTS_JSONL)"
