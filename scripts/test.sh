#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need when it is missing
# (idempotent: a second run installs nothing), then runs lints, every workspace test, and a
# bounded fuzz run of each parser. Exits non-zero on any failure; nothing is skipped.
#
#   scripts/test.sh                 # everything
#   FUZZ_SECONDS=5 scripts/test.sh  # shorter fuzz runs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --- what the tests drive: real clients and servers -------------------------------------------
apt_missing=()
need() { command -v "$1" >/dev/null 2>&1 || apt_missing+=("$2"); }
need git git
need git-lfs git-lfs
need ssh openssh-client
need ssh-keygen openssh-client
need python3 python3
need curl curl
need valgrind valgrind
need strace strace
need unshare util-linux
need start_server libserver-starter-perl
if [ "${#apt_missing[@]}" -gt 0 ]; then
    echo "test.sh: installing ${apt_missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
# Python packages for real peers: install only what does not import.
pip_need() {
    local module=$1; shift
    python3 -c "import $module" >/dev/null 2>&1 && return 0
    echo "test.sh: installing $*"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-pip
    fi
    python3 -m pip install --quiet "$@" || python3 -m pip install --quiet --break-system-packages "$@"
}
# The gRPC tests drive a real gRPC client: Python grpcio, with stubs made by grpcio-tools.
pip_need "grpc, grpc_tools" grpcio grpcio-tools
# The LFS S3 test runs a real S3-compatible server: moto's (each test starts its own).
pip_need "moto.server" "moto[server]"
# The hook-worker tests (tests/hooks.rs) use a real RabbitMQ broker on 127.0.0.1:5672 with the
# default guest/guest account (RabbitMQ allows it from localhost only). Installed from Debian and
# started detached when nothing listens there; an already running broker is used as it is.
broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) >/dev/null 2>&1; }
if ! broker_up; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        echo "test.sh: installing rabbitmq-server"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends rabbitmq-server
    fi
    # The package may have started it already (where services start on install).
    for _ in $(seq 1 10); do broker_up && break; sleep 1; done
    if ! broker_up; then
        echo "test.sh: starting rabbitmq-server"
        $SUDO rabbitmq-server -detached
    fi
    for _ in $(seq 1 120); do broker_up && break; sleep 1; done
    if ! broker_up; then
        echo "test.sh: RabbitMQ did not listen on 127.0.0.1:5672 within 120 s; see /var/log/rabbitmq/" >&2
        exit 1
    fi
fi

# The shared-store tests (#13) use PostgreSQL on 127.0.0.1:5432 as user postgres without a
# password, creating a scratch database per test server and dropping it afterwards. When nothing
# listens there, Debian's server is installed if missing and a cluster of the test suite's own is
# made (trust auth, loopback only) under /var/tmp/gitplane-test-pg and started; a running server
# is used as it is.
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) >/dev/null 2>&1; }
if ! pg_up; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
        echo "test.sh: installing postgresql"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql
    fi
    # The package may have started its own cluster (where services start on install).
    for _ in $(seq 1 5); do pg_up && break; sleep 1; done
fi
if ! pg_up; then
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    pg_dir=/var/tmp/gitplane-test-pg
    as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
    if [ ! -f "$pg_dir/PG_VERSION" ]; then
        echo "test.sh: creating a PostgreSQL cluster for the tests in $pg_dir"
        mkdir -p "$pg_dir"
        [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$pg_dir"
        as_pg "$pg_bin/initdb" -q -A trust -U postgres -D "$pg_dir"
    fi
    echo "test.sh: starting PostgreSQL on 127.0.0.1:5432"
    as_pg "$pg_bin/pg_ctl" -w -t 60 -D "$pg_dir" -l "$pg_dir/log" \
        -o "-p 5432 -c listen_addresses=127.0.0.1 -k /tmp" start
    if ! pg_up; then
        echo "test.sh: PostgreSQL did not listen on 127.0.0.1:5432; see $pg_dir/log" >&2
        exit 1
    fi
fi
# The tests' private servers (tests/fleet.rs stops and starts one) need the server binaries.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    echo "test.sh: installing postgresql (server binaries for tests/fleet.rs)"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql
fi

# --- lints: the habits the project holds itself to ---------------------------------------------
echo "test.sh: cargo fmt --check"
cargo fmt --all -- --check
echo "test.sh: cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

# --- tests ---------------------------------------------------------------------------------------
echo "test.sh: cargo test"
cargo test --workspace
# The suites that touch the store, again against PostgreSQL: each test server gets a scratch
# database (dropped with it). The unit tests of the store already ran on both backends.
# Beside them, niced, the bounded fuzz run of every parser: the fuzzer keeps one core busy while
# these tests mostly wait on git and the network, which saves minutes of CI's 30 on 2 cores. Its
# report follows theirs.
echo "test.sh: fuzz build"
scripts/fuzz.sh --build-only
fuzz_log="$(mktemp)"
trap 'rm -f "$fuzz_log"' EXIT
FUZZ_SECONDS="${FUZZ_SECONDS:-15}" nice -n 10 scripts/fuzz.sh >"$fuzz_log" 2>&1 &
fuzz_pid=$!
echo "test.sh: store suites against PostgreSQL (the fuzz run beside them)"
store_status=0
GITPLANE_TEST_STORE=postgres cargo test --test smart_http --test ssh --test lfs --test hooks --test rpc ||
    store_status=$?
fuzz_status=0
wait "$fuzz_pid" || fuzz_status=$?
echo "test.sh: fuzz run"
cat "$fuzz_log"
if [ "$store_status" -ne 0 ] || [ "$fuzz_status" -ne 0 ]; then
    echo "test.sh: failed (store suites on PostgreSQL: exit $store_status; fuzz: exit $fuzz_status)" >&2
    exit 1
fi
# Instruction counts of the wire-codec hot paths against bench/icount.baseline (callgrind), and
# proof that the gate trips on a 10% rise; on another machine it checks repeatability only.
echo "test.sh: instruction counts"
bench/icount.sh --self-test
echo "test.sh: all passed"
