#!/usr/bin/env bash
# Side by side with gitplane-load: every server, one run, the same fixture, the same client.
#
#   bench/compare.sh [--docs]
#
#   HTTP:  gitplane (smart HTTP)  vs  nginx + fcgiwrap + git-http-backend  vs  git daemon (git://)
#   SSH:   gitplane (russh)       vs  OpenSSH sshd + git-shell (forced command)
#
# gitplane-load (`clone` for http:// and git://, `ssh-clone` for ssh://) drives each server in
# turn at each concurrency level, closed loop, bounded by --requests and by a time limit.  For
# every (server, level): clones/s, p50/p99 clone latency, errors (from gitplane-load's JSON),
# server CPU-seconds per clone (the server's cgroup counter; /proc tree as a cross-check) and
# the server tree's peak summed RSS (bench/lib/servertree.py).  Markdown tables with gitplane's
# ratios go to bench/results/compare.md (raw JSON lines beside it); --docs also splices them
# into docs/BENCHMARKS.md between the "bench/compare.sh results" markers.
#
# Environment (all optional):
#   CONCURRENCY="1 8 32 128"   concurrency levels
#   REQUESTS=N                 clones per level (default max(4*c, 32))
#   SERVERS="gitplane-http nginx git-daemon gitplane-ssh sshd"   which, in this order
#   LEVEL_TIMEOUT=600          gitplane-load --duration: no clone starts after this (seconds)
#   CLONE_TIMEOUT=300          gitplane-load --timeout: one clone gives up after this (seconds)
#   LOAD_THREADS=1             gitplane-load runtime threads
#   BUILD=auto                 gitplane and gitplane-load: auto (cargo build --release when a
#                              binary is missing or older than the sources), missing, always, never
#   GITPLANE_SHARDS=2  NGINX_WORKERS=2  FCGI_CHILDREN=<max concurrency>
#   GITPLANE_BIN=target/release/gitplane  LOAD_BIN=target/release/gitplane-load
#   GITPLANE_CONFIG=FILE       a gitplane TOML (--config); default: none, the built-in defaults
#   SSHD_MAX_STARTUPS=256      sshd MaxStartups (OpenSSH's default 10:30:100 refuses most of 128)
#                              (the #16 target row is judged only at 10:30:100, both servers at defaults)
#   OUT=bench/results/compare.md   FIXTURE_DIR=bench/fixture/cache/fixture.git
#   BENCH_CGROUP=1             0: no cgroup per server (CPU from the /proc tree only)
#   KEEP_TMP=0                 1: keep the temp dir (server logs, configs, gitplane-load reports)
#
# Runs as root (sshd's privilege separation; apt-get for nginx-light, fcgiwrap,
# openssh-server when missing).  Everything listens on 127.0.0.1 only; every process started
# here is stopped by pid, and the temp dir and cgroups removed, on exit.
# Method and results: docs/BENCHMARKS.md, "Side by side with gitplane-load".
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The command as run, for the report: the settings given in the environment, then the script.
COMMAND=""
for v in CONCURRENCY REQUESTS SERVERS LEVEL_TIMEOUT CLONE_TIMEOUT LOAD_THREADS BUILD GITPLANE_BIN LOAD_BIN \
    GITPLANE_SHARDS NGINX_WORKERS FCGI_CHILDREN GITPLANE_CONFIG SSHD_MAX_STARTUPS BENCH_CGROUP; do
    [[ -n ${!v:-} ]] && COMMAND+="$v=\"${!v}\" "
done
COMMAND+="bench/compare.sh${*:+ $*}"
LOG_TAG=compare
# shellcheck source=bench/lib/common.sh
source "$ROOT/bench/lib/common.sh"

DOCS=0
for arg in "$@"; do
    case $arg in
    --docs) DOCS=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (see --help)" ;;
    esac
done

CONCURRENCY=${CONCURRENCY:-"1 8 32 128"}
REQUESTS=${REQUESTS:-}
SERVERS=${SERVERS:-"gitplane-http nginx git-daemon gitplane-ssh sshd"}
LEVEL_TIMEOUT=${LEVEL_TIMEOUT:-600}
CLONE_TIMEOUT=${CLONE_TIMEOUT:-300}
LOAD_THREADS=${LOAD_THREADS:-1}
BUILD=${BUILD:-auto}
GITPLANE_CONFIG=${GITPLANE_CONFIG:-}
SSHD_MAX_STARTUPS=${SSHD_MAX_STARTUPS:-256}
OUT=${OUT:-$ROOT/bench/results/compare.md}
LOAD_BIN=${LOAD_BIN:-$ROOT/target/release/gitplane-load}
DOC=$ROOT/docs/BENCHMARKS.md

for v in $CONCURRENCY; do [[ $v =~ ^[1-9][0-9]*$ ]] || die "bad CONCURRENCY entry: $v"; done
[[ -z $REQUESTS || $REQUESTS =~ ^[1-9][0-9]*$ ]] || die "bad REQUESTS: $REQUESTS"
for v in LEVEL_TIMEOUT CLONE_TIMEOUT LOAD_THREADS GITPLANE_SHARDS NGINX_WORKERS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "bad $v: ${!v}"
done
for s in $SERVERS; do
    case $s in gitplane-http | nginx | git-daemon | gitplane-ssh | sshd) ;; *) die "unknown server: $s" ;; esac
done
[[ -z $GITPLANE_CONFIG || -r $GITPLANE_CONFIG ]] || die "GITPLANE_CONFIG $GITPLANE_CONFIG is not readable"
[[ $(id -u) == 0 ]] || die "run as root (sshd's privilege separation, package installs)"
max_c=1
for v in $CONCURRENCY; do ((v > max_c)) && max_c=$v; done
FCGI_CHILDREN=${FCGI_CHILDREN:-$max_c}

ensure_packages nginx='nginx-light|nginx' fcgiwrap=fcgiwrap ssh-keygen=openssh-client /usr/sbin/sshd=openssh-server
bench_init gitplane-compare
mkdir -p "$(dirname "$OUT")" "$TMP/reports"
RESULTS_JSONL="${OUT%.md}.jsonl"
: >"$RESULTS_JSONL"

gitplane_build "$BUILD" "$GITPLANE_BIN" gitplane || die "$BUILD_FAILED"
gitplane_build "$BUILD" "$LOAD_BIN" gitplane-load || die "$BUILD_FAILED"
[[ -x $GITPLANE_BIN && -x $LOAD_BIN ]] || die "need $GITPLANE_BIN and $LOAD_BIN (BUILD=$BUILD)"
prepare_fixture "$FIXTURE_DIR"
client_ssh_key
SSH_ARGS=(--identity "$TMP/client_key" --known-hosts "$TMP/known_hosts")
# The probe's OpenSSH client (refs and negotiated algorithms); gitplane-load uses russh.
SSH_PROBE="ssh -F /dev/null -i $TMP/client_key -o IdentitiesOnly=yes -o IdentityAgent=none -o UserKnownHostsFile=$TMP/known_hosts -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes -o ControlMaster=no -o ControlPath=none -v"

declare -A LABEL EXTRA
record() { # SERVER JSON
    printf '{"server": "%s", "label": "%s", "result": %s}\n' "$1" "${LABEL[$1]}" "$2" >>"$RESULTS_JSONL"
}

# One server: start it in a cgroup of its own, check it serves the fixture, warm up with two
# verified clones (not measured), then one bounded gitplane-load batch per level.
bench_server() { # SERVER
    local s=$1 scen=clone url roots long cgi="" c n r extra=() out gp_args=() rootargs=()
    server_cgroup "$s"
    [[ -n $GITPLANE_CONFIG ]] && gp_args=(--config "$GITPLANE_CONFIG")
    case $s in
    gitplane-http | gitplane-ssh)
        start_gitplane "$GITPLANE_BIN" "$GITPLANE_SHARDS" "${gp_args[@]}" && gitplane_fixture "$GITPLANE_BIN" || {
            NOTE[$s]=${NOTE[gitplane]:-?}; unset 'NOTE[gitplane]'; return 0
        }
        roots=$GITPLANE_PID
        if [[ $s == gitplane-http ]]; then
            url="http://$GITPLANE_HTTP/$REPO_PATH"
        else
            gitplane_add_key "$GITPLANE_BIN" admin "$TMP/client_key.pub" "$TMP/known_hosts" || {
                NOTE[$s]=${NOTE[gitplane]:-?}; unset 'NOTE[gitplane]'; return 0
            }
            url="ssh://git@$GITPLANE_SSH/$REPO_PATH"
        fi
        ;;
    nginx)
        start_nginx "$NGINX_WORKERS" "$FCGI_CHILDREN" || return 0
        url=$NGINX_URL roots=$NGINX_ROOTS cgi=$NGINX_CPU_DIR
        ;;
    git-daemon)
        start_daemon || return 0
        url=$DAEMON_URL roots=$DAEMON_PID
        ;;
    sshd)
        start_sshd "MaxStartups $SSHD_MAX_STARTUPS" || return 0
        url=$SSHD_URL roots=$SSHD_PID
        EXTRA[sshd]="$SSHD_VERSION; config additions: MaxStartups $SSHD_MAX_STARTUPS (MaxSessions, LoginGraceTime at their defaults: one session per connection)"
        ;;
    esac
    [[ $s == *ssh* ]] && { scen=ssh-clone; extra=("${SSH_ARGS[@]}"); }
    for r in ${roots//,/ }; do rootargs+=(--root "$r"); done
    long=$(tree_pids ${roots//,/ })
    if [[ $scen == ssh-clone ]]; then
        GIT_SSH_COMMAND=$SSH_PROBE probe "$url" -c protocol.version=2 || { NOTE[$s]="git ls-remote over ssh failed or listed other refs: $(tail -2 "$TMP/probe.err" | tr '\n' ' ')"; return 0; }
    else
        probe "$url" -c protocol.version=2 || { NOTE[$s]="git ls-remote failed or listed other refs: $(tail -2 "$TMP/probe.err" | tr '\n' ' ')"; return 0; }
    fi
    log "$s: $url serves the fixture (git ls-remote: $PROBE_PROTO)"
    if ! timeout $((CLONE_TIMEOUT + 60)) "$LOAD_BIN" "$scen" --url "$url" "${extra[@]}" -n 2 -c 1 -q \
        --timeout "${CLONE_TIMEOUT}s" --verify --verify-samples 1 --json "$TMP/reports/$s-warm.json" \
        >"$TMP/reports/$s-warm.out" 2>&1; then
        NOTE[$s]="warm-up (2 clones, one pack checked by git index-pack) failed: $(tail -3 "$TMP/reports/$s-warm.out" | tr '\n' ' ')"
        return 0
    fi
    LABEL[$s]="$(label_of "$s") ($(python3 -c 'import json,sys; print(",".join(sorted(json.load(open(sys.argv[1]))["protocols"])))' "$TMP/reports/$s-warm.json"))"
    for c in $CONCURRENCY; do
        if [[ -n $REQUESTS ]]; then n=$REQUESTS; else n=$((4 * c > 32 ? 4 * c : 32)); fi
        log "$s: concurrency $c, $n clones (load average $(loadavg))"
        local l0 l1
        l0=$(loadavg)
        if run_bg "$TMP/driver.out" "$TMP/driver.err" $((LEVEL_TIMEOUT + CLONE_TIMEOUT + 300)) \
            python3 "$BENCH_LIB/load_driver.py" "${rootargs[@]}" --long-lived "$long" \
            ${SERVER_CG:+--cgroup "$SERVER_CG"} ${cgi:+--cgi-times-dir "$cgi"} \
            --report "$TMP/reports/$s-$c.json" --timeout $((LEVEL_TIMEOUT + CLONE_TIMEOUT + 120)) -- \
            "$LOAD_BIN" "$scen" --url "$url" "${extra[@]}" -c "$c" -n "$n" -d "${LEVEL_TIMEOUT}s" \
            --timeout "${CLONE_TIMEOUT}s" -t "$LOAD_THREADS" -q --allow-errors \
            --json "$TMP/reports/$s-$c.json" && out=$(cat "$TMP/driver.out") && [[ -n $out ]]; then
            :
        else
            log "$s: driver failed at concurrency $c: $(tail -3 "$TMP/driver.err" | tr '\n' ' ')"
            out="{\"concurrency\": $c, \"driver_failed\": true, \"why\": \"load_driver.py failed\"}"
        fi
        l1=$(loadavg)
        out=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(concurrency=int(sys.argv[2]), requests=int(sys.argv[3]), load_before=sys.argv[4], load_after=sys.argv[5]); print(json.dumps(r))' \
            "$out" "$c" "$n" "$l0" "$l1")
        record "$s" "$out"
        log "$s c=$c: $(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print({k: r.get(k) for k in ("ok","errors_total","clones_per_s","p99_ms","server_cpu_s_per_clone","peak_rss_bytes","cpu_check")})' "$out")"
    done
    case $s in
    gitplane-*)
        # What the server says about the run (failures at high concurrency: the pack limiter,
        # the SSH pre-auth caps), for the notes: the counters that are not 0.
        EXTRA[$s]="${EXTRA[$s]:+${EXTRA[$s]}; }metrics at the end (counters that are not 0): $(curl -s --max-time 5 --noproxy '*' "http://$GITPLANE_HTTP/metrics" 2>/dev/null |
            grep -E '^gitplane_(pack_queue_(rejected|waits)_total|git_(spawned|killed)_total|ssh_(handshakes|execs|requests_refused|auth_rejected)_total|http_connections_rejected_total|http_responses_total\{[^}]*status="5)' | grep -vE ' 0$' | tr '\n' ';' | sed 's/;$//; s/;/; /g' || true)"
        cp "$GITPLANE_DATA.log" "$TMP/reports/$s-server.log" 2>/dev/null || true
        ;;
    sshd)
        EXTRA[sshd]+="; sshd log: $(grep -c 'MaxStartups' "$TMP/sshd/sshd.log" || true) MaxStartups lines"
        cp "$TMP/sshd/sshd.log" "$TMP/reports/sshd-server.log" 2>/dev/null || true
        ;;
    esac
    is_running "${roots%%,*}" || NOTE[$s]="the server exited during the run"
}

label_of() {
    case $1 in
    gitplane-http) echo "gitplane" ;;
    gitplane-ssh) echo "gitplane" ;;
    nginx) echo "nginx + fcgiwrap + git-http-backend" ;;
    git-daemon) echo "git daemon" ;;
    sshd) echo "OpenSSH sshd + git-shell" ;;
    esac
}

LOAD_START=$(loadavg)
UPTIME_START=$(uptime)
for s in $SERVERS; do
    LABEL[$s]=$(label_of "$s")
    bench_server "$s"
    kill_started
done
LOAD_END=$(loadavg)
UPTIME_END=$(uptime)

# ---------------------------------------------------------------- report
facts() {
    printf -- '- command: `%s` (as root)\n' "$COMMAND"
    host_facts
    printf -- '- load average (1/5/15 min) at the start: %s; at the end: %s; per level in the JSON lines (client and servers share the same cores)\n' "$LOAD_START" "$LOAD_END"
    printf -- '- gitplane: %s; --shards %s; config: %s\n' "$(gitplane_bin_info "$GITPLANE_BIN")" "$GITPLANE_SHARDS" "${GITPLANE_CONFIG:-built-in defaults}"
    printf -- '- gitplane-load: %s (built %s; %s), %s runtime thread(s), closed loop, `--timeout %ss`, `--duration %ss`\n' \
        "$("$LOAD_BIN" --version)" "$(date -u -r "$LOAD_BIN" +%Y-%m-%dT%H:%M:%SZ)" "${BUILT[$LOAD_BIN]:-not built by this run}" \
        "$LOAD_THREADS" "$CLONE_TIMEOUT" "$LEVEL_TIMEOUT"
    printf -- '- git %s (git-http-backend, git daemon, git-shell, upload-pack); nginx %s (%s workers); fcgiwrap %s (%s children); OpenSSH %s\n' \
        "$(git --version | awk '{print $3}')" "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$NGINX_WORKERS" \
        "$(dpkg-query -W -f='${Version}' fcgiwrap 2>/dev/null || echo '?')" "$FCGI_CHILDREN" \
        "$(dpkg-query -W -f='${Version}' openssh-server 2>/dev/null || echo '?')"
    printf -- '- fixture: %s\n' "$FIXTURE_INFO"
    printf -- '- levels: %s; clones per level: %s\n' "$CONCURRENCY" "${REQUESTS:-max(4·c, 32)}"
    local k
    for k in $SERVERS; do [[ -n ${EXTRA[$k]:-} ]] && printf -- '- %s: %s\n' "$k" "${EXTRA[$k]}"; done
    return 0
}

{
    echo "#### Run of $(date -u +%Y-%m-%d)"
    echo
    facts
    echo
    notes_tsv | SSHD_MAX_STARTUPS=$SSHD_MAX_STARTUPS GITPLANE_CONFIG=${GITPLANE_CONFIG:-} python3 "$BENCH_LIB/compare_report.py" "$RESULTS_JSONL" "$CONCURRENCY"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cp "$TMP"/reports/*.log "$(dirname "$OUT")/" 2>/dev/null || true
cat "$OUT"
log "written: $OUT (raw: $RESULTS_JSONL; uptime at start: $UPTIME_START; at end: $UPTIME_END)"
if ((DOCS)); then
    python3 "$BENCH_LIB/compare_report.py" --splice "$DOC" "$OUT"
    log "spliced into $DOC"
fi
