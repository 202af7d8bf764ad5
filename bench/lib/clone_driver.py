#!/usr/bin/env python3
"""Run a bounded batch of `git clone --bare -q` against one server and measure it.

Used by bench/compare-http.sh; prints one JSON object on stdout.

  clone_driver.py --url URL --concurrency C --clones N --work DIR \
      --root PID [--root PID ...] [--git-config k=v ...] \
      [--expected-refs FILE] [--fsck-samples 1] \
      [--clone-timeout 300] [--level-timeout 900]

Server-side measurements (the "server tree" = every --root and all of its
descendants, found by scanning /proc/*/stat for parent pids):

* CPU: sum of utime+stime+cutime+cstime over every live process of the tree,
  read once before the batch and once after it, when the tree has settled
  (no descendant other than the long-lived processes is left, zombies
  included, so every per-request child has been waited for and its CPU has
  landed in its parent's cutime/cstime).  Live processes are summed, reaped
  ones are only counted through their parent's c*time, so nothing is counted
  twice.  CPU of a child that is not waited for by a process of the tree
  (SIGCHLD ignored, reparented to init) is lost; as a cross-check the sampler
  records the last own CPU (utime+stime) seen of every short-lived process of
  the tree; their sum is a lower bound of the children's CPU (the last <50 ms
  of each and processes shorter than 50 ms are missed), and `cpu_check` flags
  a run whose before/after delta is below 80% of that lower bound.
  fcgiwrap ignores SIGCHLD, so the CPU of its CGI children never reaches its
  cutime: for nginx the CGI is started through a shim (compare-http.sh) that
  runs git-http-backend as its child, waits for it and appends bash's `times`
  to --cgi-times-dir; the children line is added to the /proc delta (the
  shim's own bash CPU is not counted).
* Peak RSS: every 50 ms, sum of VmRSS (statm resident * page size) over the
  tree; the maximum of that sum.  Shared pages (nginx workers, forked
  children sharing text) are counted once per process, so this overstates
  real memory use somewhat, the same way for every server.

Client-side: wall time of the whole batch (first clone started to last
clone finished, removal of finished clones included) and the CPU of the
client git processes (os.times() children).
"""
import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def read_stat(pid):
    """(ppid, state, starttime, own_ticks, children_ticks) or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    # comm may contain spaces/parens: split after the last ')'
    rest = s[s.rindex(b")") + 2:].split()
    # rest[0] = state (field 3), so field N is rest[N-3]
    state = rest[0].decode()
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    starttime = int(rest[19])
    return ppid, state, starttime, utime + stime, cutime + cstime


def read_rss(pid):
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def snapshot(roots):
    """All processes of the tree under roots: {pid: stat tuple}."""
    stats = {}
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        st = read_stat(pid)
        if st is None:
            continue
        stats[pid] = st
        children.setdefault(st[0], []).append(pid)
    tree = {}
    todo = [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree[pid] = stats[pid]
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_ticks(tree):
    return sum(st[3] + st[4] for st in tree.values())


TIMES_RE = re.compile(r"(\d+)m([\d.]+)s")


def cgi_times_s(d):
    """Children CPU seconds recorded by the CGI shim (`times` of bash, appended
    to DIR/<pid>: line pairs "self-user self-sys" / "children-user children-sys")."""
    if not d:
        return 0.0
    total = 0.0
    for name in os.listdir(d):
        try:
            with open(os.path.join(d, name)) as f:
                lines = [l for l in f.read().splitlines() if l.strip()]
        except OSError:
            continue
        for line in lines[1::2]:
            for m, sec in TIMES_RE.findall(line):
                total += int(m) * 60 + float(sec)
    return total


def settle(roots, long_lived, timeout):
    """Wait until the tree holds only long-lived processes (children reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        tree = snapshot(roots)
        extra = [p for p in tree if p not in long_lived]
        if not extra:
            return tree, True
        if time.monotonic() > deadline:
            return tree, False
        time.sleep(0.05)


class Sampler(threading.Thread):
    def __init__(self, roots, long_lived, interval=0.05):
        super().__init__(daemon=True)
        self.roots = roots
        self.long_lived = long_lived
        self.interval = interval
        self.stop = threading.Event()
        self.peak_rss = 0
        self.samples = 0
        self.transient = {}  # (pid, starttime) -> last own (utime+stime) ticks seen

    def run(self):
        while not self.stop.is_set():
            t = time.monotonic()
            tree = snapshot(self.roots)
            rss = 0
            for pid, st in tree.items():
                rss += read_rss(pid)
                if pid not in self.long_lived:
                    self.transient[(pid, st[2])] = st[3]
            self.peak_rss = max(self.peak_rss, rss)
            self.samples += 1
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - t)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--clones", type=int, required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--root", type=int, action="append", required=True)
    ap.add_argument("--long-lived", action="append", default=[],
                    help="pids (comma-separated) of the server's long-lived processes")
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

    # Long-lived processes: given by the caller (recorded right after the
    # server started, before any request), else the tree as it is now.
    if a.long_lived:
        long_lived = {int(x) for v in a.long_lived for x in v.split(",") if x}
    else:
        long_lived = set(snapshot(a.root))
    # Wait for leftovers of a previous batch (warm-up) to be reaped first.
    tree0, settled0 = settle(a.root, long_lived, a.settle_timeout)
    long_lived &= set(tree0)
    cpu_before = tree_cpu_ticks(tree0)
    cgi_before = cgi_times_s(a.cgi_times_dir)

    sampler = Sampler(a.root, long_lived)
    sampler.start()

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

    sampler.stop.set()
    sampler.join()
    tree1, settled1 = settle(a.root, long_lived, a.settle_timeout)
    cpu_after = tree_cpu_ticks(tree1)
    cgi_after = cgi_times_s(a.cgi_times_dir)
    missing_roots = [r for r in a.root if r not in tree1]

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
    cpu_ticks = cpu_after - cpu_before
    cgi_ticks = round((cgi_after - cgi_before) * CLK_TCK)
    cpu_ticks += cgi_ticks
    transient_ticks = sum(sampler.transient.values())
    cpu_check = "ok"
    if not settled1:
        cpu_check = "tree did not settle (children still running)"
    elif missing_roots:
        cpu_check = f"server process(es) gone: {missing_roots}"
    elif transient_ticks > 0 and cpu_ticks < 0.8 * transient_ticks:
        cpu_check = (f"children CPU not accounted: delta {cpu_ticks} ticks < "
                     f"sampled child CPU {transient_ticks} ticks")
    good = max(ok_clones - fsck_failed, 0)
    client_cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
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
        "server_cpu_ticks": cpu_ticks,
        "cgi_shim_cpu_ticks": cgi_ticks,
        "server_cpu_s_per_clone": round(cpu_ticks / CLK_TCK / ok_clones, 4) if ok_clones else None,
        "sampled_child_cpu_ticks": transient_ticks,
        "cpu_check": cpu_check,
        "settled_before": settled0,
        "peak_rss_bytes": sampler.peak_rss,
        "rss_samples": sampler.samples,
        "long_lived_pids": sorted(long_lived),
        "client_cpu_s_per_clone": round(client_cpu / ok_clones, 4) if ok_clones else None,
        "clone_secs_max": round(max((r["secs"] for r in results if r), default=0), 3),
        "error_samples": [r["err"] for r in results if r and not r["ok"]][:3]
                         + [f["err"] for f in fsck if not f["ok"]][:2],
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


def print_tree(argv):
    """`clone_driver.py tree PID...`: print the pids of the tree, one a line."""
    for pid in sorted(snapshot([int(x) for x in argv])):
        print(pid)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "tree":
        print_tree(sys.argv[2:])
    else:
        main()
