#!/usr/bin/env python3
"""The embedded SQLite store against PostgreSQL (issue #13), side by side in one run.

For each backend: starts target/release/gitplane on loopback (pack cache on, its default), pushes
a generated history with `git push --mirror` (a repository as a push leaves it), then runs
gitplane-load twice against a private repository with Basic credentials:
  - `clone` at --clients concurrent for --seconds: clones/s, and server CPU per clone (the
    server's and its reaped git children's user+system time, from /proc/PID/stat);
  - `fetch-noop` at --clients concurrent for --seconds: the advertisement and ls-refs only, two
    authenticated requests each, so requests/s through the credential cache and the store's
    access check.
PostgreSQL is the server named by --pg-admin-url (default the local one); a scratch database
is created for the run and dropped afterwards.

    python3 bench/store-compare.py [--clients 32] [--seconds 20] [--commits 300] [--rounds 2]

Backends alternate round by round (sqlite, postgres, sqlite, postgres, ...) so that drift of a
shared machine falls on both. Bounded: every phase lasts --seconds; servers are stopped at the
end.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import BIN, make_history, tree_cpu_seconds, require_binary, run, start_server, stop  # noqa: E402

LOAD = os.path.join(ROOT, "target", "release", "gitplane-load")



def psql(admin_url, sql):
    run(["psql", "-q", "-v", "ON_ERROR_STOP=1", admin_url, "-c", sql])


def load(scenario, url, clients, seconds, password):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [LOAD, scenario, "--url", url, "--user", "admin", "-c", str(clients), "-d",
             f"{seconds}s", "-t", "1", "-q", "--json", out.name],
            check=True, capture_output=True, text=True,
            env={**os.environ, "GITPLANE_LOAD_PASSWORD": password})
        report = json.load(open(out.name))
    return report


def one_backend(name, database_url, args, history):
    work = tempfile.mkdtemp(prefix=f"gp-store-{name}-")
    try:
        data = os.path.join(work, "data")
        extra = ("--database-url", database_url, "--node-id", "bench") if database_url else ()
        env_extra = {"GITPLANE_DATABASE_URL": database_url, "GITPLANE_NODE_ID": "bench"} \
            if database_url else {}
        proc, addrs = start_server(data, shards=2, extra=extra)
        try:
            host, port = addrs["http"]
            password = open(os.path.join(data, "initial-admin-password")).read().strip() \
                if os.path.exists(os.path.join(data, "initial-admin-password")) else None
            if password is None:
                sys.exit(f"{name}: no initial admin password (is the database fresh?)")
            env = {**os.environ, **env_extra}
            subprocess.run([BIN, "--data-dir", data, "repo", "create", "admin/bench"], check=True,
                           capture_output=True, env=env)
            url = f"http://admin:{password}@{host}:{port}/admin/bench.git"
            run(["git", "push", "-q", "--mirror", url], cwd=history)
            bare_url = f"http://{host}:{port}/admin/bench.git"
            # Warm-up: the pack cache's first entry, the credential cache, the pool's connections.
            load("clone", bare_url, 4, 3, password)
            results = {}
            for scenario in ("clone", "fetch-noop"):
                before = tree_cpu_seconds(proc.pid)
                report = load(scenario, bare_url, args.clients, args.seconds, password)
                cpu = tree_cpu_seconds(proc.pid) - before
                results[scenario] = {
                    "per_sec": report["throughput"],
                    "cpu_ms_per_op": 1000.0 * cpu / max(report["ok"], 1),
                    "errors": report["errors_total"],
                }
            return results
        finally:
            stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pg-admin-url", default=os.environ.get(
        "GITPLANE_TEST_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    require_binary()
    if not os.path.exists(LOAD):
        sys.exit("build first: cargo build --release -p gitplane-load")
    scratch = tempfile.mkdtemp(prefix="gp-store-hist-")
    history = os.path.join(scratch, "h")
    make_history(history, args.commits)
    totals = {"sqlite": [], "postgres": []}
    try:
        for r in range(args.rounds):
            for name in ("sqlite", "postgres"):
                url = None
                db = f"gitplane_bench_{os.getpid()}_{r}"
                if name == "postgres":
                    psql(args.pg_admin_url, f"CREATE DATABASE {db}")
                    url = args.pg_admin_url.rsplit("/", 1)[0] + "/" + db
                try:
                    res = one_backend(name, url, args, history)
                finally:
                    if url:
                        time.sleep(1)
                        psql(args.pg_admin_url, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
                totals[name].append(res)
                print(f"round {r + 1} {name:8}: " + "; ".join(
                    f"{s} {v['per_sec']:.1f}/s, {v['cpu_ms_per_op']:.2f} CPU-ms/op, "
                    f"{v['errors']} errors" for s, v in res.items()), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def mean(name, scenario, key):
        xs = [t[scenario][key] for t in totals[name]]
        return sum(xs) / len(xs)

    print(f"\n{args.clients} clients, {args.seconds} s per phase, {args.rounds} rounds, "
          f"history of {args.commits} commits")
    print("| | SQLite | PostgreSQL | PostgreSQL / SQLite |")
    print("|---|---|---|---|")
    for scenario, label in (("clone", "clones/s"), ("fetch-noop", "fetch-noop/s (2 auth requests each)")):
        s, p = mean("sqlite", scenario, "per_sec"), mean("postgres", scenario, "per_sec")
        print(f"| {label} | {s:.1f} | {p:.1f} | {p / s:.3f} |")
        s, p = mean("sqlite", scenario, "cpu_ms_per_op"), mean("postgres", scenario, "cpu_ms_per_op")
        print(f"| server CPU-ms per {scenario} | {s:.2f} | {p:.2f} | {p / s:.3f} |")


if __name__ == "__main__":
    main()
