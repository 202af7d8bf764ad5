#!/usr/bin/env python3
"""SSH over WebSocket against plain SSH (issue #16), same server, same repository, one run.

Starts the release gitplane, pushes a generated history with `git push --mirror` over SSH, then
runs real `git clone --bare` over OpenSSH, alternating two transports: the SSH port directly,
and `ProxyCommand=gitplane ssh-proxy ws://.../ssh` through the HTTP port. Reports clones/s at
--clients concurrent clones for --clones clones per transport and round, and the server's CPU
per clone (its process tree).

    python3 bench/ssh-ws.py [--commits 300] [--clients 8] [--clones 64] [--rounds 2]

Bounded: every clone has a timeout, the server is stopped and the temp dir removed.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench", "lib"))
from probe import BIN, admin, make_history, require_binary, run, start_server, stop, tree_cpu_seconds  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--clones", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    require_binary()
    work = tempfile.mkdtemp(prefix="gp-ssh-ws-")
    proc = None
    try:
        data = os.path.join(work, "data")
        proc, addrs = start_server(data)
        http, ssh = addrs["http"], addrs["ssh"]
        key = os.path.join(work, "key")
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
        admin(data, "key", "add", "admin", key + ".pub")
        admin(data, "repo", "create", "admin/bench")
        known = os.path.join(work, "known_hosts")
        scan = run(["ssh-keyscan", "-p", str(ssh[1]), "127.0.0.1"])
        with open(known, "w") as f:
            f.write(scan)
        base = (f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o IdentityAgent=none "
                f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes -o BatchMode=yes")
        transports = {
            "ssh": base,
            "ssh over ws": f"{base} -o ProxyCommand='{BIN} ssh-proxy ws://{http[0]}:{http[1]}/ssh'",
        }
        url = f"ssh://git@127.0.0.1:{ssh[1]}/admin/bench.git"
        history = os.path.join(work, "history")
        make_history(history, args.commits)
        subprocess.run(["git", "push", "-q", "--mirror", url], cwd=history, check=True,
                       env={**os.environ, "GIT_SSH_COMMAND": base})

        def clone(cmd, i):
            dest = os.path.join(work, f"c{i}")
            r = subprocess.run(["git", "clone", "-q", "--bare", url, dest], timeout=120,
                               capture_output=True, env={**os.environ, "GIT_SSH_COMMAND": cmd})
            shutil.rmtree(dest, ignore_errors=True)
            return r.returncode == 0

        totals = {name: [0, 0.0, 0.0, 0] for name in transports}
        n = 0
        for _ in range(args.rounds):
            for name, cmd in transports.items():
                cpu0, t0 = tree_cpu_seconds(proc.pid), time.monotonic()
                with ThreadPoolExecutor(args.clients) as pool:
                    ok = list(pool.map(lambda i: clone(cmd, i), range(n, n + args.clones)))
                n += args.clones
                t = totals[name]
                t[0] += sum(ok)
                t[1] += time.monotonic() - t0
                t[2] += tree_cpu_seconds(proc.pid) - cpu0
                t[3] += len(ok) - sum(ok)
        print(f"{args.clones} clones x {args.rounds} rounds at {args.clients} clients, "
              f"{args.commits}-commit repository pushed with --mirror:")
        for name, (ok, secs, cpu, failed) in totals.items():
            print(f"  {name:12} {ok / secs:6.1f} clones/s, server CPU {1000 * cpu / max(ok, 1):6.1f} "
                  f"ms/clone, {failed} failed")
        a, b = totals["ssh"], totals["ssh over ws"]
        print(f"  ws / plain: clones/s {(b[0] / b[1]) / (a[0] / a[1]):.2f}, "
              f"CPU per clone {(b[2] / max(b[0], 1)) / (a[2] / max(a[0], 1)):.2f}")
    finally:
        if proc:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
