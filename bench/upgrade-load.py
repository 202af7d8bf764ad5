#!/usr/bin/env python3
"""Hot upgrades under clone load (issue #15).

Starts target/release/gitplane on loopback with a pid file, pushes a generated history with
`git push --mirror`, then runs C concurrent `git clone` loops for two phases of equal length: one
without upgrades, one with U upgrades (`gitplane upgrade --pid-file`, evenly spaced). A probe
opens a new connection and asks /healthz every 5 ms throughout. Reports per phase: clones,
failures, clone p50/p99, probe failures (no answer: refused, reset, timed out; a draining
generation's 503 counts as answered and is shown apart), and the longest gap between two answered
probes (the longest time in which no new connection was accepted and served).

    python3 bench/upgrade-load.py [--clients 32] [--upgrades 10] [--seconds 40] [--commits 300]

Bounded: each phase lasts --seconds; every socket has a timeout; the server is stopped at the end.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import BIN, admin, make_history, pct, require_binary, run, start_server  # noqa: E402


class Phase:
    def __init__(self):
        self.lock = threading.Lock()
        self.clone_times, self.clone_failures = [], []
        self.probe_ok, self.probe_failures, self.probe_draining = [], 0, 0


def cloner(url, work, stop, phase_ref):
    n = 0
    while not stop.is_set():
        dest = os.path.join(work, f"c-{threading.get_ident()}-{n}")
        n += 1
        t = time.monotonic()
        r = subprocess.run(["git", "clone", "-q", url, dest], capture_output=True, text=True)
        took = time.monotonic() - t
        phase = phase_ref[0]
        with phase.lock:
            if r.returncode == 0:
                phase.clone_times.append(took)
            else:
                phase.clone_failures.append(r.stderr.strip()[:200])
        shutil.rmtree(dest, ignore_errors=True)


def prober(addr, stop, phase_ref):
    while not stop.is_set():
        phase = phase_ref[0]
        try:
            with socket.create_connection(addr, timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
                head = s.recv(64)
        except OSError:
            head = b""
        with phase.lock:
            # A draining generation answers 503 "shutting down" on /healthz: served all the same.
            if head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.1 503"):
                phase.probe_ok.append(time.monotonic())
                phase.probe_draining += head.startswith(b"HTTP/1.1 503")
            else:
                phase.probe_failures += 1
        time.sleep(0.005)


def longest_gap(stamps):
    return max((b - a for a, b in zip(stamps, stamps[1:])), default=float("nan"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--upgrades", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=40)
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--shards", type=int, default=2)
    a = ap.parse_args()
    require_binary()
    tmp = tempfile.mkdtemp(prefix="upgrade-load-")
    data, pid_file = os.path.join(tmp, "data"), os.path.join(tmp, "gitplane.pid")
    proc, addrs = start_server(data, a.shards, extra=("--pid-file", pid_file))
    addr = addrs["http"]
    try:
        password = open(os.path.join(data, "initial-admin-password")).read().strip()
        src = os.path.join(tmp, "src")
        make_history(src, a.commits)
        admin(data, "repo", "create", "admin/proj")
        url = f"http://admin:{password}@{addr[0]}:{addr[1]}/admin/proj.git"
        run(["git", "push", "-q", "--mirror", url], cwd=src)

        quiet, upgrading = Phase(), Phase()
        phase_ref = [quiet]
        stop = threading.Event()
        work = os.path.join(tmp, "clones")
        os.makedirs(work)
        threads = [threading.Thread(target=cloner, args=(url, work, stop, phase_ref), daemon=True)
                   for _ in range(a.clients)]
        threads.append(threading.Thread(target=prober, args=(addr, stop, phase_ref), daemon=True))
        for t in threads:
            t.start()
        time.sleep(a.seconds)
        phase_ref[0] = upgrading
        pids, upgrade_failures = [], []
        started = time.monotonic()
        for i in range(a.upgrades):
            target = started + (i + 0.5) * a.seconds / a.upgrades
            time.sleep(max(0.0, target - time.monotonic()))
            r = subprocess.run([BIN, "upgrade", "--pid-file", pid_file], capture_output=True, text=True)
            if r.returncode != 0:
                upgrade_failures.append(r.stderr.strip())
            pids.append(open(pid_file).read().strip())
        time.sleep(max(0.0, started + a.seconds - time.monotonic()))
        stop.set()
        for t in threads:
            t.join(timeout=60)

        print(f"{a.clients} concurrent clones, {a.commits} commits, shards {a.shards}, {a.seconds} s per phase")
        for name, p in (("without upgrades", quiet), (f"{a.upgrades} upgrades", upgrading)):
            print(f"{name:>18}: clones {len(p.clone_times)} failed {len(p.clone_failures)}  "
                  f"p50 {pct(p.clone_times, 50)*1000:.0f} ms  p99 {pct(p.clone_times, 99)*1000:.0f} ms  "
                  f"probes {len(p.probe_ok)} (503 draining {p.probe_draining}) failed {p.probe_failures}  "
                  f"longest gap {longest_gap(p.probe_ok)*1000:.0f} ms")
        print(f"p99 ratio (upgrades / none): {pct(upgrading.clone_times, 99) / pct(quiet.clone_times, 99):.2f}x")
        print(f"generations: {len(set(pids))} new pids; upgrade command failures: {upgrade_failures}")
        for f in (quiet.clone_failures + upgrading.clone_failures)[:5]:
            print("  failure:", f)
    finally:
        try:
            os.kill(int(open(pid_file).read()), 15)
        except (OSError, ValueError):
            pass
        proc.kill()
        time.sleep(1)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
