#!/usr/bin/env python3
"""Clone latency of a real client while anonymous peers stall request bodies (issue #17).

Starts target/release/gitplane on loopback with its default settings (pass --config to change
them), pushes a generated history into a private repository and five public ones with
`git push --mirror`, then clones the private one with the real git client N times without an
attack and N times while M anonymous connections keep POSTing git-upload-pack bodies that stall
(half send a few bytes then go silent, half trickle one byte every 2 s; each reconnects when the
server cuts it, so the attack lasts the whole run, at least --seconds). Reports clone p50/p99 for both phases, their
ratio, the server's RSS and the pack slots in use (sampled from /metrics) during the attack, and
the cuts the server counted.

    python3 bench/stall-attack.py [--clones 20] [--attackers 80] [--commits 300] [--shards 2]

Bounded: every socket has a timeout, the attack stops when the clones are done, the server is
killed at the end.
"""
import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import admin, make_history, metric, metrics, pct, require_binary, rss_mb, run, start_server, timed_runs  # noqa: E402


def attacker(addr, repo, oid, trickle, stop, counts):
    want = f"0032want {oid}\n".encode()
    head = (f"POST /{repo}.git/git-upload-pack HTTP/1.1\r\nHost: b\r\n"
            "Content-Type: application/x-git-upload-pack-request\r\nContent-Length: 4096\r\n\r\n").encode()
    while not stop.is_set():
        try:
            with socket.create_connection(addr, timeout=5) as s:
                s.sendall(head + want)
                s.settimeout(2 if trickle else 120)
                while not stop.is_set():
                    try:
                        data = s.recv(4096)
                        if not data:
                            break
                        counts["answers"] += 1
                        break
                    except socket.timeout:
                        if trickle:
                            s.sendall(b"0")
                        continue
        except OSError:
            time.sleep(0.1)


def clone_times(url, work, n, seconds=0):
    """At least n clones, and clones until `seconds` have passed."""
    def clone():
        dest = os.path.join(work, f"clone-{time.monotonic_ns()}")
        run(["git", "clone", "-q", url, dest])
        shutil.rmtree(dest)
    return timed_runs(clone, n, seconds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clones", type=int, default=20)
    ap.add_argument("--attackers", type=int, default=80)
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=75,
                    help="the attack phase lasts at least this long (past the 30 s body deadline, so cuts and reconnects happen)")
    ap.add_argument("--config", help="a gitplane TOML file (default: built-in defaults)")
    a = ap.parse_args()
    require_binary()
    tmp = tempfile.mkdtemp(prefix="stall-attack-")
    data = os.path.join(tmp, "data")
    proc, addrs = start_server(data, a.shards, a.config)
    addr = addrs["http"]
    try:
        password = open(os.path.join(data, "initial-admin-password")).read().strip()
        base = f"http://admin:{password}@{addr[0]}:{addr[1]}"
        oid = make_history(os.path.join(tmp, "src"), a.commits)
        repos = ["admin/private"] + [f"admin/public{i}" for i in range(5)]
        for r in repos:
            admin(data, "repo", "create", r, *([] if r == "admin/private" else ["--public"]))
            run(["git", "push", "-q", "--mirror", f"{base}/{r}.git"], cwd=os.path.join(tmp, "src"))
        url = f"{base}/admin/private.git"
        clone_times(url, tmp, 2)  # warm the page cache and the pack cache

        quiet = clone_times(url, tmp, a.clones)
        quiet_rss = rss_mb(proc.pid)

        stop = threading.Event()
        counts = {"answers": 0}
        threads = [threading.Thread(target=attacker, daemon=True,
                                    args=(addr, repos[1 + i % 5], oid, i % 2 == 1, stop, counts))
                   for i in range(a.attackers)]
        for t in threads:
            t.start()
        time.sleep(2)
        samples = {"rss": [], "slots": []}

        def sample():
            while not stop.is_set():
                samples["rss"].append(rss_mb(proc.pid))
                samples["slots"].append(metric(metrics(addr), "gitplane_pack_running"))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        attacked = clone_times(url, tmp, a.clones, a.seconds)
        stop.set()
        for t in threads:
            t.join(timeout=10)
        sampler.join(timeout=5)
        text = metrics(addr)
        cuts = {r: metric(text, f'gitplane_stalled_cuts_total{{reason="{r}"}}')
                for r in ("http_body_idle", "http_body_slow", "anonymous_share")}

        print(f"clones: {len(quiet)} quiet, {len(attacked)} under attack, {a.commits} commits, {a.attackers} attackers, shards {a.shards}")
        print(f"quiet:  p50 {pct(quiet, 50)*1000:.0f} ms  p99 {pct(quiet, 99)*1000:.0f} ms  server RSS {quiet_rss:.1f} MB")
        print(f"attack: p50 {pct(attacked, 50)*1000:.0f} ms  p99 {pct(attacked, 99)*1000:.0f} ms  "
              f"server RSS max {max(samples['rss']):.1f} MB  pack slots in use max {max(samples['slots'])}")
        print(f"ratio:  p50 {pct(attacked, 50)/pct(quiet, 50):.2f}x  p99 {pct(attacked, 99)/pct(quiet, 99):.2f}x")
        print(f"cuts:   {cuts}  attacker connections answered (cut): {counts['answers']}")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
