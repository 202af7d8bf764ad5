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
need ssh openssh-client
need ssh-keygen openssh-client
need python3 python3
need curl curl
if [ "${#apt_missing[@]}" -gt 0 ]; then
    echo "test.sh: installing ${apt_missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

# --- lints: the habits the project holds itself to ---------------------------------------------
echo "test.sh: cargo fmt --check"
cargo fmt --all -- --check
echo "test.sh: cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

# --- tests ---------------------------------------------------------------------------------------
echo "test.sh: cargo test"
cargo test --workspace

# --- parsers under a bounded fuzz run -------------------------------------------------------------
FUZZ_SECONDS="${FUZZ_SECONDS:-15}" scripts/fuzz.sh
echo "test.sh: all passed"
