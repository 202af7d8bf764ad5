#!/usr/bin/env python3
"""What a server costs while a client drives it: CPU and peak RSS of its whole process tree.

Shared by clone_driver.py, ssh_driver.py and load_driver.py (bench/compare*.sh).

The "server tree" is every --root pid and all of its descendants, found by scanning
/proc/*/stat for parent pids, plus (when the server was started in one) every process of its
cgroup.  `Measurement` takes a reading before a batch and one after it and reports:

* CPU, up to two ways:
  - cgroup (when bench/lib/common.sh could start the server in a cgroup of its own): the
    cgroup's own counter, cgroup v2 `cpu.stat` usage_usec or v1 `cpuacct.usage` (ns).  The
    kernel adds every task's run time to it as it runs, so processes that were reaped by
    anyone (init, an auto-reaping parent such as fcgiwrap) or never reaped at all count too.
    This is the primary figure.
  - /proc tree: utime+stime+cutime+cstime summed over every live process of the tree, read
    once before the batch and once after it, when the tree has settled (no process other
    than the long-lived ones is left, zombies included: every per-request child has been
    waited for and its CPU has landed in its parent's cutime/cstime).  Live processes are
    summed, reaped ones count only through their parent's c*time, so nothing is counted
    twice.  CPU of a child that no process of the tree waits for is lost here; for fcgiwrap
    (which ignores SIGCHLD) a CGI shim can record it (--cgi-times-dir, see cgi_times_s).
    Ticks are 1/CLK_TCK s (10 ms).
  As a cross-check the sampler records the last own CPU (utime+stime) seen of every
  short-lived process of the tree: a lower bound of the children's CPU (the last <50 ms of
  each, and processes shorter than 50 ms, are missed); `cpu_check` flags a primary figure
  below 80% of it.
* Peak RSS: every 50 ms, the sum of VmRSS (statm resident * page size) over the tree; the
  largest sum.  Shared pages (nginx workers, forked children sharing text, the mmapped pack)
  count once per process, so this overstates real memory use, the same way for every server.

`servertree.py tree PID...` prints the pids of the tree under PID..., one a line.
"""
import os
import re
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


class Cgroup:
    """A cgroup directory (v2 with cpu.stat, or v1 cpuacct) that the server was started in."""

    def __init__(self, path):
        self.path = path
        self.v2 = os.path.exists(os.path.join(path, "cpu.stat"))
        if not self.v2 and not os.path.exists(os.path.join(path, "cpuacct.usage")):
            raise ValueError(f"{path}: neither cpu.stat (v2) nor cpuacct.usage (v1)")

    def usage_ns(self):
        if self.v2:
            with open(os.path.join(self.path, "cpu.stat")) as f:
                for line in f:
                    k, v = line.split()
                    if k == "usage_usec":
                        return int(v) * 1000
            raise ValueError(f"{self.path}/cpu.stat has no usage_usec")
        with open(os.path.join(self.path, "cpuacct.usage")) as f:
            return int(f.read())

    def pids(self):
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return {int(x) for x in f.read().split()}
        except OSError:
            return set()

    def kind(self):
        return "cgroup v2 cpu.stat usage_usec" if self.v2 else "cgroup v1 cpuacct.usage"


def snapshot(roots, cgroup=None):
    """Every process of the tree under roots (and of cgroup): {pid: stat tuple}."""
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
    if cgroup is not None:
        todo += [p for p in cgroup.pids() if p in stats]
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


def settle(roots, long_lived, timeout, cgroup=None):
    """Wait until the tree holds only long-lived processes (children reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        tree = snapshot(roots, cgroup)
        extra = [p for p in tree if p not in long_lived]
        if not extra:
            return tree, True
        if time.monotonic() > deadline:
            return tree, False
        time.sleep(0.05)


class Sampler(threading.Thread):
    def __init__(self, roots, long_lived, cgroup=None, interval=0.05):
        super().__init__(daemon=True)
        self.roots = roots
        self.long_lived = long_lived
        self.cgroup = cgroup
        self.interval = interval
        self.stop = threading.Event()
        self.peak_rss = 0
        self.peak_procs = 0
        self.samples = 0
        self.transient = {}  # (pid, starttime) -> last own (utime+stime) ticks seen

    def run(self):
        while not self.stop.is_set():
            t = time.monotonic()
            tree = snapshot(self.roots, self.cgroup)
            rss = 0
            for pid, st in tree.items():
                rss += read_rss(pid)
                if pid not in self.long_lived:
                    self.transient[(pid, st[2])] = st[3]
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(tree))
            self.samples += 1
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - t)))


def children_cpu_s(t0, t1):
    """User + system seconds of the children waited for between two os.times() readings."""
    return (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)


def parse_pids(values):
    """--long-lived values: comma-separated pids, possibly repeated."""
    return {int(x) for v in values for x in v.split(",") if x}


class Measurement:
    """Server CPU and peak RSS over one batch: start(), run the client, stop() -> dict."""

    def __init__(self, roots, long_lived=(), cgroup_path=None, cgi_times_dir=None,
                 settle_timeout=15.0):
        self.roots = list(roots)
        self.cgroup = Cgroup(cgroup_path) if cgroup_path else None
        self.cgi_times_dir = cgi_times_dir
        self.settle_timeout = settle_timeout
        # Long-lived processes: given by the caller (recorded right after the server
        # started, before any request), else the tree as it is now.
        self.long_lived = set(long_lived) or set(snapshot(self.roots, self.cgroup))

    def start(self):
        # Wait for leftovers of a previous batch (warm-up) to be reaped first.
        tree0, self.settled_before = settle(self.roots, self.long_lived, self.settle_timeout,
                                            self.cgroup)
        self.long_lived &= set(tree0)
        self.ticks0 = tree_cpu_ticks(tree0)
        self.cgi0 = cgi_times_s(self.cgi_times_dir)
        self.cg0 = self.cgroup.usage_ns() if self.cgroup else None
        self.sampler = Sampler(self.roots, self.long_lived, self.cgroup)
        self.sampler.start()

    def stop(self):
        self.sampler.stop.set()
        self.sampler.join()
        tree1, settled = settle(self.roots, self.long_lived, self.settle_timeout, self.cgroup)
        cg1 = self.cgroup.usage_ns() if self.cgroup else None
        ticks = tree_cpu_ticks(tree1) - self.ticks0
        cgi_ticks = round((cgi_times_s(self.cgi_times_dir) - self.cgi0) * CLK_TCK)
        ticks += cgi_ticks
        transient = sum(self.sampler.transient.values())
        missing = [r for r in self.roots if r not in tree1]
        tree_s = ticks / CLK_TCK
        cg_s = (cg1 - self.cg0) / 1e9 if self.cgroup else None
        primary_s = cg_s if cg_s is not None else tree_s
        check = "ok"
        if not settled:
            check = "tree did not settle (children still running)"
        elif missing:
            check = f"server process(es) gone: {missing}"
        elif transient > 0 and primary_s * CLK_TCK < 0.8 * transient:
            check = (f"children CPU not accounted: {primary_s:.2f} s < sampled child CPU "
                     f"{transient / CLK_TCK:.2f} s")
        return {
            "server_cpu_s": round(primary_s, 4),
            "cpu_method": self.cgroup.kind() if self.cgroup else "/proc tree c*time",
            "server_cpu_s_cgroup": None if cg_s is None else round(cg_s, 4),
            "server_cpu_s_proc_tree": round(tree_s, 4),
            "server_cpu_ticks": ticks,
            "cgi_shim_cpu_ticks": cgi_ticks,
            "sampled_child_cpu_ticks": transient,
            "cpu_check": check,
            "settled_before": self.settled_before,
            "peak_rss_bytes": self.sampler.peak_rss,
            "peak_processes": self.sampler.peak_procs,
            "rss_samples": self.sampler.samples,
            "long_lived_pids": sorted(self.long_lived),
        }


def print_tree(argv):
    for pid in sorted(snapshot([int(x) for x in argv])):
        print(pid)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "tree":
        print_tree(sys.argv[2:])
    else:
        sys.exit(__doc__)
