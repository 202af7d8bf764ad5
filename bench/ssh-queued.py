#!/usr/bin/env python3
"""Server memory per SSH connection waiting in the per-address admission queue (issue #16).

Starts target/release/gitplane with the default [ssh] limits (32 handshakes per address, 512
queued), then from 127.0.0.1: opens --cap silent connections (each starts its handshake: the
server sends its version line), measures the server's RSS growth, then opens --queued more
(over the address's share: they wait, handshake not started) and measures again. Reports bytes
per connection in the handshake and per queued connection. Both phases finish well inside the
20 s handshake deadline that cuts them all.

    python3 bench/ssh-queued.py [--cap 32] [--queued 480]

Bounded: connections are closed and the server stopped at the end.
"""
import argparse
import shutil
import socket
import sys
import os
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import require_binary, rss_kb, start_server, stop  # noqa: E402


def banners(socks):
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            n += len(s.recv(8, socket.MSG_PEEK)) > 0
        except BlockingIOError:
            pass
        s.setblocking(True)
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap", type=int, default=32)
    ap.add_argument("--queued", type=int, default=480)
    args = ap.parse_args()
    require_binary()
    work = tempfile.mkdtemp(prefix="gp-ssh-queued-")
    proc, socks = None, []
    try:
        proc, addrs = start_server(os.path.join(work, "data"))
        ssh = addrs["ssh"]
        time.sleep(1)
        base = rss_kb(proc.pid)
        socks = [socket.create_connection(ssh, timeout=10) for _ in range(args.cap)]
        time.sleep(1)
        first = rss_kb(proc.pid)
        socks += [socket.create_connection(ssh, timeout=10) for _ in range(args.queued)]
        time.sleep(1)
        second = rss_kb(proc.pid)
        started = banners(socks)
        print(f"{len(socks)} silent connections from 127.0.0.1, {started} in the handshake "
              f"(server version line received)")
        print(f"  RSS {base} kB -> {first} kB with {args.cap}: "
              f"{1024 * (first - base) / args.cap:,.0f} bytes per connection in the handshake")
        print(f"  RSS {first} kB -> {second} kB with {args.queued} more: "
              f"{1024 * (second - first) / args.queued:,.0f} bytes per queued connection")
    finally:
        for s in socks:
            s.close()
        if proc:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
