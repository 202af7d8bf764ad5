#!/usr/bin/env python3
"""The cluster (issue #14), measured on loopback with the release binary.

Starts three target/release/gitplane nodes on one scratch PostgreSQL database (created on the
server --pg-admin-url names, dropped at the end) with LFS in moto's S3, then measures:
  1. push latency, replication factor 1 against 3: --pushes small pushes (one commit each) to
     one repository of each, alternated, p50/p99;
  2. clones through a node that relays against clones from the node holding the copy: the
     relaying node's CPU per clone (its process tree: the server and its relay threads) against
     the holder's (server, upload-pack, pack-objects), gitplane-load clone at --clients for
     --seconds each, the same repository (pushed with `git push --mirror`); the relay's added
     CPU is what the cluster spends on a relayed clone (relaying node + holder) minus what the
     holder spends on a clone it serves itself (the front end then runs there instead);
  3. repair time against missed pushes: node 3 SIGSTOPped, M pushes, SIGCONT, time until
     `gitplane cluster status` says every copy agrees.

    python3 bench/cluster.py [--pushes 40] [--clients 8] [--seconds 15] [--missed 10,50,200]
                             [--perf FILE]   # the relaying node's profile: perf report -i FILE
                             [--history DIR] # clone DIR (e.g. bench/fixture/cache/fixture.git)
                                             # instead of a --commits (300) repository
                             [--no-pack-cache]  # every clone runs pack-objects (and no relay cache)
                             [--no-relay-cache] # every relayed clone is relayed, none answered
                                                # from the relaying node's copy (docs/CLUSTER.md)
                             [--after-push 5]   # rounds of a push, then two relayed clones: the
                                                # relay cache's misses (0: none)

Bounded: each phase is bounded in count or time; nodes are stopped and the database dropped.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import BIN, make_history, thread_cpu_seconds, tree_cpu_seconds, pct, require_binary, run, start_server  # noqa: E402

LOAD = os.path.join(ROOT, "target", "release", "gitplane-load")



def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Cluster:
    def __init__(self, work, db_url, secret, s3_port, pack_cache=True, relay_cache=True):
        self.work, self.db_url, self.secret = work, db_url, secret
        self.config = os.path.join(work, "gitplane.toml")
        with open(self.config, "w") as f:
            f.write(f"[lfs.s3]\nendpoint = \"127.0.0.1:{s3_port}\"\nbucket = \"bench\"\n"
                    "access_key_id = \"t\"\nsecret_access_key = \"t\"\n"
                    "[cluster]\ndown_after_ms = 3000\nheartbeat_ms = 300\n"
                    f"relay_cache = {'true' if relay_cache else 'false'}\n"
                    f"[git]\npack_cache = {'true' if pack_cache else 'false'}\n")
        self.nodes = []
        for i in range(1, 4):
            data = os.path.join(work, f"n{i}")
            proc, addrs = start_server(data, shards=2, config=self.config, extra=(
                "--database-url", db_url, "--node-id", f"n{i}", "--cluster-listen",
                "127.0.0.1:0", "--cluster-secret-file", secret))
            self.nodes.append((proc, addrs, data))
        self.password = open(os.path.join(work, "n1", "initial-admin-password")).read().strip()

    def admin(self, *args):
        return run([BIN, "--data-dir", self.nodes[0][2], "--database-url", self.db_url,
                    "--cluster-secret-file", self.secret, *args])

    def url(self, node, repo, auth=True):
        host, port = self.nodes[node][1]["http"]
        cred = f"admin:{self.password}@" if auth else ""
        return f"http://{cred}{host}:{port}/{repo}.git"

    def agree(self):
        return "every repository's replicas agree" in self.admin("cluster", "status")

    def stop(self):
        for proc, _, _ in self.nodes:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                proc.wait(timeout=30)
            except Exception:
                proc.kill()


def push_latency(c, work, pushes):
    times = {1: [], 3: []}
    dirs = {}
    for rf in (1, 3):
        c.admin("repo", "create", f"admin/rf{rf}", "--replication-factor", str(rf))
        d = os.path.join(work, f"w{rf}")
        make_history(d, 1)
        run(["git", "push", "-q", c.url(0, f"admin/rf{rf}"), "HEAD:refs/heads/main"], cwd=d)
        dirs[rf] = d
    for i in range(pushes):
        for rf in (1, 3):
            d = dirs[rf]
            with open(os.path.join(d, "p.txt"), "w") as f:
                f.write(str(i))
            run(["git", "add", "p.txt"], cwd=d)
            run(["git", "commit", "-qm", f"p{i}"], cwd=d)
            t = time.monotonic()
            run(["git", "push", "-q", c.url(0, f"admin/rf{rf}"), "HEAD:refs/heads/main"], cwd=d)
            times[rf].append(time.monotonic() - t)
    return times


def after_push(c, rounds):
    """The relayed clones that cannot be answered from the relaying node's cache: `rounds` times,
    a push to the holder (a new ref: a new generation), then two clones through the relaying
    node (the relay cache keeps an answer the second time its request comes); CPU per clone of
    both nodes, counted around each clone only."""
    holder = next(i for i in range(3)
                  if os.path.isdir(os.path.join(c.nodes[i][2], "repos", "admin", "relay.git")))
    relay = (holder + 1) % 3
    pid, holder_pid = c.nodes[relay][0].pid, c.nodes[holder][0].pid
    head = run(["git", "ls-remote", c.url(holder, "admin/relay"), "HEAD"]).split()[0]
    cpu = {"first": [0.0, 0.0], "second": [0.0, 0.0]}
    for i in range(rounds):
        with tempfile.TemporaryDirectory() as scratch:
            run(["git", "init", "-q", "--bare", scratch])
            run(["git", "fetch", "-q", "--depth", "1", c.url(holder, "admin/relay"), head], cwd=scratch)
            run(["git", "push", "-q", c.url(holder, "admin/relay"), f"{head}:refs/heads/bump-{i}"],
                cwd=scratch)
        for which in ("first", "second"):
            before, before_h = tree_cpu_seconds(pid), tree_cpu_seconds(holder_pid)
            subprocess.run([LOAD, "clone", "--url", c.url(relay, "admin/relay", auth=False),
                            "--user", "admin", "-c", "1", "-n", "1", "-q"], check=True,
                           capture_output=True,
                           env={**os.environ, "GITPLANE_LOAD_PASSWORD": c.password})
            cpu[which][0] += tree_cpu_seconds(pid) - before
            cpu[which][1] += tree_cpu_seconds(holder_pid) - before_h
    return {k: {"entry_cpu_ms": 1000 * v[0] / rounds, "holder_cpu_ms": 1000 * v[1] / rounds}
            for k, v in cpu.items()}


def clone_relay(c, history, clients, seconds, perf=None):
    out = c.admin("repo", "create", "admin/relay", "--replication-factor", "1")
    holder = next(i for i in range(3) if f"n{i + 1}" in out)
    relay = (holder + 1) % 3
    run(["git", "push", "-q", "--mirror", c.url(holder, "admin/relay")], cwd=history)
    res = {}
    for name, node in (("holder", holder), ("relay", relay)):
        pid = c.nodes[node][0].pid
        holder_pid = c.nodes[holder][0].pid
        with tempfile.NamedTemporaryFile(suffix=".json") as rep:
            subprocess.run([LOAD, "clone", "--url", c.url(node, "admin/relay", auth=False),
                            "--user", "admin", "-c", "2", "-d", "3s", "-q"], check=True,
                           capture_output=True, env={**os.environ, "GITPLANE_LOAD_PASSWORD": c.password})
            before, before_h = tree_cpu_seconds(pid), tree_cpu_seconds(holder_pid)
            threads_before, holder_threads_before = thread_cpu_seconds(pid), thread_cpu_seconds(holder_pid)
            recorder = None
            if perf and name == "relay":
                recorder = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-g", "-q", "-o", perf,
                                             "-p", str(pid)], stdout=subprocess.DEVNULL)
            subprocess.run([LOAD, "clone", "--url", c.url(node, "admin/relay", auth=False),
                            "--user", "admin", "-c", str(clients), "-d", f"{seconds}s", "-q",
                            "--json", rep.name], check=True, capture_output=True,
                           env={**os.environ, "GITPLANE_LOAD_PASSWORD": c.password})
            cpu, cpu_h = tree_cpu_seconds(pid) - before, tree_cpu_seconds(holder_pid) - before_h
            threads = {k: v - threads_before.get(k, 0) for k, v in thread_cpu_seconds(pid).items()}
            holder_threads = {k: v - holder_threads_before.get(k, 0)
                              for k, v in thread_cpu_seconds(holder_pid).items()}
            if recorder:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(timeout=60)
            r = json.load(open(rep.name))
        n = max(r["ok"], 1)
        res[name] = {"clones_per_s": r["throughput"], "errors": r["errors_total"],
                     "entry_cpu_ms": 1000 * cpu / n, "holder_cpu_ms": 1000 * cpu_h / n,
                     "p99_ms": r["latency_ms"]["p99"],
                     "threads_ms": {k: 1000 * v / n for k, v in threads.items()},
                     "holder_threads_ms": {k: 1000 * v / n for k, v in holder_threads.items()}}
    return res


def repair_times(c, work, missed_list):
    c.admin("repo", "create", "admin/repair")
    d = os.path.join(work, "wr")
    make_history(d, 1)
    run(["git", "push", "-q", c.url(0, "admin/repair"), "HEAD:refs/heads/main"], cwd=d)
    out = {}
    for missed in missed_list:
        proc = c.nodes[2][0]
        proc.send_signal(signal.SIGSTOP)
        time.sleep(3.5)
        for i in range(missed):
            with open(os.path.join(d, "r.txt"), "w") as f:
                f.write(f"{missed}-{i}")
            run(["git", "add", "r.txt"], cwd=d)
            run(["git", "commit", "-qm", f"r{missed}-{i}"], cwd=d)
            run(["git", "push", "-q", c.url(i % 2, "admin/repair"), "HEAD:refs/heads/main"], cwd=d)
        t = time.monotonic()
        proc.send_signal(signal.SIGCONT)
        deadline = t + 120
        while time.monotonic() < deadline and not c.agree():
            time.sleep(0.05)
        out[missed] = time.monotonic() - t
    return out


def print_threads(relay, key, direct_label, relayed_label):
    """One line per thread name: its CPU per clone in the direct phase and in the relayed one."""
    names = sorted(set(relay["holder"][key]) | set(relay["relay"][key]))
    for name in names:
        d, r = (relay[phase][key].get(name, 0) for phase in ("holder", "relay"))
        if max(d, r) >= 0.01:
            print(f"    {name:22} {direct_label} {d:6.2f}  {relayed_label} {r:6.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pushes", type=int, default=40)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--history", help="clone this repository (pushed with --mirror) instead of a "
                    "--commits one, e.g. the bench fixture: bench/fixture/cache/fixture.git")
    ap.add_argument("--missed", default="10,50,200")
    ap.add_argument("--no-pack-cache", action="store_true",
                    help="nodes generate every pack (git.pack_cache = false)")
    ap.add_argument("--after-push", type=int, default=5,
                    help="rounds of a push then two relayed clones (the relay cache's misses); 0: none")
    ap.add_argument("--no-relay-cache", action="store_true",
                    help="the relaying node relays every clone (cluster.relay_cache = false)")
    ap.add_argument("--perf", help="record the relaying node's CPU profile (perf, cpu-clock) to this file")
    ap.add_argument("--pg-admin-url", default=os.environ.get(
        "GITPLANE_TEST_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    require_binary()
    work = tempfile.mkdtemp(prefix="gp-cluster-bench-")
    db = f"gitplane_cluster_bench_{os.getpid()}"
    run(["psql", "-q", args.pg_admin_url, "-c", f"CREATE DATABASE {db}"])
    db_url = args.pg_admin_url.rsplit("/", 1)[0] + "/" + db
    s3_port = free_port()
    s3 = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                           str(s3_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = None
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", s3_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        run(["curl", "-s", "-X", "PUT", f"http://127.0.0.1:{s3_port}/bench"])
        secret = os.path.join(work, "secret")
        with open(secret, "w") as f:
            f.write("bench-cluster-secret-0123456789abcdef\n")
        c = Cluster(work, db_url, secret, s3_port, pack_cache=not args.no_pack_cache,
                    relay_cache=not args.no_relay_cache)
        times = push_latency(c, work, args.pushes)
        print(f"push latency over {args.pushes} pushes each (ms):")
        for rf, ts in times.items():
            ms = [t * 1000 for t in ts]
            print(f"  replication factor {rf}: p50 {pct(ms, 50):.0f}  p99 {pct(ms, 99):.0f}")
        history = args.history or os.path.join(work, "history")
        if not args.history:
            make_history(history, args.commits)
        relay = clone_relay(c, history, args.clients, args.seconds, args.perf)
        shape = args.history or f"{args.commits}-commit repository"
        print(f"clones at {args.clients} clients for {args.seconds} s, {shape}:")
        for name, r in relay.items():
            print(f"  through the {name:6}: {r['clones_per_s']:.1f} clones/s, p99 {r['p99_ms']:.0f} ms, "
                  f"{r['errors']} errors; entry node CPU {r['entry_cpu_ms']:.2f} ms/clone, "
                  f"holder CPU {r['holder_cpu_ms']:.2f} ms/clone")
        direct = max(relay["holder"]["holder_cpu_ms"], 1e-9)
        relayed = relay["relay"]["entry_cpu_ms"] + relay["relay"]["holder_cpu_ms"]
        print(f"  cluster CPU per clone: {direct:.2f} ms served where the copy is, {relayed:.2f} ms "
              f"relayed (relaying node {relay['relay']['entry_cpu_ms']:.2f} + holder "
              f"{relay['relay']['holder_cpu_ms']:.2f})")
        print(f"  the relay's added CPU per clone: {relayed - direct:.2f} ms = "
              f"{100 * (relayed - direct) / direct:.1f}% of serving it locally")
        print("  CPU per clone of the node reached, by thread (ms; ended threads are the relays' and "
              "other short-lived ones):")
        print_threads(relay, "threads_ms", "holder", "relaying")
        print("  the holder's CPU per clone by thread, serving its own clients against relayed ones (ms):")
        print_threads(relay, "holder_threads_ms", "own clients", "relayed")
        if args.after_push:
            for which, r in after_push(c, args.after_push).items():
                print(f"  the {which} relayed clone after each of {args.after_push} pushes: relaying "
                      f"node {r['entry_cpu_ms']:.2f} ms, holder {r['holder_cpu_ms']:.2f} ms")
        missed = [int(x) for x in args.missed.split(",") if x]  # "": no repair phase
        for m, secs in repair_times(c, work, missed).items():
            print(f"repair after {m:4} missed pushes: {secs:.2f} s")
    finally:
        if c:
            c.stop()
        s3.kill()
        time.sleep(1)
        run(["psql", "-q", args.pg_admin_url, "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
