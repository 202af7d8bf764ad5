#!/usr/bin/env python3
"""The v2 advertisement and ls-refs answered without git against the same requests answered by
git (issue #12, item 6), side by side in one server.

One `gitplane serve`, two public repositories with the same content (the bench fixture, pushed
with `git push --mirror`). One of them gets `uploadpack.allowFilter = true` in its own config, a
setting that changes nothing in the answers (the server gives every git the same) but that makes
gitplane leave both requests to git, as it does for any repository config mentioning upload-pack
settings. `gitplane-load fetch-noop` (an up-to-date fetch: the advertisement and ls-refs, two
requests) runs against each for --seconds at --clients, the two alternating for --rounds:
requests/s and the server's CPU per fetch (its and its reaped children's user+system time).

    python3 bench/v2-answers.py [--clients 8] [--seconds 10] [--rounds 3]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import BIN, GIT_ENV, fixture, metric, metrics, require_binary, run, start_server, stop, tree_cpu_seconds  # noqa: E402

LOAD = os.path.join(ROOT, "target", "release", "gitplane-load")


def fetch_noop(url, clients, seconds):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([LOAD, "fetch-noop", "--url", url, "-c", str(clients), "-d",
                        f"{seconds}s", "-t", "1", "-q", "--json", out.name],
                       check=True, capture_output=True, timeout=seconds + 120)
        return json.load(open(out.name))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    require_binary()
    source = fixture()
    work = tempfile.mkdtemp(prefix="gp-v2-")
    proc = None
    try:
        data = os.path.join(work, "data")
        proc, addrs = start_server(data, shards=2)
        host, port = addrs["http"]
        password = open(os.path.join(data, "initial-admin-password")).read().strip()
        urls = {}
        for name in ("served", "to-git"):
            run([BIN, "--data-dir", data, "repo", "create", f"admin/{name}", "--public"])
            subprocess.run(["git", "--git-dir", source, "push", "-q", "--mirror",
                            f"http://admin:{password}@{host}:{port}/admin/{name}.git"],
                           env=GIT_ENV, check=True, timeout=600)
            urls[name] = f"http://{host}:{port}/admin/{name}.git"
        subprocess.run(["git", "-C", os.path.join(data, "repos", "admin", "to-git.git"), "config",
                        "uploadpack.allowFilter", "true"], env=GIT_ENV, check=True)
        time.sleep(2)  # housekeeping of the two imports
        results = {"served": [], "to-git": []}
        for r in range(args.rounds):
            for name in (("served", "to-git") if r % 2 == 0 else ("to-git", "served")):
                before_spawned = metric(metrics((host, port)), "gitplane_git_spawned_total")
                cpu0 = tree_cpu_seconds(proc.pid)
                report = fetch_noop(urls[name], args.clients, args.seconds)
                time.sleep(0.3)
                cpu = tree_cpu_seconds(proc.pid) - cpu0
                spawned = metric(metrics((host, port)), "gitplane_git_spawned_total") - before_spawned
                row = {"repo": name, "fetches_per_s": report["throughput"], "ok": report["ok"],
                       "errors": report["errors_total"],
                       "cpu_ms_per_fetch": 1000 * cpu / max(report["ok"], 1),
                       "git_spawned_per_fetch": spawned / max(report["ok"], 1)}
                results[name].append(row)
                print(json.dumps(row), flush=True)
        med = {n: {k: statistics.median(r[k] for r in rows)
                   for k in ("fetches_per_s", "cpu_ms_per_fetch", "git_spawned_per_fetch")}
               for n, rows in results.items()}
        print("\n| answered by | fetches/s | CPU ms per fetch | git spawned per fetch |")
        print("|---|---:|---:|---:|")
        for n, label in (("served", "gitplane (git::v2)"), ("to-git", "git upload-pack")):
            m = med[n]
            print(f"| {label} | {m['fetches_per_s']:.0f} | {m['cpu_ms_per_fetch']:.2f} |"
                  f" {m['git_spawned_per_fetch']:.2f} |")
        print(f"\nratios gitplane/git: fetches/s {med['served']['fetches_per_s'] / med['to-git']['fetches_per_s']:.2f},"
              f" CPU per fetch {med['served']['cpu_ms_per_fetch'] / med['to-git']['cpu_ms_per_fetch']:.2f}"
              f" (medians of {args.rounds} rounds, {args.clients} clients, {args.seconds} s each)")
    finally:
        if proc:
            stop(proc, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
