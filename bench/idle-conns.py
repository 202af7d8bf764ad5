#!/usr/bin/env python3
"""Server memory per idle keep-alive HTTP connection.

Starts target/release/gitplane on a free loopback port with a temporary data dir, opens N
connections that each complete one keep-alive request (GET /healthz) and then stay idle, and
reports the server's RSS growth per connection (VmRSS from /proc, sampled before and after).

    python3 bench/idle-conns.py [--connections 10000] [--shards 2]

Bounded: connections are opened in batches with a timeout; everything is closed at the end.
"""
import argparse
import os
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import BIN, rss_kb, start_server, stop  # noqa: E402


REQUEST = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"


def open_idle(addr, n, deadline):
    """Opens n connections, completes one request on each, returns the open sockets."""
    sel = selectors.DefaultSelector()
    socks, pending = [], {}
    batch = 500
    while len(socks) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(socks)} connections done in time")
        for _ in range(min(batch, n - len(socks))):
            s = socket.create_connection(addr, timeout=10)
            s.sendall(REQUEST)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            pending[s] = b""
            socks.append(s)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError("responses did not arrive in time")
            for key, _ in sel.select(timeout=5):
                s = key.fileobj
                data = s.recv(4096)
                if not data:
                    raise RuntimeError("server closed an idle connection early")
                pending[s] += data
                if pending[s].endswith(b"ok\n"):
                    assert pending[s].startswith(b"HTTP/1.1 200"), pending[s][:80]
                    sel.unregister(s)
                    del pending[s]
    return socks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.connections + 100 > hard:
        sys.exit(f"need nofile > {args.connections + 100}, hard limit is {hard}")
    if not os.path.exists(BIN):
        subprocess.run(["cargo", "build", "--release", "--bin", "gitplane"], cwd=ROOT, check=True)
    data = tempfile.mkdtemp(prefix="gitplane-idle-")
    proc, addrs = start_server(os.path.join(data, "d"), args.shards)
    addr = addrs["http"]
    try:
        warm = open_idle(addr, 200, time.monotonic() + 30)  # touch every code path once
        for s in warm:
            s.close()
        time.sleep(0.5)
        before = rss_kb(proc.pid)
        socks = open_idle(addr, args.connections, time.monotonic() + 120)
        time.sleep(1.0)
        after = rss_kb(proc.pid)
        per = (after - before) * 1024 / args.connections
        print(f"connections={args.connections} shards={args.shards} rss_before_kb={before} "
              f"rss_after_kb={after} per_connection_bytes={per:.0f}")
        for s in socks:
            s.close()
    finally:
        stop(proc, timeout=20)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
