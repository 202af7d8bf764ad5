#!/usr/bin/env python3
"""Run a bounded batch of `git clone --bare -q` against one server and measure it.

Used by bench/compare-http.sh and bench/compare-ssh.sh; prints one JSON object on stdout.

  clone_driver.py --url URL --concurrency C --clones N --work DIR \
      --root PID [--root PID ...] [--long-lived PIDS] [--cgroup DIR] [--git-config k=v ...] \
      [--cgi-times-dir DIR] [--expected-refs FILE] [--fsck-samples 1] \
      [--clone-timeout 300] [--level-timeout 900]

Server CPU and peak RSS: servertree.Measurement (the server's cgroup counter when --cgroup is
given, else utime+stime+cutime+cstime of its /proc tree; summed VmRSS sampled every 50 ms).
Client side: wall time of the whole batch (first clone started to last clone finished,
removal of finished clones included) and the CPU of the client git processes (os.times()
children).
"""
import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servertree as st  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--clones", type=int, required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--root", type=int, action="append", required=True)
    ap.add_argument("--long-lived", action="append", default=[],
                    help="pids (comma-separated) of the server's long-lived processes")
    ap.add_argument("--cgroup", help="the cgroup directory the server runs in")
    ap.add_argument("--git-config", action="append", default=[])
    ap.add_argument("--cgi-times-dir",
                    help="directory where a CGI shim records the CPU of children "
                         "that the server does not wait for (fcgiwrap)")
    ap.add_argument("--expected-refs")
    ap.add_argument("--fsck-samples", type=int, default=1)
    ap.add_argument("--clone-timeout", type=float, default=300)
    ap.add_argument("--level-timeout", type=float, default=900)
    ap.add_argument("--settle-timeout", type=float, default=15)
    a = ap.parse_args()

    os.makedirs(a.work, exist_ok=True)
    git = ["git"]
    for kv in a.git_config:
        git += ["-c", kv]

    m = st.Measurement(a.root, st.parse_pids(a.long_lived), a.cgroup, a.cgi_times_dir,
                       a.settle_timeout)
    m.start()

    results = [None] * a.clones
    keep = set(range(min(a.fsck_samples, a.clones)))
    lock = threading.Lock()
    kept_ok = []
    deadline = time.monotonic() + a.level_timeout

    def one(i):
        dest = os.path.join(a.work, f"clone-{i:04d}.git")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return i, {"ok": False, "err": "level timeout: not started", "secs": 0.0}
        t = time.monotonic()
        try:
            p = subprocess.run(git + ["clone", "--bare", "-q", a.url, dest],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               timeout=min(a.clone_timeout, remaining))
            ok = p.returncode == 0
            err = "" if ok else f"exit {p.returncode}: {p.stderr.decode(errors='replace').strip()[-400:]}"
        except subprocess.TimeoutExpired:
            ok, err = False, "clone timeout"
        secs = time.monotonic() - t
        if ok and i in keep:
            with lock:
                kept_ok.append(dest)
        else:
            shutil.rmtree(dest, ignore_errors=True)
        return i, {"ok": ok, "err": err, "secs": secs}

    c0 = os.times()
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=a.concurrency) as ex:
        for i, r in ex.map(one, range(a.clones)):
            results[i] = r
    wall = time.monotonic() - t0
    c1 = os.times()

    server = m.stop()

    # Verification of the kept clones (outside the timed window).
    expected = None
    if a.expected_refs:
        with open(a.expected_refs) as f:
            expected = f.read()
    fsck = []
    for dest in kept_ok:
        f = subprocess.run(["git", "--git-dir", dest, "fsck", "--no-progress", "--no-dangling"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=600)
        ok = f.returncode == 0
        why = "" if ok else "fsck: " + f.stdout.decode(errors="replace").strip()[-400:]
        if ok and expected is not None:
            refs = subprocess.run(["git", "--git-dir", dest, "for-each-ref",
                                   "--format=%(objectname) %(refname)"],
                                  stdout=subprocess.PIPE, check=False).stdout.decode()
            if refs != expected:
                ok, why = False, "refs differ from the fixture"
        fsck.append({"clone": os.path.basename(dest), "ok": ok, "err": why})
        shutil.rmtree(dest, ignore_errors=True)

    ok_clones = sum(1 for r in results if r and r["ok"])
    fsck_failed = sum(1 for f in fsck if not f["ok"])
    errors = (a.clones - ok_clones) + fsck_failed
    good = max(ok_clones - fsck_failed, 0)
    client_cpu = st.children_cpu_s(c0, c1)
    out = {
        "url": a.url,
        "git_config": a.git_config,
        "concurrency": a.concurrency,
        "clones": a.clones,
        "ok_clones": ok_clones,
        "errors": errors,
        "fsck_checked": len(fsck),
        "fsck_failed": fsck_failed,
        "wall_s": round(wall, 3),
        "clones_per_s": round(good / wall, 4) if wall > 0 and good else 0.0,
        "server_cpu_s_per_clone": round(server["server_cpu_s"] / ok_clones, 4) if ok_clones else None,
        **server,
        "client_cpu_s_per_clone": round(client_cpu / ok_clones, 4) if ok_clones else None,
        "clone_secs_max": round(max((r["secs"] for r in results if r), default=0), 3),
        "error_samples": [r["err"] for r in results if r and not r["ok"]][:3]
                         + [f["err"] for f in fsck if not f["ok"]][:2],
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
