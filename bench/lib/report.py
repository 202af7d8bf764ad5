#!/usr/bin/env python3
"""Render bench/compare-http.sh results as Markdown.

  report.py RESULTS.jsonl "1 8 32" < notes.tsv

notes.tsv: "server<TAB>reason" for servers that could not be measured.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mdreport import clone_row, esc, fmt, read_jsonl, read_notes  # noqa: E402

SERVERS = [  # key, label for servers that were not measured
    ("gitplane", "gitplane"),
    ("gitplane-v0", "gitplane (v0)"),
    ("nginx", "nginx+fcgiwrap+git-http-backend"),
    ("nginx-v0", "nginx+fcgiwrap+git-http-backend (v0)"),
    ("git-daemon", "git daemon"),
]


def main():
    rows = read_jsonl(sys.argv[1])
    levels = [int(c) for c in sys.argv[2].split()]
    notes = read_notes(sys.stdin)
    by = {}
    out = []
    out.append("| server | concurrency | clones | errors | clones/s | server CPU-s per clone "
               "| server peak RSS MB | client CPU-s per clone | notes |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    order = {k: i for i, (k, _) in enumerate(SERVERS)}
    rows.sort(key=lambda r: (order.get(r["server"], 99), r["result"].get("concurrency", 0)))
    seen = set()
    for r in rows:
        res = r["result"]
        seen.add(r["server"])
        by[(r["server"], res.get("concurrency"))] = res
        out.append(clone_row(r["label"], res))
    for key, label in SERVERS:
        if key in notes and key not in seen:
            out.append(f"| {esc(label)} | – | – | – | – | – | – | – | not measured: {esc(notes[key])} |")
    for key, reason in notes.items():
        if key in seen:
            out.append(f"\nNote ({key}): {reason}")
    out.append("")
    out.append("Ratios (protocol v2 rows; > 1 means gitplane is higher):")
    out.append("")
    out.append("| concurrency | clones/s gitplane / nginx | clones/s gitplane / git daemon "
               "| CPU per clone gitplane / git daemon | CPU per clone gitplane / nginx |")
    out.append("|---:|---:|---:|---:|---:|")

    def ratio(a, b, field):
        if not a or not b or a.get("driver_failed") or b.get("driver_failed"):
            return "n/a"
        x, y = a.get(field), b.get(field)
        if not x or not y:
            return "n/a"
        return f"{x / y:.2f}"

    for c in levels:
        gp, ng, gd = by.get(("gitplane", c)), by.get(("nginx", c)), by.get(("git-daemon", c))
        out.append(f"| {c} | {ratio(gp, ng, 'clones_per_s')} | {ratio(gp, gd, 'clones_per_s')} "
                   f"| {ratio(gp, gd, 'server_cpu_s_per_clone')} | {ratio(gp, ng, 'server_cpu_s_per_clone')} |")
    if "gitplane" not in seen:
        out.append("")
        out.append("gitplane was not measured in this run, so its ratios are n/a"
                   + (f" ({notes['gitplane']})." if "gitplane" in notes else "."))
    print("\n".join(out))


if __name__ == "__main__":
    main()
