"""What a batch leaves beside its cells: ``batch.json`` (the executor and every cell's line) and ``batch.html`` (a
model x target grid: verdict, shipped precision, quality vs FP32, speed-up, size, a link to each cell's report).
Both are written atomically (a temporary file renamed into place)."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

EXIT_ORDER = (0, 1, 3, 2, 130)  # worst last: a batch exits with the worst of its cells
CELL_KEYS = ("model", "target", "exit", "verdict", "artifact", "artifact_sha256", "outputs_sha256", "clock_decided",
             "skipped", "precision",
             "accuracy_drop", "speedup_vs_fp32", "size_bytes", "seconds", "build_seconds", "cpu_seconds", "started", "error", "worker",
             "threads", "timing_waited_s", "attempts")


def batch_exit(records: list[dict]) -> int:
    """0 every cell passed · 1 some budget missed · 3 some cell failed (conversion or worker) · 130 interrupted."""
    worst = 0
    for r in records:
        code = r.get("exit", 3)
        code = code if code in EXIT_ORDER else 3
        if EXIT_ORDER.index(code) > EXIT_ORDER.index(worst):
            worst = code
    return worst


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(out: Path, matrix, executor: dict, records: dict[str, dict], seconds: float) -> dict:
    """``batch.json`` and ``batch.html`` under ``out``; returns the batch.json content."""
    cells = []
    for c in matrix.cells:
        r = records.get(c.name) or {"model": c.model, "target": c.target, "exit": 130, "verdict": "not run"}
        line = {k: r.get(k) for k in CELL_KEYS if k in r or k in ("model", "target", "exit", "verdict", "artifact",
                                                                   "skipped")}
        line["skipped"] = bool(r.get("skipped"))
        line["out"] = f"{c.model}/{c.target}"
        line["report"] = f"{c.model}/{c.target}/report.html" if r.get("verdict") in ("pass", "fail") else None
        line["table"] = r.get("table")
        line["resources"] = c.to_dict()["resources"]
        cells.append(line)
    built = [r for r in records.values() if not r.get("skipped") and r.get("seconds") is not None]
    doc = {
        "matrix": str(matrix.path), "executor": executor["name"], "executor_info": executor, "cache": matrix.cache,
        "exit": batch_exit(cells), "seconds": round(seconds, 2),
        "cell_seconds_sum": round(sum(r["seconds"] for r in built), 2),
        "cell_cpu_seconds_sum": round(sum(r.get("cpu_seconds") or 0 for r in built), 2),
        "counts": {k: sum(1 for c in cells if c["verdict"] == k) for k in ("pass", "fail", "error", "interrupted")}
        | {"skipped": sum(c["skipped"] for c in cells)},
        "cells": cells,
    }
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "batch.json", json.dumps(doc, indent=2, default=str))
    _atomic_write(out / "batch.html", render_html(doc, matrix))
    return doc


STYLE = {"pass": "#d9f2d9", "fail": "#ffe0b3", "error": "#f8c8c8", "interrupted": "#e0e0e0", "not run": "#e0e0e0"}


def _cell_html(line: dict | None) -> str:
    if line is None:
        return "<td class='none'>–</td>"
    table = line.get("table") or {}
    e = html.escape
    verdict = e(str(line["verdict"]).upper()) + (" (skipped: built earlier)" if line.get("skipped") else "")
    parts = [f"<b>{verdict}</b>"]
    if line["verdict"] in ("pass", "fail"):
        parts.append(f"{e(str(line.get('precision') or '–'))} · {e(str(line.get('artifact') or '–'))}")
        parts.append(f"quality vs FP32 {e(str(table.get('drop') or '–'))} · speed-up {e(str(table.get('speedup') or '–'))}"
                     f" · {e(str(table.get('size') or '–'))}")
        if line.get("clock_decided"):
            parts.append(f"<span class='err'>the search's time limit decided: {e('; '.join(line['clock_decided']))}"
                         "</span>")
        parts.append(f"<a href='{e(line['report'])}'>report</a>")
    else:
        parts.append(f"<span class='err'>{e(str(line.get('error') or ''))}</span>")
    colour = STYLE.get(line["verdict"], "#ffffff")
    return f"<td style='background:{colour}'>" + "<br>".join(parts) + "</td>"


def render_html(doc: dict, matrix) -> str:
    """A plain page: one row per model, one column per target."""
    e = html.escape
    grid = {(c["model"], c["target"]): c for c in doc["cells"]}
    head = "".join(f"<th>{e(t)}</th>" for t in matrix.targets)
    rows = "".join(f"<tr><th>{e(m)}</th>" + "".join(_cell_html(grid.get((m, t))) for t in matrix.targets) + "</tr>"
                   for m in matrix.models)
    counts = ", ".join(f"{v} {k}" for k, v in doc["counts"].items() if v)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgebuild batch</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:.5em;vertical-align:top;text-align:left}} .err{{color:#900}}</style></head>
<body><h1>edgebuild batch — exit {doc['exit']}</h1>
<p>{e(str(doc['matrix']))} · executor {e(doc['executor'])} · {len(doc['cells'])} cells ({e(counts)}) ·
{doc['seconds']} s wall, {doc['cell_seconds_sum']} s in cells · cache {e(str(doc['cache']))}</p>
<table><tr><th>model \\ target</th>{head}</tr>{rows}</table>
</body></html>
"""
