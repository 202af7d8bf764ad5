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
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import require_binary, rss_kb, start_server  # noqa: E402


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
    require_binary()
    data = tempfile.mkdtemp(prefix="gitplane-churn-")
    proc, addrs = start_server(os.path.join(data, "d"), a.shards)
    addr = addrs["http"]
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
