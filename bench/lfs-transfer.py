#!/usr/bin/env python3
"""Git LFS transfer throughput and server memory: gitplane vs rudolfs, side by side.

    python3 bench/lfs-transfer.py [--servers gitplane,rudolfs] [--big-mib 1024]
                                  [--clients 8] [--client-mib 500]

For each server (both on 127.0.0.1, local-disk storage, each in its own temp dir):
  1. one client uploads a --big-mib object, then downloads it: MB/s each way;
  2. --clients clients upload --client-mib objects at once while the server's VmRSS is sampled
     every 20 ms: peak RSS.
Both servers are driven the same way: a Batch API request for the hrefs, then PUT/GET on the
href with Content-Length, streamed from a repeated random block (no big buffers in the client).
gitplane is $GITPLANE_BIN or target/release/gitplane; rudolfs is found on PATH, in /tmp/rudolfs/bin, or installed
with `cargo install rudolfs --root /tmp/rudolfs`. Every transfer is bounded by a timeout.
"""
import argparse
import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import rss_kb  # noqa: E402
BLOCK = 1 << 20
TIMEOUT = 600


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Payload:
    """size bytes made of a repeated seeded 1 MiB block; its SHA-256 computed up front."""

    def __init__(self, size, seed):
        self.size = size
        self.block = hashlib.shake_256(f"gitplane-lfs-{seed}".encode()).digest(BLOCK)
        h = hashlib.sha256()
        for _ in range(size // BLOCK):
            h.update(self.block)
        h.update(self.block[: size % BLOCK])
        self.oid = h.hexdigest()

    def chunks(self):
        left = self.size
        while left > 0:
            n = min(left, BLOCK)
            yield self.block[:n]
            left -= n


class Gitplane:
    name = "gitplane"

    def __init__(self, tmp):
        self.bin = os.environ.get("GITPLANE_BIN") or os.path.join(ROOT, "target", "release", "gitplane")
        if not os.path.exists(self.bin):
            subprocess.run(["cargo", "build", "--release", "--bin", "gitplane"], cwd=ROOT, check=True)
        data = os.path.join(tmp, "gitplane")
        self.proc = subprocess.Popen(
            [self.bin, "--data-dir", data, "serve", "--http-listen", "127.0.0.1:0", "--shards", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "RUST_LOG": "warn"})
        for line in self.proc.stdout:
            if line.startswith("gitplane: http listening on "):
                host, port = line.strip().rsplit(" ", 1)[1].rsplit(":", 1)
                self.addr = (host, int(port))
            if line.strip() == "gitplane: ready":
                break
        subprocess.run([self.bin, "--data-dir", data, "repo", "create", "admin/bench"], check=True,
                       stdout=subprocess.DEVNULL)
        pw = open(os.path.join(data, "initial-admin-password")).read().strip()
        self.auth = "Basic " + base64.b64encode(f"admin:{pw}".encode()).decode()
        self.batch_path = "/admin/bench.git/info/lfs/objects/batch"

    def headers(self):
        return {"Authorization": self.auth}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Rudolfs:
    name = "rudolfs"

    def __init__(self, tmp):
        exe = shutil.which("rudolfs") or "/tmp/rudolfs/bin/rudolfs"
        if not os.path.exists(exe):
            subprocess.run(["cargo", "install", "rudolfs", "--root", "/tmp/rudolfs"], check=True)
        port = free_port()
        key = os.urandom(32).hex()
        self.proc = subprocess.Popen(
            [exe, "--host", f"127.0.0.1:{port}", "--key", key, "local", "--path", os.path.join(tmp, "rudolfs")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addr = ("127.0.0.1", port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(self.addr, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        self.batch_path = "/api/bench/bench/objects/batch"

    def headers(self):
        return {}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def batch(server, op, payload):
    conn = http.client.HTTPConnection(*server.addr, timeout=TIMEOUT)
    body = json.dumps({"operation": op, "transfers": ["basic"],
                       "objects": [{"oid": payload.oid, "size": payload.size}]})
    conn.request("POST", server.batch_path, body=body, headers={
        **server.headers(), "Accept": "application/vnd.git-lfs+json",
        "Content-Type": "application/vnd.git-lfs+json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    obj = answer["objects"][0]
    if "error" in obj:
        raise RuntimeError(f"{server.name} batch {op}: {obj['error']}")
    return obj.get("actions", {}).get(op)


def transfer(server, op, payload):
    action = batch(server, op, payload)
    if action is None:
        return 0  # already stored
    href = action["href"].split("://", 1)[1]
    path = "/" + href.split("/", 1)[1]
    headers = {**server.headers(), **(action.get("header") or {})}
    conn = http.client.HTTPConnection(*server.addr, timeout=TIMEOUT)
    if op == "upload":
        headers["Content-Length"] = str(payload.size)
        headers["Content-Type"] = "application/octet-stream"
        conn.putrequest("PUT", path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        for c in payload.chunks():
            conn.send(c)
        resp = conn.getresponse()
        resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{server.name} upload: HTTP {resp.status}")
        return payload.size
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    h = hashlib.sha256()
    got = 0
    while True:
        c = resp.read(BLOCK)
        if not c:
            break
        h.update(c)
        got += len(c)
    if resp.status != 200 or h.hexdigest() != payload.oid:
        raise RuntimeError(f"{server.name} download: HTTP {resp.status}, {got} bytes, hash mismatch={h.hexdigest() != payload.oid}")
    return got


def measure(server_cls, args):
    tmp = tempfile.mkdtemp(prefix=f"lfs-bench-{server_cls.name}-")
    server = server_cls(tmp)
    try:
        big = Payload(args.big_mib << 20, f"{server.name}-big")
        t = time.monotonic()
        transfer(server, "upload", big)
        up = big.size / (time.monotonic() - t) / 1e6
        t = time.monotonic()
        transfer(server, "download", big)
        down = big.size / (time.monotonic() - t) / 1e6
        payloads = [Payload(args.client_mib << 20, f"{server.name}-{i}") for i in range(args.clients)]
        base = rss_kb(server.proc.pid)
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_kb(server.proc.pid))
                time.sleep(0.02)

        errors = []

        def client(p):
            try:
                transfer(server, "upload", p)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(str(e))

        sampler = threading.Thread(target=sample)
        sampler.start()
        t = time.monotonic()
        threads = [threading.Thread(target=client, args=(p,)) for p in payloads]
        for th in threads:
            th.start()
        for th in threads:
            th.join(TIMEOUT)
        wall = time.monotonic() - t
        done.set()
        sampler.join()
        agg = sum(p.size for p in payloads) / wall / 1e6
        return {"server": server.name, "upload_MBps": up, "download_MBps": down,
                "concurrent_upload_MBps": agg, "rss_before_MB": base / 1024,
                "peak_rss_MB": peak[0] / 1024, "errors": errors}
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", default="gitplane,rudolfs")
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--client-mib", type=int, default=500)
    args = ap.parse_args()
    classes = {"gitplane": Gitplane, "rudolfs": Rudolfs}
    rows = [measure(classes[name], args) for name in args.servers.split(",")]
    print(f"| server | upload {args.big_mib} MiB MB/s | download MB/s | {args.clients}×{args.client_mib} MiB "
          f"concurrent upload MB/s | RSS before MB | peak RSS MB | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['upload_MBps']:.0f} | {r['download_MBps']:.0f} | "
              f"{r['concurrent_upload_MBps']:.0f} | {r['rss_before_MB']:.1f} | {r['peak_rss_MB']:.1f} | "
              f"{len(r['errors'])} |")
    for r in rows:
        for e in r["errors"]:
            print(f"{r['server']} error: {e}", file=sys.stderr)
    if len(rows) == 2 and rows[1]["upload_MBps"] > 0:
        a, b = rows
        print(f"\nratios {a['server']}/{b['server']}: upload {a['upload_MBps'] / b['upload_MBps']:.2f}, "
              f"download {a['download_MBps'] / b['download_MBps']:.2f}, concurrent upload "
              f"{a['concurrent_upload_MBps'] / b['concurrent_upload_MBps']:.2f}")


if __name__ == "__main__":
    main()
