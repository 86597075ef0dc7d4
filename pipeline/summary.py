"""The build's summary table on the terminal (``print_summary``): one row per target from ``report.summary_rows``,
fitted to the terminal's width (compact below ``NARROW`` columns); report.md keeps every name in full."""
from __future__ import annotations

from pathlib import Path


SUMMARY_COLUMNS = ("target", "verdict", "artifact", "accuracy", "drop", "p50", "size", "size_ratio", "speedup", "memory")
NARROW_COLUMNS = (  # below NARROW terminal columns: (heading, row keys stacked in the cell, one a line)
    ("target", ("target",)), ("result", ("verdict",)), ("artifact", ("artifact",)),
    ("quality\ndrop", ("accuracy", "drop")), ("p50\nspeedup", ("p50", "speedup")),
    ("size\n×FP32", ("size", "size_ratio")), ("memory", ("memory",)),
)
NARROW = 120  # below this many columns the table is compact: paired cells, long artifact names shortened
ARTIFACT_CHARS = 18  # an artifact name longer than this is shortened in its middle (report.md has it in full)


def abbreviate(text: str, limit: int) -> str:
    """``text`` shortened in its middle to ``limit`` characters (its start and its extension stay)."""
    if len(text) <= limit:
        return text
    tail = max(limit // 3, 6)
    return text[:limit - tail - 1] + "…" + text[-tail:]


def narrow_cell(key: str, value: str) -> str:
    if key == "artifact":  # "model_int8_mixed.tflite (64% INT8 weights)": the share on a line of its own
        name, _, share = value.partition(" (")
        return abbreviate(name, ARTIFACT_CHARS) + (f"\n{share.rstrip(')').replace(' weights', '')}" if share else "")
    if key == "memory":
        return value.replace(" (arena ", "\narena ").rstrip(")")
    return value


def summary_table(rows: list[dict], title: str, width: int):
    """The summary as a rich Table that fits ``width`` columns (80 included): below ``NARROW`` two figures share a
    cell (one a line), artifact names are shortened in their middle and long cells wrap; report.md keeps every name
    in full."""
    from rich.table import Table

    style = {"PASS": "green", "FAIL": "red", "ERROR": "red"}
    if width >= NARROW:
        table = Table(title=title)
        for key in SUMMARY_COLUMNS:
            table.add_column(key.replace("_", " "), overflow="fold")  # never cut: wrapped
        for row in rows:
            table.add_row(*[row[key] for key in SUMMARY_COLUMNS], style=style.get(row["verdict"]))
        return table
    rows_cells = [["\n".join(narrow_cell(k, row[k]) for k in keys if row[k] != "–" or k == keys[0])
                   for _, keys in NARROW_COLUMNS] for row in rows]
    widths = fit_widths([heading for heading, _ in NARROW_COLUMNS], rows_cells, width)
    table = Table(title=title, box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold underline")
    for n, ((heading, _), w) in enumerate(zip(NARROW_COLUMNS, widths)):  # a width holds its column's gap
        table.add_column(heading, width=w + (n < len(widths) - 1), overflow="fold")
    for row, cells in zip(rows, rows_cells):
        table.add_row(*cells, style=style.get(row["verdict"]), end_section=True)
    return table


SHRINK_TO = {2: ARTIFACT_CHARS, 3: 8, 6: 6}  # column index -> narrowest it wraps to (artifact, quality, memory)


def fit_widths(headings: list[str], rows: list[list[str]], width: int) -> list[int]:
    """Column widths that fit ``width`` (a one-space gap between columns): each column's widest line, the widest of
    the wrapping columns (artifact, quality, memory) narrowed, widest first, down to what still reads."""
    natural = [max(len(line) for cell in [h, *(r[i] for r in rows)] for line in cell.splitlines() or [""])
               for i, h in enumerate(headings)]
    widths, gaps = list(natural), len(headings) - 1
    while sum(widths) + gaps > width:
        shrinkable = [i for i, low in SHRINK_TO.items() if widths[i] > low]
        if not shrinkable:
            break
        i = max(shrinkable, key=lambda i: widths[i] - SHRINK_TO[i])
        widths[i] -= 1
    return widths


def print_summary(manifest, out: Path, console=None) -> None:
    """The build's summary table (``manifest``: a ``pipeline.results.Manifest``), fitted to the terminal's width
    (160 columns when stdout is not a terminal)."""
    from rich.console import Console

    from edgebuild.pipeline.report import slower_than_fp32, summary_rows

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    title = f"edgebuild — {manifest.verdict.status.upper()} ({manifest.seconds} s)"
    console.print(summary_table(summary_rows(manifest), title, console.width))
    for name, t in manifest.targets.items():
        if t.search and t.search.float_layers:
            console.print(f"{name}: kept in float: {', '.join(t.search.float_layers)}")
    for warning in slower_than_fp32(manifest):
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    console.print(f"artifacts in {out}/ (manifest.json, report.md, report.html, build.log)")
