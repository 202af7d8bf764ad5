#!/usr/bin/env python3
"""Server memory left behind by closed connections (a leak check).

Starts target/release/gitplane on free loopback ports, opens and closes N connections one after
another (each sends one keep-alive `GET /healthz`, reads the answer and closes), and reports the
server's RSS growth per closed connection. A server that frees what a connection used grows by
about nothing.

    python3 bench/conn-churn.py [--connections 20000] [--shards 2]
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "gitplane")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def churn(addr, n):
    for _ in range(n):
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: churn\r\n\r\n")
            if not s.recv(1024).startswith(b"HTTP/1.1 200"):
                raise RuntimeError("unexpected answer")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--shards", type=int, default=2)
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    data = tempfile.mkdtemp(prefix="gitplane-churn-")
    proc = subprocess.Popen(
        [BIN, "--data-dir", os.path.join(data, "d"), "serve", "--http-listen", "127.0.0.1:0",
         "--ssh-listen", "127.0.0.1:0", "--rpc-listen", "127.0.0.1:0", "--shards", str(a.shards)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "RUST_LOG": "warn"})
    addr = None
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("gitplane: http listening on "):
            host, port = line.rsplit(" ", 1)[1].rsplit(":", 1)
            addr = (host, int(port))
        if line == "gitplane: ready":
            break
    try:
        churn(addr, 2000)  # warm every code path and the allocator's arenas
        time.sleep(0.5)
        before = rss_kb(proc.pid)
        churn(addr, a.connections)
        time.sleep(1.0)
        after = rss_kb(proc.pid)
        print(f"connections={a.connections} shards={a.shards} rss_before_kb={before} rss_after_kb={after} "
              f"per_closed_connection_bytes={(after - before) * 1024 / a.connections:.1f}")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
