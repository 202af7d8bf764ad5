#!/usr/bin/env python3
"""SSH-specific measurements for bench/compare-ssh.sh; each prints one JSON object.

  ssh_driver.py sessions --ssh "ssh -F /dev/null ..." --port P --dest USER@127.0.0.1 \
      --remote-command "git-upload-pack '/path.git'" --expect refs/heads/main \
      --count N --concurrency C --root PID [--long-lived PIDS] [--cgroup DIR] \
      [--session-timeout 30] [--level-timeout 300]

      N bounded `ssh ... DEST REMOTE_COMMAND` sessions, C at a time: TCP connect, key
      exchange, public-key auth, exec of git-upload-pack, the (v0) ref advertisement read to
      the end, then a flush packet "0000" on stdin ("want nothing": upload-pack exits 0),
      channel close.
      A session is good when ssh exits 0 and its stdout contains --expect.  Server CPU and
      peak RSS: servertree.Measurement, as for clones.

  ssh_driver.py idle --port P --root PID [--long-lived PIDS] --connections 500 \
      [--per-source 30] [--mode version|silent] [--wait 3]

      RSS per idle pre-auth connection: the server tree's summed VmRSS (and PSS, from
      /proc/PID/smaps_rollup) before, then N TCP connections are opened to 127.0.0.1:P and
      either send only the SSH version line ("version") or nothing ("silent"); whatever the
      server sends (its version line, KEXINIT) is read and dropped, nothing else is ever
      sent.  After --wait seconds the connections still open are counted (a connection the
      server closed - sshd past MaxStartups, a cap - reads EOF) and the tree is sampled
      again.  Per connection = (after - before) / connections still open.  Sources are
      spread over 127.0.0.2, 127.0.0.3, ... (--per-source per address, still loopback) so a
      per-source cap on unauthenticated connections is not what is measured.  Everything
      is closed before exit.
"""
import argparse
import json
import os
import selectors
import shlex
import socket
import statistics
import subprocess
import sys
import time
import concurrent.futures as cf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servertree as st  # noqa: E402


def read_pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def long_lived_of(a):
    return st.parse_pids(a.long_lived) or set(st.snapshot(a.root))


def tree_memory(roots, samples=5, interval=0.2):
    """Median over a few samples of (sum VmRSS, sum PSS, process count) of the tree."""
    rss, pss, n = [], [], []
    for i in range(samples):
        tree = st.snapshot(roots)
        rss.append(sum(st.read_rss(p) for p in tree))
        pss.append(sum(read_pss(p) for p in tree))
        n.append(len(tree))
        if i + 1 < samples:
            time.sleep(interval)
    return int(statistics.median(rss)), int(statistics.median(pss)), int(statistics.median(n))


# ------------------------------------------------------------------ sessions
def sessions(a):
    m = st.Measurement(a.root, st.parse_pids(a.long_lived), a.cgroup)
    m.start()
    base = shlex.split(a.ssh) + ["-p", str(a.port), a.dest, a.remote_command]
    deadline = time.monotonic() + a.level_timeout
    expect = a.expect.encode()

    def one(i):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return {"ok": False, "err": "level timeout: not started", "secs": 0.0}
        t = time.monotonic()
        try:
            p = subprocess.run(base, input=b"0000", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=min(a.session_timeout, remaining))
            ok = p.returncode == 0 and expect in p.stdout
            err = "" if ok else (f"exit {p.returncode}: "
                                 + p.stderr.decode(errors="replace").strip()[-300:])
        except subprocess.TimeoutExpired:
            ok, err = False, "session timeout"
        return {"ok": ok, "err": err, "secs": time.monotonic() - t}

    c0 = os.times()
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=a.concurrency) as ex:
        results = list(ex.map(one, range(a.count)))
    wall = time.monotonic() - t0
    c1 = os.times()
    server = m.stop()
    ok = sum(1 for r in results if r["ok"])
    client_cpu = st.children_cpu_s(c0, c1)
    secs = sorted(r["secs"] for r in results if r["ok"])
    out = {
        "concurrency": a.concurrency,
        "sessions": a.count,
        "ok": ok,
        "failures": a.count - ok,
        "wall_s": round(wall, 3),
        "sessions_per_s": round(ok / wall, 2) if wall > 0 else 0.0,
        "server_cpu_ms_per_session": round(server["server_cpu_s"] * 1000 / ok, 2) if ok else None,
        "client_cpu_ms_per_session": round(client_cpu * 1000 / ok, 2) if ok else None,
        "median_session_s": round(secs[len(secs) // 2], 3) if secs else None,
        "max_session_s": round(secs[-1], 3) if secs else None,
        **server,
        "error_samples": [r["err"] for r in results if not r["ok"]][:3],
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


# ------------------------------------------------------------------ idle
def idle(a):
    long_lived = long_lived_of(a)
    tree0, settled0 = st.settle(a.root, long_lived, 15)
    rss0, pss0, n0 = tree_memory(a.root)
    sel = selectors.DefaultSelector()
    socks = []
    closed = set()
    connect_failed = []
    hello = b"SSH-2.0-OpenSSH_9.2p1 gitplane-idle-bench\r\n"
    t0 = time.monotonic()
    deadline = t0 + a.open_timeout

    def drain(timeout):
        for key, _ in sel.select(timeout):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                closed.add(s.fileno())
                sel.unregister(s)

    try:
        for i in range(a.connections):
            if time.monotonic() > deadline:
                connect_failed.append("open timeout: not attempted")
                continue
            src = f"127.0.0.{2 + i // a.per_source}"
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((src, 0))
                s.settimeout(5)
                s.connect(("127.0.0.1", a.port))
                if a.mode == "version":
                    s.sendall(hello)
                s.setblocking(False)
            except OSError as e:
                connect_failed.append(f"{src}: {e}")
                s.close()
                continue
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
            if i % 50 == 49:
                drain(0)
        open_s = time.monotonic() - t0
        end = time.monotonic() + a.wait
        while time.monotonic() < end:
            drain(0.1)
        held_before_sample = len(socks) - len(closed)
        rss1, pss1, n1 = tree_memory(a.root)
        drain(0)
        held = len(socks) - len(closed)
        sample_s = time.monotonic() - t0
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        sel.close()
    # Let the server notice the closes (not measured; keeps the next step clean).
    st.settle(a.root, long_lived, 15)
    held_min = min(held, held_before_sample)
    out = {
        "mode": a.mode,
        "connections": a.connections,
        "per_source": a.per_source,
        "connected": len(socks),
        "connect_failed": len(connect_failed),
        "closed_by_server": len(closed),
        "held": held_min,
        "open_s": round(open_s, 3),
        "sampled_at_s": round(sample_s, 3),
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "pss_before_bytes": pss0,
        "pss_after_bytes": pss1,
        "processes_before": n0,
        "processes_after": n1,
        "rss_per_conn_bytes": round((rss1 - rss0) / held_min) if held_min else None,
        "pss_per_conn_bytes": round((pss1 - pss0) / held_min) if held_min else None,
        "settled_before": settled0,
        "error_samples": connect_failed[:3],
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sessions")
    s.add_argument("--ssh", required=True, help="ssh command line (split with shlex)")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--dest", required=True)
    s.add_argument("--remote-command", required=True)
    s.add_argument("--expect", default="refs/heads/")
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--concurrency", type=int, required=True)
    s.add_argument("--root", type=int, action="append", required=True)
    s.add_argument("--long-lived", action="append", default=[])
    s.add_argument("--cgroup", help="the cgroup directory the server runs in")
    s.add_argument("--session-timeout", type=float, default=30)
    s.add_argument("--level-timeout", type=float, default=300)
    i = sub.add_parser("idle")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--root", type=int, action="append", required=True)
    i.add_argument("--long-lived", action="append", default=[])
    i.add_argument("--connections", type=int, default=500)
    i.add_argument("--per-source", type=int, default=30)
    i.add_argument("--mode", choices=["version", "silent"], default="version")
    i.add_argument("--wait", type=float, default=3.0)
    i.add_argument("--open-timeout", type=float, default=10.0)
    a = ap.parse_args()
    if a.cmd == "idle":
        if not 1 <= a.per_source <= 250 or a.connections > a.per_source * 250:
            ap.error("--connections must fit in 127.0.0.2..127.0.0.251 at --per-source each")
        idle(a)
    else:
        sessions(a)


if __name__ == "__main__":
    main()
