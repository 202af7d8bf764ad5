#!/usr/bin/env python3
"""Run one gitplane-load batch against a server and measure the server meanwhile.

Used by bench/compare.sh; prints one JSON object on stdout.

  load_driver.py --root PID [--root PID ...] [--long-lived PIDS] [--cgroup DIR] \\
      [--cgi-times-dir DIR] --report FILE [--timeout SECONDS] -- gitplane-load ... --json FILE

The command must write its report to --report (gitplane-load's `--json FILE`).  The output is
that report's summary (ok, errors by kind, clones/s = gitplane-load's `throughput`, latency
percentiles, protocol versions) merged with the server's CPU and peak RSS over the batch
(servertree.Measurement), the client's CPU (user + system of gitplane-load, from os.times()
children: the command is the only child waited for in the window), and the machine-wide TcpExt
ListenOverflows / ListenDrops / SyncookiesSent deltas over the batch (a server whose accept
queue overflowed; anything else on the machine counts too).
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import servertree as st  # noqa: E402


TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent")


def tcp_counters():
    """Machine-wide TcpExt counters from /proc/net/netstat (a full accept queue shows here)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            kv = dict(zip(names.split()[1:], values.split()[1:]))
            return {k: int(kv[k]) for k in TCP_COUNTERS if k in kv}
    return {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=int, action="append", required=True)
    ap.add_argument("--long-lived", action="append", default=[])
    ap.add_argument("--cgroup")
    ap.add_argument("--cgi-times-dir")
    ap.add_argument("--report", required=True, help="the JSON file the command writes")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="kill the command after this long (its report is then missing)")
    ap.add_argument("--settle-timeout", type=float, default=30)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command after --")
    if os.path.exists(a.report):
        os.unlink(a.report)

    m = st.Measurement(a.root, st.parse_pids(a.long_lived), a.cgroup, a.cgi_times_dir,
                       a.settle_timeout)
    m.start()
    tcp0 = tcp_counters()
    c0 = os.times()
    t0 = time.monotonic()
    status = "ok"
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=a.timeout)
        rc, stderr = p.returncode, p.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        rc, stderr = None, (e.stderr or b"").decode(errors="replace")
        status = f"killed after the {a.timeout:.0f} s timeout"
    wall = time.monotonic() - t0
    c1 = os.times()
    tcp1 = tcp_counters()
    server = m.stop()
    client_cpu = st.children_cpu_s(c0, c1)

    out = {"exit_code": rc, "status": status, "wall_s": round(wall, 3),
           "client_cpu_s": round(client_cpu, 3),
           "tcp_machine_wide": {k: tcp1[k] - tcp0[k] for k in tcp1 if k in tcp0}}
    try:
        with open(a.report) as f:
            r = json.load(f)
    except (OSError, ValueError) as e:
        out.update({"driver_failed": True,
                    "why": f"no report ({e}); stderr: {stderr.strip()[-400:]}"})
        out.update(server)
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return
    ok = r["ok"]
    lat = r.get("latency_ms", {})
    out.update({
        "scenario": r["scenario"],
        "concurrency": r.get("concurrency"),
        "threads": r.get("threads"),
        "requested": ok + r["errors_total"],
        "ok": ok,
        "errors_total": r["errors_total"],
        "errors": r.get("errors", {}),
        "error_samples": r.get("error_samples", [])[:3],
        "protocols": r.get("protocols", {}),
        "elapsed_s": r["elapsed_s"],
        "clones_per_s": r["throughput"],
        "bytes_per_clone": round(r["bytes"] / ok) if ok else None,
        "p50_ms": lat.get("p50"),
        "p90_ms": lat.get("p90"),
        "p99_ms": lat.get("p99"),
        "max_ms": lat.get("max"),
        "server_cpu_s_per_clone": round(server["server_cpu_s"] / ok, 4) if ok else None,
        "client_cpu_s_per_clone": round(client_cpu / ok, 4) if ok else None,
        **server,
    })
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
