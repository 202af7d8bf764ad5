#!/usr/bin/env python3
"""Housekeeping (issue #12), the two figures bench/compare.sh does not give, in one run:

1. A push's wall time with housekeeping on and off: `git push --mirror` of the bench fixture
   (bench/fixture/make_repo.sh, 52 MB) into a fresh gitplane, --rounds times each, the two modes
   alternating. With housekeeping on, also the pass that follows: its wall time (the server's
   duration histogram) and the CPU the server tree spent from the push's end to the pass's end.
2. After --small-pushes small pushes (one commit each, over HTTP) on top of that import, the
   repository as housekeeping keeps it against the same repository repacked by hand
   (`git repack -adb`, `git commit-graph write --reachable`) served by `git daemon`: full
   clones at each --concurrency (4x that many clones, at least 32), pack cache off; server CPU
   per clone (user+system time of the server's process tree, reaped children included) and
   peak RSS of the server's process tree (VmRSS summed, sampled every 50 ms).

    python3 bench/housekeeping.py [--rounds 3] [--small-pushes 300] [--concurrency 8 32]

Bounded: every push and load has a timeout; servers are stopped at the end.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import BIN, GIT_ENV, fixture, metric, metrics, require_binary, run, start_server, stop  # noqa: E402
from servertree import CLK_TCK, Measurement, snapshot, tree_cpu_ticks  # noqa: E402

LOAD = os.path.join(ROOT, "target", "release", "gitplane-load")
CLEAN = "[git]\npack_cache = false\nanonymous_max_concurrent = 64\nanonymous_max_per_ip = 64\n"


def config(path, housekeeping):
    with open(path, "w") as f:
        f.write(CLEAN + "[housekeeping]\nsweep_interval_secs = 0\n")
        f.write(f"[hooks.concurrency]\nhousekeeping = {1 if housekeeping else 0}\n")
    return path


def git(*args, cwd=None, timeout=600):
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def tree_cpu(root):
    """User+system seconds of the process tree under `root`, each process with the children it
    has reaped (git daemon runs under a `git` parent and reaps its own children)."""
    return tree_cpu_ticks(snapshot([root])) / CLK_TCK


def wait_maintained(addr, repo, limit=600):
    """Until the pass the push asked for has run: counters reset, nothing running."""
    state = os.path.join(repo, "gitplane-housekeeping")
    deadline = time.time() + limit
    while time.time() < deadline:
        text = metrics(addr)
        pending = 1
        if os.path.exists(state):
            for line in open(state):
                if line.startswith("pushes_since_run"):
                    pending = int(line.split()[1])
        if pending == 0 and metric(text, "gitplane_housekeeping_running") == 0:
            return text
        time.sleep(0.05)
    sys.exit(f"housekeeping did not finish within {limit} s")


def new_server(work, housekeeping):
    data = os.path.join(work, "data")
    proc, addrs = start_server(data, shards=2,
                               config=config(os.path.join(work, "gp.toml"), housekeeping))
    run([BIN, "--data-dir", data, "repo", "create", "bench/fixture", "--public"])
    run([BIN, "--data-dir", data, "repo", "grant", "bench/fixture", "admin", "write"])
    password = open(os.path.join(data, "initial-admin-password")).read().strip()
    host, port = addrs["http"]
    url = f"http://admin:{password}@{host}:{port}/bench/fixture.git"
    return proc, addrs["http"], url, os.path.join(data, "repos", "bench", "fixture.git")


def duration_sum(text):
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("gitplane_housekeeping_duration_seconds_sum"))


def push_round(source, housekeeping):
    work = tempfile.mkdtemp(prefix="gp-hk-")
    proc, addr, url, repo = new_server(work, housekeeping)
    try:
        t0 = time.monotonic()
        git("--git-dir", source, "push", "-q", "--mirror", url)
        wall = time.monotonic() - t0
        row = {"push_s": wall}
        if housekeeping:
            cpu0 = tree_cpu(proc.pid)
            text = wait_maintained(addr, repo)
            time.sleep(0.2)
            row["pass_s"] = duration_sum(text)
            row["pass_cpu_s"] = tree_cpu(proc.pid) - cpu0
        return row
    finally:
        stop(proc, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def clone_load(url, clients, clones, root):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        measured = Measurement([root])
        measured.start()
        subprocess.run([LOAD, "clone", "--url", url, "-c", str(clients), "-n", str(clones),
                        "-t", "1", "-q", "--timeout", "300s", "--json", out.name],
                       check=True, capture_output=True, timeout=900)
        # Waits until every git child is reaped: its CPU is in the parent's cutime/cstime.
        result = measured.stop()
        cpu, peak = result["server_cpu_s"], result["peak_rss_bytes"] / 2**20
        report = json.load(open(out.name))
    ok = report["ok"]
    return {"clones": ok, "errors": report["errors_total"], "clones_per_s": report["throughput"],
            "cpu_s_per_clone": cpu / max(ok, 1), "peak_rss_mb": peak}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def after_small_pushes(source, args):
    work = tempfile.mkdtemp(prefix="gp-hk-small-")
    proc, addr, url, repo = new_server(work, True)
    daemon = None
    try:
        git("--git-dir", source, "push", "-q", "--mirror", url)
        wait_maintained(addr, repo)
        wt = os.path.join(work, "wt")
        git("clone", "-q", url, wt)
        t0 = time.monotonic()
        for i in range(args.small_pushes):
            with open(os.path.join(wt, "small.txt"), "a") as f:
                f.write(f"push {i}\n")
            git("add", "small.txt", cwd=wt)
            git("-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", f"push {i}",
                cwd=wt)
            git("push", "-q", "origin", "HEAD:main", cwd=wt)
        pushes_s = time.monotonic() - t0
        text = wait_maintained(addr, repo)
        packs = [p for p in os.listdir(os.path.join(repo, "objects", "pack")) if p.endswith(".pack")]
        loose = sum(len(os.listdir(os.path.join(repo, "objects", d)))
                    for d in os.listdir(os.path.join(repo, "objects"))
                    if len(d) == 2 and os.path.isdir(os.path.join(repo, "objects", d)))
        state = {"small_pushes": args.small_pushes, "pushes_wall_s": pushes_s,
                 "packs": len(packs), "loose_objects": loose,
                 "housekeeping_runs": {line.split()[0]: int(float(line.split()[-1]))
                                       for line in text.splitlines()
                                       if line.startswith("gitplane_housekeeping_runs_total")
                                       and not line.endswith(" 0")}}
        # The same content, repacked by hand, for git daemon.
        base = os.path.join(work, "daemon")
        by_hand = os.path.join(base, "bench", "fixture.git")
        os.makedirs(os.path.dirname(by_hand))
        git("clone", "-q", "--mirror", repo, by_hand)
        git("-C", by_hand, "repack", "-a", "-d", "-b", "-q")
        git("-C", by_hand, "commit-graph", "write", "--reachable")
        port = free_port()
        daemon = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={base}",
             "--listen=127.0.0.1", f"--port={port}", "--max-connections=256"],
            env=GIT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        host, http_port = addr
        rows = []
        for c in args.concurrency:
            clones = max(4 * c, 32)
            for name, target, root in (
                    ("gitplane", f"http://{host}:{http_port}/bench/fixture.git", proc.pid),
                    ("git daemon", f"git://127.0.0.1:{port}/bench/fixture.git", daemon.pid)):
                row = clone_load(target, c, clones, root)
                rows.append({"server": name, "concurrency": c, **row})
                print(json.dumps(rows[-1]), flush=True)
        return state, rows
    finally:
        if daemon:
            stop(daemon)
        stop(proc, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--small-pushes", type=int, default=300)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    args = p.parse_args()
    require_binary()
    if not os.path.exists(LOAD):
        sys.exit(f"{LOAD} missing: cargo build --release -p gitplane-load")
    source = fixture()

    on, off = [], []
    for r in range(args.rounds):
        for housekeeping in ((True, False) if r % 2 == 0 else (False, True)):
            row = push_round(source, housekeeping)
            (on if housekeeping else off).append(row)
            print(json.dumps({"housekeeping": housekeeping, **row}), flush=True)
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    pairs = ", ".join("%.2f/%.2f" % (a["push_s"], b["push_s"]) for a, b in zip(on, off))
    print("\n## push --mirror of the fixture (52 MB), median of", args.rounds, "rounds")
    print(f"- wall time, housekeeping on: {med(on, 'push_s'):.2f} s; off: {med(off, 'push_s'):.2f} s;"
          f" ratio on/off {med(on, 'push_s') / med(off, 'push_s'):.2f}"
          f" (each round on/off: {pairs})")
    print(f"- the pass after it: {med(on, 'pass_s'):.2f} s wall, {med(on, 'pass_cpu_s'):.2f} CPU-s")

    state, rows = after_small_pushes(source, args)
    print(f"\n## after {state['small_pushes']} small pushes ({state['pushes_wall_s']:.1f} s of pushing)")
    print(f"- packs {state['packs']}, loose objects {state['loose_objects']}; passes: {state['housekeeping_runs']}")
    print("\n| server | concurrency | clones | errors | CPU-s per clone | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['clones']} | {r['errors']} |"
              f" {r['cpu_s_per_clone']:.3f} | {r['peak_rss_mb']:.0f} |")
    for c in args.concurrency:
        g = next(r for r in rows if r["server"] == "gitplane" and r["concurrency"] == c)
        d = next(r for r in rows if r["server"] == "git daemon" and r["concurrency"] == c)
        print(f"- c={c}: CPU per clone gitplane/git daemon {g['cpu_s_per_clone'] / d['cpu_s_per_clone']:.2f},"
              f" peak RSS {g['peak_rss_mb'] / d['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
