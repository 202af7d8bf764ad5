"""What the Python benches share: starting and stopping target/release/gitplane on loopback,
running its admin commands, a generated history or the bench fixture to push, reading /metrics
and RSS, percentiles.

Used by the Python scripts in bench/ (each does `sys.path.insert(0, "bench/lib")`)."""
import os
import re
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# GITPLANE_BIN: another build to measure (an A/B of two commits), else the release build.
BIN = os.environ.get("GITPLANE_BIN") or os.path.join(ROOT, "target", "release", "gitplane")


def run(args, cwd=None, stdin=None):
    """Runs a command, failing on a non-zero exit; its stdout."""
    return subprocess.run(args, cwd=cwd, input=stdin, check=True, capture_output=True, text=True).stdout


def require_binary():
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")


def start_server(data, shards=2, config=None, extra=()):
    """`gitplane serve` on free loopback ports with data dir `data`. Returns the process and
    {service: (host, port)} once it is ready; its stdout is drained from then on (upgraded
    generations print to the same pipe)."""
    args = [BIN, "--data-dir", data, "serve", "--http-listen", "127.0.0.1:0", "--ssh-listen",
            "127.0.0.1:0", "--rpc-listen", "127.0.0.1:0", "--shards", str(shards), *extra]
    if config:
        args += ["--config", config]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "RUST_LOG": "warn"})
    addrs = {}
    for line in proc.stdout:
        line = line.strip()
        m = re.match(r"gitplane: (\w+) listening on (.+):(\d+)$", line)
        if m:
            addrs[m.group(1)] = (m.group(2), int(m.group(3)))
        if line == "gitplane: ready":
            break
    if "http" not in addrs:
        proc.kill()
        sys.exit("server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, addrs


def stop(proc, timeout=30):
    """Stops a server (SIGTERM, then SIGKILL if it has not exited within `timeout` s)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# git with no system or user config, as the benches run it.
GIT_ENV = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
FIXTURE = os.path.join(ROOT, "bench", "fixture", "cache", "fixture.git")


def fixture():
    """The bench fixture (bench/fixture/make_repo.sh: 52 MB, 302 commits), built if missing."""
    if not os.path.isdir(FIXTURE):
        subprocess.run([os.path.join(ROOT, "bench", "fixture", "make_repo.sh"),
                        os.path.dirname(FIXTURE)], check=True)
    return FIXTURE


def admin(data, *args, stdin=None):
    return run([BIN, "--data-dir", data, *args], stdin=stdin)


def make_history(path, commits):
    """A repository at `path` with `commits` commits touching 50 files; its head commit."""
    os.makedirs(path)
    run(["git", "init", "-q", "-b", "main"], cwd=path)
    for i in range(commits):
        with open(os.path.join(path, f"f{i % 50}.txt"), "a") as f:
            f.write(f"line {i}\n" * 200)
        run(["git", "add", "."], cwd=path)
        run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", f"c{i}"], cwd=path)
    return run(["git", "rev-parse", "HEAD"], cwd=path).strip()


def metrics(addr):
    """The /metrics page of the HTTP listener at addr (host, port), as text."""
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def metric(text, series):
    """One integer series of a /metrics text (0 when absent)."""
    m = re.search("^" + re.escape(series) + r" (\d+)$", text, re.M)
    return int(m.group(1)) if m else 0


def tree_cpu_seconds(pid):
    """User+system seconds of `pid` and of its children it has reaped (git, relays)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid):
    """User+system seconds of `pid`'s threads by name, the threads that already ended under
    "(ended threads)" (the process total minus its live threads), its reaped children under
    "(children)"."""
    tck = os.sysconf("SC_CLK_TCK")
    by_name, live = {}, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
        except FileNotFoundError:
            continue
        name = head.split("(", 1)[1].rstrip("0123456789-")
        ticks = sum(int(x) for x in rest.split()[11:13])
        by_name[name] = by_name.get(name, 0) + ticks / tck
        live += ticks
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own, children = (sum(int(x) for x in fields[i:i + 2]) for i in (11, 13))
    by_name["(ended threads)"] = (own - live) / tck
    by_name["(children)"] = children / tck
    return by_name


def rss_kb(pid):
    """VmRSS of one process, in kB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def rss_mb(pid):
    return rss_kb(pid) / 1024


def pct(xs, p):
    """The p-th percentile of xs (nearest rank); NaN for no samples."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def timed_runs(op, n, seconds=0):
    """Runs `op()` at least n times, and until `seconds` have passed; each run's wall time."""
    times = []
    started = time.monotonic()
    while len(times) < n or time.monotonic() - started < seconds:
        t = time.monotonic()
        op()
        times.append(time.monotonic() - t)
    return times
