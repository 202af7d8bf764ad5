"""Helpers shared by the Markdown renderers (report.py, ssh_report.py, compare_report.py)."""
import json


def esc(s):
    """A table cell: no pipe or newline breaks the row."""
    return str(s).replace("|", "\\|").replace("\n", " ")


def fmt(v, nd=2):
    return "–" if v is None else f"{v:.{nd}f}"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_notes(stream):
    """notes.tsv lines "server<TAB>reason" (servers not measured, or broken mid-run)."""
    notes = {}
    for line in stream:
        if "\t" in line:
            k, v = line.rstrip("\n").split("\t", 1)
            notes[k] = v
    return notes


def result_notes(res, verified=False):
    """The notes cell's parts for one measured row: CPU cross-check, sample errors, and (for
    clones, when `verified`) whether any clone was fsck-checked."""
    note = []
    if res.get("cpu_check", "ok") != "ok":
        note.append("CPU: " + res["cpu_check"])
    if res.get("error_samples"):
        note.append("errors: " + "; ".join(e[:160] for e in res["error_samples"][:2]))
    if verified and res.get("fsck_checked", 0) == 0:
        note.append("no clone verified")
    return note


def clone_row(label, res):
    """One row of the git-clone tables: | server | concurrency | clones | failures | clones/s |
    server CPU-s per clone | server peak RSS MB | client CPU-s per clone | notes |."""
    if res.get("driver_failed"):
        return (f"| {esc(label)} | {res['concurrency']} | {res['clones']} | {res['clones']} "
                "| – | – | – | – | driver failed |")
    return "| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
        esc(label), res["concurrency"], res["clones"], res["errors"],
        fmt(res["clones_per_s"]), fmt(res["server_cpu_s_per_clone"]),
        fmt(res["peak_rss_bytes"] / 1e6, 1), fmt(res["client_cpu_s_per_clone"]),
        esc("; ".join(result_notes(res, verified=True))))
