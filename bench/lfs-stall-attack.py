#!/usr/bin/env python3
"""LFS download latency of a real client while peers stall LFS downloads (issue #17).

Starts target/release/gitplane on loopback with its default settings (pass --config to change
them), pushes a commit with one LFS object of --mib MiB to a public repository with the real
git-lfs client, then times `git lfs fetch` of that object (its local copy deleted first) at least
N times and for at least --seconds, first without an attack and then while M peers download the same object and never
read: each binds to its own 127.0.0.x source address (4 per address, the default per-address
anonymous share), shrinks its receive buffer, reads the response head and stops; it reconnects
after --hold seconds (past the 60 s send deadline, so the server's cuts and fresh stalls both
happen during the run). With --authenticated the peers send credentials from one address, so no
anonymous share applies and only the buffer release and the send deadline protect the client.
Reports fetch p50/p99 for both phases and their ratio, the server's RSS, the pool buffers and
LFS transfers in use (sampled from /metrics) during the attack, and the cuts the server counted.

    python3 bench/lfs-stall-attack.py [--fetches 20] [--attackers 80] [--mib 50] [--authenticated]

Bounded: every socket has a timeout, the attack stops when the fetches are done, the server is
killed at the end.
"""
import argparse
import base64
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import admin, metric, metrics, pct, require_binary, rss_mb, run, start_server, timed_runs  # noqa: E402


def stalled_peer(addr, source, path, auth, hold, stop, counts):
    """Downloads `path` from `source` and never reads past the head; again after `hold` s."""
    auth_line = f"Authorization: {auth}\r\n" if auth else ""
    request = f"GET {path} HTTP/1.1\r\nHost: b\r\n{auth_line}\r\n".encode()
    while not stop.is_set():
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            s.settimeout(10)
            s.bind((source, 0))
            s.connect(addr)
            s.sendall(request)
            head = s.recv(512)
            status = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "none"
            counts[status] = counts.get(status, 0) + 1
            stop.wait(hold if status == "200" else 1)
            s.close()
        except OSError:
            stop.wait(0.5)


def fetch_times(work, n, seconds=0):
    """At least n fetches, and fetches until `seconds` have passed."""
    objects = os.path.join(work, ".git", "lfs", "objects")

    def fetch():
        shutil.rmtree(objects, ignore_errors=True)
        run(["git", "lfs", "fetch", "origin", "main"], cwd=work)
    return timed_runs(fetch, n, seconds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fetches", type=int, default=20)
    ap.add_argument("--attackers", type=int, default=80)
    ap.add_argument("--mib", type=int, default=50)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=75,
                    help="the attack phase lasts at least this long (past the 60 s send deadline)")
    ap.add_argument("--hold", type=int, default=70, help="seconds a stalled peer keeps its connection")
    ap.add_argument("--authenticated", action="store_true",
                    help="stalled peers send credentials, from 127.0.0.1 (no anonymous share)")
    ap.add_argument("--config", help="a gitplane TOML file (default: built-in defaults)")
    a = ap.parse_args()
    require_binary()
    if shutil.which("git-lfs") is None:
        sys.exit("git-lfs is missing (apt-get install git-lfs)")
    tmp = tempfile.mkdtemp(prefix="lfs-stall-attack-")
    data = os.path.join(tmp, "data")
    proc, addrs = start_server(data, a.shards, a.config)
    addr = addrs["http"]
    try:
        password = open(os.path.join(data, "initial-admin-password")).read().strip()
        url = f"http://admin:{password}@{addr[0]}:{addr[1]}/admin/pub.git"
        admin(data, "repo", "create", "admin/pub", "--public")
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        for args in (["init", "-q", "-b", "main"], ["lfs", "install", "--local"],
                     ["lfs", "track", "*.bin"], ["remote", "add", "origin", url]):
            run(["git", *args], cwd=src)
        with open(os.path.join(src, "a.bin"), "wb") as f:
            f.write(os.urandom(a.mib << 20))
        run(["git", "add", "."], cwd=src)
        run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "a"], cwd=src)
        run(["git", "push", "-q", "origin", "main"], cwd=src)
        oid = run(["git", "lfs", "ls-files", "-l"], cwd=src).split()[0]
        client = os.path.join(tmp, "client")
        run(["git", "clone", "-q", url, client], stdin=None)
        fetch_times(client, 2)  # warm the page cache

        # As long as the attack phase, so both p99s rest on as many samples.
        quiet = fetch_times(client, a.fetches, a.seconds)
        quiet_rss = rss_mb(proc.pid)

        stop = threading.Event()
        counts = {}
        path = f"/admin/pub.git/info/lfs/objects/{oid}"
        auth = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode() if a.authenticated else None
        threads = []
        for i in range(a.attackers):
            source = "127.0.0.1" if a.authenticated else f"127.0.0.{11 + i // 4}"
            threads.append(threading.Thread(target=stalled_peer, daemon=True,
                                            args=(addr, source, path, auth, a.hold, stop, counts)))
        for t in threads:
            t.start()
        time.sleep(2)
        samples = {"rss": [], "pool": [], "active": []}

        def sample():
            while not stop.is_set():
                text = metrics(addr)
                samples["rss"].append(rss_mb(proc.pid))
                samples["pool"].append(metric(text, "gitplane_lfs_pool_buffers_in_use"))
                samples["active"].append(metric(text, "gitplane_lfs_active_transfers"))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        attacked = fetch_times(client, a.fetches, a.seconds)
        stop.set()
        for t in threads:
            t.join(timeout=15)
        sampler.join(timeout=5)
        text = metrics(addr)
        cuts = {r: metric(text, f'gitplane_stalled_cuts_total{{reason="{r}"}}')
                for r in ("http_send_idle", "anonymous_share")}
        pool_total = 32 * a.shards if not a.config else "see config"
        kind = "authenticated, one address" if a.authenticated else "anonymous, 4 per 127.0.0.x address"
        print(f"fetches of {a.mib} MiB: {len(quiet)} quiet, {len(attacked)} under attack; "
              f"{a.attackers} stalled peers ({kind}), shards {a.shards}, pool {pool_total} buffers")
        print(f"quiet:  p50 {pct(quiet, 50)*1000:.0f} ms  p99 {pct(quiet, 99)*1000:.0f} ms  "
              f"server RSS {quiet_rss:.1f} MB")
        print(f"attack: p50 {pct(attacked, 50)*1000:.0f} ms  p99 {pct(attacked, 99)*1000:.0f} ms  "
              f"server RSS max {max(samples['rss']):.1f} MB  pool buffers in use max "
              f"{max(samples['pool'])} (median {pct(samples['pool'], 50)})  LFS transfers max "
              f"{max(samples['active'])}")
        print(f"ratio:  p50 {pct(attacked, 50)/pct(quiet, 50):.2f}x  p99 {pct(attacked, 99)/pct(quiet, 99):.2f}x")
        print(f"cuts:   {cuts}  stalled peer answers by status: {counts}")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
