#!/usr/bin/env python3
"""gRPC call latency while idle HTTP/2 connections are held against the server (issue #17).

Starts target/release/gitplane on loopback (the reported attack's cap, `[rpc]
max_connections_per_shard = 64`, everything else at its default; pass --config to change it),
pushes the gRPC test fixture (tests/rpc/make_fixture.sh) and runs target/release/gitplane-load's
`grpc` scenario (ListBranches, --concurrency clients, one HTTP/2 connection each, with the token)
three times in one run:
  1. without an attack;
  2. while --idle connections from one address (127.0.0.2) hold the listener: each sends the
     HTTP/2 client preface and an empty SETTINGS frame, then nothing, and reconnects 200 ms after
     the server closes it (so the attack lasts the whole phase);
  3. the same number of idle connections spread over 16 addresses (127.0.0.2-17).
The load starts 2 s after the attack, so the attackers are in place first. For each phase:
call p50/p99/max, calls/s, failed calls, the server's RSS (mean and max, sampled every 0.5 s),
how many idle connections the server was holding (sampled), the RSS 3 s after the attack
stopped, and the cuts the server counted.

    python3 bench/rpc-idle-attack.py [--idle 128] [--seconds 20] [--concurrency 4] [--shards 2]

Bounded: every socket has a timeout, the attack stops with its phase, the server is killed at
the end.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import BIN, metrics, rss_mb, start_server  # noqa: E402

LOAD = os.path.join(ROOT, "target", "release", "gitplane-load")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0"
REASONS = ["rpc_no_request", "rpc_idle", "rpc_per_address", "rpc_keepalive"]


def cuts(addr):
    text = metrics(addr)
    out = {}
    for r in REASONS:
        m = re.search(r'^gitplane_stalled_cuts_total\{reason="%s"\} (\d+)$' % r, text, re.M)
        out[r] = int(m.group(1)) if m else 0
    m = re.search(r"^gitplane_http_connections_rejected_total (\d+)$", text, re.M)
    out["over_shard_cap"] = int(m.group(1)) if m else 0
    return out


def idle_peer(source, target, stop, state, i):
    """One idle connection, reopened 200 ms after each close until `stop`."""
    while not stop.is_set():
        try:
            with socket.socket() as s:
                s.settimeout(5)
                s.bind((source, 0))
                s.connect(target)
                s.sendall(PREFACE)
                s.settimeout(1)
                got = False
                while not stop.is_set():
                    try:
                        data = s.recv(4096)
                    except socket.timeout:
                        continue
                    if not data:
                        break
                    if not got:
                        got = True
                        state["held"][i] = True
                state["held"][i] = False
                state["cut" if got else "refused"] += 1
        except OSError:
            state["held"][i] = False
            state["refused"] += 1
        stop.wait(0.2)


def phase(name, sources, args, server, http, rpc, token_file, tmp):
    stop = threading.Event()
    state = {"held": [False] * args.idle, "cut": 0, "refused": 0}
    threads = []
    for i in range(args.idle if sources else 0):
        t = threading.Thread(target=idle_peer, args=(sources[i % len(sources)], rpc, stop, state, i),
                             daemon=True)
        t.start()
        threads.append(t)
    before = cuts(http)
    if sources:
        time.sleep(2)
    samples, held = [], []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append(rss_mb(server.pid))
            held.append(sum(state["held"]))
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = os.path.join(tmp, f"{name}.json")
    load = subprocess.run(
        [LOAD, "grpc", "--url", f"http://{rpc[0]}:{rpc[1]}/admin/fixture", "--rpc", "list-branches",
         "--token-file", token_file, "-c", str(args.concurrency), "-d", f"{args.seconds}s",
         "--json", out, "--quiet", "--allow-errors"],
        capture_output=True, text=True)
    done.set()
    sampler.join()
    stop.set()
    for t in threads:
        t.join(timeout=5)
    # Whether memory the attack took is given back: the server's RSS once it has closed all.
    time.sleep(3)
    rss_after = rss_mb(server.pid)
    if load.returncode != 0:
        sys.exit(f"gitplane-load failed:\n{load.stderr}")
    report = json.load(open(out))
    after = cuts(http)
    return {
        "name": name,
        "ok": report["ok"],
        "errors": report["errors_total"],
        "rps": report["throughput"],
        "p50": report["latency_ms"]["p50"],
        "p99": report["latency_ms"]["p99"],
        "max": report["latency_ms"]["max"],
        "rss_mean": sum(samples) / len(samples),
        "rss_max": max(samples),
        "rss_after": rss_after,
        "held_mean": sum(held) / len(held),
        "held_max": max(held),
        "attack_cut": state["cut"],
        "attack_refused": state["refused"],
        "cuts": {k: after[k] - before[k] for k in after},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idle", type=int, default=128)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--config", help="server TOML (default: [rpc] max_connections_per_shard = 64)")
    args = ap.parse_args()
    for path in (BIN, LOAD):
        if not os.path.exists(path):
            sys.exit(f"{path} missing: cargo build --release --bin gitplane && cargo build --release -p gitplane-load")
    with tempfile.TemporaryDirectory() as tmp:
        config = args.config
        if not config:
            config = os.path.join(tmp, "gitplane.toml")
            with open(config, "w") as f:
                f.write("[rpc]\nmax_connections_per_shard = 64\n")
        data = os.path.join(tmp, "data")
        server, addrs = start_server(data, args.shards, config)
        http, rpc = addrs["http"], addrs["rpc"]
        try:
            subprocess.run([BIN, "--data-dir", data, "repo", "create", "admin/fixture"], check=True,
                           capture_output=True)
            subprocess.run(["bash", os.path.join(ROOT, "tests/rpc/make_fixture.sh"),
                            os.path.join(data, "repos/admin/fixture.git"), os.path.join(tmp, "work"), "0"],
                           check=True, capture_output=True)
            token_file = os.path.join(data, "rpc-token")
            rows = [
                phase("no attack", [], args, server, http, rpc, token_file, tmp),
                phase(f"{args.idle} idle, 1 address", ["127.0.0.2"], args, server, http, rpc,
                      token_file, tmp),
                phase(f"{args.idle} idle, 16 addresses", [f"127.0.0.{i}" for i in range(2, 18)],
                      args, server, http, rpc, token_file, tmp),
            ]
        finally:
            server.kill()
            server.wait()
    base = rows[0]
    print("| phase | calls ok | failed | calls/s | p50 ms | p99 ms | max ms | p99 vs no attack "
          "| server RSS mean / max / 3 s after MB | idle conns held mean / max | attack conns cut / refused "
          "| server cuts (no_request, idle, per_address, keepalive, over shard cap) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["cuts"]
        print(f"| {r['name']} | {r['ok']} | {r['errors']} | {r['rps']:.0f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {r['max']:.2f} | {r['p99'] / base['p99']:.2f}x | "
              f"{r['rss_mean']:.1f} / {r['rss_max']:.1f} / {r['rss_after']:.1f} | {r['held_mean']:.1f} / {r['held_max']} | "
              f"{r['attack_cut']} / {r['attack_refused']} | {c['rpc_no_request']}, {c['rpc_idle']}, "
              f"{c['rpc_per_address']}, {c['rpc_keepalive']}, {c['over_shard_cap']} |")


if __name__ == "__main__":
    main()
