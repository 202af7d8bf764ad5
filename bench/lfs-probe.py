#!/usr/bin/env python3
"""Single LFS uploads against gitplane alone, for looking into one number at a time.

    python3 bench/lfs-probe.py disk [--mib 1024] [--perf FILE]   # one upload to local disk
    python3 bench/lfs-probe.py s3 [--mib 256] [--rounds 2]       # uploads to a moto S3 server

`disk` prints the upload rate with the server's and the client's user/system CPU for it;
`--perf FILE` records `perf record -g` of the server during the upload. `s3` starts moto's
server (python3 -m pip install 'moto[server]'), points gitplane's `[lfs.s3]` at it with 8 MiB
parts, and prints the rate of each upload. Both reuse bench/lfs-transfer.py's client and server
set-up; gitplane is $GITPLANE_BIN or target/release/gitplane.
"""
import argparse
import http.client
import importlib.util
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("lfs_transfer", os.path.join(HERE, "lfs-transfer.py"))
lt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lt)


def gitplane_with_config(tmp, config_text):
    """lfs-transfer.py's Gitplane server, started with `config_text` as its --config file."""
    if config_text is None:
        return lt.Gitplane(tmp)
    path = os.path.join(tmp, "probe.toml")
    with open(path, "w") as f:
        f.write(config_text)
    popen = lt.subprocess.Popen

    def with_config(args, **kw):
        if "serve" in args:
            at = args.index("serve") + 1
            args = args[:at] + ["--config", path] + args[at:]
        return popen(args, **kw)

    lt.subprocess.Popen = with_config
    try:
        return lt.Gitplane(tmp)
    finally:
        lt.subprocess.Popen = popen


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def disk(args):
    tmp = tempfile.mkdtemp(prefix="lfs-probe-")
    server = gitplane_with_config(tmp, None)
    try:
        payload = lt.Payload(args.mib << 20, "probe")
        perf = None
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-g", "-p", str(server.proc.pid), "-o", args.perf],
                                    stderr=subprocess.DEVNULL)
            time.sleep(1)
        s0, c0 = cpu_seconds(server.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
        t = time.monotonic()
        lt.transfer(server, "upload", payload)
        wall = time.monotonic() - t
        s1, c1 = cpu_seconds(server.proc.pid), resource.getrusage(resource.RUSAGE_SELF)
        if perf:
            perf.send_signal(2)
            perf.wait()
        print(f"upload {payload.size / wall / 1e6:.0f} MB/s in {wall:.2f} s; "
              f"server user {s1[0] - s0[0]:.2f} s sys {s1[1] - s0[1]:.2f} s; "
              f"client user {c1.ru_utime - c0.ru_utime:.2f} s sys {c1.ru_stime - c0.ru_stime:.2f} s")
    finally:
        server.stop()


def s3(args):
    port = lt.free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("PUT", "/probe")
        conn.getresponse().read()
        tmp = tempfile.mkdtemp(prefix="lfs-probe-s3-")
        server = gitplane_with_config(tmp, (
            f'[lfs.s3]\nendpoint = "127.0.0.1:{port}"\nbucket = "probe"\n'
            'access_key_id = "probe"\nsecret_access_key = "probe"\npart_size_mib = 8\n'))
        try:
            for i in range(args.rounds):
                payload = lt.Payload(args.mib << 20, f"probe-s3-{i}-{time.time()}")
                t = time.monotonic()
                lt.transfer(server, "upload", payload)
                print(f"upload {args.mib} MiB to S3: {payload.size / (time.monotonic() - t) / 1e6:.1f} MB/s")
        finally:
            server.stop()
    finally:
        moto.kill()
        moto.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("disk")
    d.add_argument("--mib", type=int, default=1024)
    d.add_argument("--perf", metavar="FILE")
    d.set_defaults(run=disk)
    s = sub.add_parser("s3")
    s.add_argument("--mib", type=int, default=256)
    s.add_argument("--rounds", type=int, default=2)
    s.set_defaults(run=s3)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
