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
