#!/usr/bin/env python3
"""Render bench/compare-ssh.sh results as Markdown.

  ssh_report.py RESULTS.jsonl "8 32" "8 32" < notes.tsv

Arguments: the JSON lines, the clone concurrency levels, the session concurrency levels.
notes.tsv: "server<TAB>reason" for servers that could not be measured (or broke mid-run).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mdreport import clone_row, esc, fmt, read_jsonl, read_notes, result_notes  # noqa: E402

SERVERS = [("gitplane", "gitplane"), ("sshd", "OpenSSH sshd + git-shell")]
TARGET_CLONE_RATIO = 1.5
TARGET_IDLE_BYTES = 64 * 1024


def main():
    rows = read_jsonl(sys.argv[1])
    clone_levels = [int(c) for c in sys.argv[2].split()]
    session_levels = [int(c) for c in sys.argv[3].split()]
    notes = read_notes(sys.stdin)
    order = {k: i for i, (k, _) in enumerate(SERVERS)}
    rows.sort(key=lambda r: (order.get(r["server"], 99), r["kind"], r["result"].get("concurrency", 0)))
    by = {}
    seen = set()
    for r in rows:
        seen.add(r["server"])
        by[(r["server"], r["kind"], r["result"].get("concurrency"))] = r["result"]
    label = {r["server"]: r["label"] for r in rows}
    out = []

    # -- clones
    out.append("**Clones** (`git -c protocol.version=2 clone --bare` over ssh):")
    out.append("")
    out.append("| server | concurrency | clones | failures | clones/s | server CPU-s per clone "
               "| server peak RSS MB | client CPU-s per clone | notes |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["kind"] != "clones":
            continue
        out.append(clone_row(r["label"], r["result"]))
    for key, lab in SERVERS:
        if key not in seen:
            out.append(f"| {esc(lab)} | – | – | – | – | – | – | – | not measured: "
                       f"{esc(notes.get(key, 'not in SERVERS'))} |")

    # -- sessions
    out.append("")
    out.append("**Sessions** (`ssh … git-upload-pack 'REPO'` then a flush packet: TCP, key "
               "exchange, public-key auth, exec, v0 ref advertisement, exit 0, close):")
    out.append("")
    out.append("| server | concurrency | sessions | failures | sessions/s | server CPU ms per session "
               "| client CPU ms per session | median / max s | server peak RSS MB | notes |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["kind"] != "sessions":
            continue
        res = r["result"]
        if res.get("driver_failed"):
            out.append(f"| {esc(r['label'])} | {res['concurrency']} | {res['sessions']} | {res['sessions']} "
                       "| – | – | – | – | – | driver failed |")
            continue
        note = result_notes(res)
        out.append("| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |".format(
            esc(r["label"]), res["concurrency"], res["sessions"], res["failures"],
            fmt(res["sessions_per_s"], 1), fmt(res["server_cpu_ms_per_session"], 1),
            fmt(res["client_cpu_ms_per_session"], 1), fmt(res["median_session_s"]),
            fmt(res["max_session_s"]), fmt(res["peak_rss_bytes"] / 1e6, 1), esc("; ".join(note))))

    # -- idle
    out.append("")
    out.append("**Idle pre-auth connections** (server tree before → after, divided by the "
               "connections the server still held):")
    out.append("")
    out.append("| server | mode | opened | closed by server | held | RSS before → after MB "
               "| RSS per held conn KB | PSS per held conn KB | processes before → after | notes |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["kind"] != "idle":
            continue
        res = r["result"]
        if res.get("driver_failed"):
            out.append(f"| {esc(r['label'])} | – | {res['connections']} | – | – | – | – | – | – | driver failed |")
            continue
        note = []
        if res.get("connect_failed"):
            note.append(f"{res['connect_failed']} connects failed: " + "; ".join(res["error_samples"][:2]))
        note.append(f"sampled {res['sampled_at_s']:.1f} s after the first connect")
        kb = lambda v: None if v is None else v / 1024  # noqa: E731
        out.append("| {} | {} | {} | {} | {} | {} → {} | {} | {} | {} → {} | {} |".format(
            esc(r["label"]), res["mode"], res["connected"], res["closed_by_server"], res["held"],
            fmt(res["rss_before_bytes"] / 1e6, 1), fmt(res["rss_after_bytes"] / 1e6, 1),
            fmt(kb(res["rss_per_conn_bytes"]), 1), fmt(kb(res["pss_per_conn_bytes"]), 1),
            res["processes_before"], res["processes_after"], esc("; ".join(note))))

    for key, reason in notes.items():
        if key in seen:
            out.append(f"\nNote ({key}): {reason}")

    # -- ratios and targets
    def get(server, kind, c, field):
        res = by.get((server, kind, c))
        if not res or res.get("driver_failed"):
            return None
        return res.get(field)

    def ratio(x, y):
        return f"{x / y:.2f}" if x and y else "n/a"

    out.append("")
    out.append("Ratios (gitplane / sshd; > 1 means gitplane is higher):")
    out.append("")
    out.append("| measure | " + " | ".join(f"c={c}" for c in clone_levels) + " |")
    out.append("|---|" + "---:|" * len(clone_levels))
    for name, field in [("clones/s", "clones_per_s"), ("server CPU per clone", "server_cpu_s_per_clone"),
                        ("server peak RSS", "peak_rss_bytes")]:
        out.append(f"| {name} | " + " | ".join(
            ratio(get("gitplane", "clones", c, field), get("sshd", "clones", c, field)) for c in clone_levels) + " |")
    out.append("")
    out.append("| measure | " + " | ".join(f"c={c}" for c in session_levels) + " |")
    out.append("|---|" + "---:|" * len(session_levels))
    for name, field in [("sessions/s", "sessions_per_s"), ("server CPU per session", "server_cpu_ms_per_session")]:
        out.append(f"| {name} | " + " | ".join(
            ratio(get("gitplane", "sessions", c, field), get("sshd", "sessions", c, field)) for c in session_levels) + " |")

    out.append("")
    out.append("Issue #3 targets:")
    out.append("")
    out.append("| target | measured | met? |")
    out.append("|---|---|---|")
    for c in clone_levels:
        g = by.get(("gitplane", "clones", c))
        gr, sr = get("gitplane", "clones", c, "clones_per_s"), get("sshd", "clones", c, "clones_per_s")
        if not g or g.get("driver_failed") or not gr or not sr:
            out.append(f"| clones/s ≥ {TARGET_CLONE_RATIO}× sshd with 0 failures, c={c} | n/a | not measured |")
            continue
        r = gr / sr
        met = r >= TARGET_CLONE_RATIO and g["errors"] == 0
        out.append(f"| clones/s ≥ {TARGET_CLONE_RATIO}× sshd with 0 failures, c={c} "
                   f"| {r:.2f}× ({gr:.2f} vs {sr:.2f}), gitplane failures {g['errors']}, "
                   f"sshd failures {by[('sshd', 'clones', c)]['errors']} | {'yes' if met else 'NO'} |")
    gi = by.get(("gitplane", "idle", None))
    if gi and not gi.get("driver_failed") and gi.get("rss_per_conn_bytes") is not None:
        v = gi["rss_per_conn_bytes"]
        out.append(f"| RSS per idle pre-auth connection ≤ 64 KB | {v / 1024:.1f} KB "
                   f"({gi['held']} held of {gi['connections']}) | {'yes' if v <= TARGET_IDLE_BYTES else 'NO'} |")
    else:
        out.append("| RSS per idle pre-auth connection ≤ 64 KB | n/a | not measured |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
