"""Charts for report.html: matplotlib figures rendered to inline SVG (text kept as text, no script, no external
asset: the page opens offline). Each chart is a ``<figure class="chart" data-chart="...">`` holding one ``<svg>``;
every mark carries a ``<title>`` with its exact values (a tooltip in the browser).

- ``tradeoff``: quality against p50 latency per target, the circle's area proportional to the artifact's size;
  each target's FP32 baseline is a hollow circle of the same colour, an arrow goes from it to what ships;
- ``latency`` and ``size`` (``versus_fp32``): bars of each target's artifact against its FP32 baseline;
- ``search``: the accuracy search's tries, one bar per configuration (its quality), green within budget;
- ``sensitivity``: per-layer INT8 sensitivity, most sensitive first;
- ``outputs``: per-output fidelity (SQNR in dB, or cosine when SQNR is unknown).

Readable by construction: the axes are padded until every mark (with its radius) and every value label lies inside
the plot area; an axis whose values span more than a decade is logarithmic; points are named in a legend below the
plot, bars by their row, so no two labels can collide. tests/pipeline/test_ux_plots.py checks this in Chromium.

The SVG elements a reader (or a test) looks for have stable ids, prefixed by the chart's slug
(``<kind>-<target>``): ``<slug>--plot-area`` (the axes' background), ``<slug>--mark-<i>`` (a point or a bar),
``<slug>--label-<i>`` (a value label or legend text). Every other id matplotlib writes gets the slug as prefix,
so ids stay unique on a page with many charts.

matplotlib is optional (the ``report`` extra) and imported only when a chart is drawn; without it the report
carries one note instead of its charts (``available()``, ``MISSING_NOTE``).
"""
from __future__ import annotations

import importlib.util
import math

from edgebuild.pipeline.chart import (
    HALF_IN, LOG_SPAN_BARS, PAD_PT, RENDER, ROW_IN, WIDE_IN, Chart, axis_style, chart_slug, fit, log_ticks, log_wanted,
    num, plot_size_pt, short_labels)

BLUE, GREY, GREEN, RED, AMBER = "#2f81f7", "#8c959f", "#1a7f37", "#cf222e", "#bf8700"
TARGET_COLORS = ("#0969da", "#bf3989", "#1a7f37", "#bc4c00", "#8250df", "#9a6700", "#1b7c83", "#57606a")
TARGET_MARKERS = ("o", "s", "^", "v")  # past 8 targets the colours repeat with another shape (each within radius r)
MISSING_NOTE = ("charts need matplotlib, which is not installed: pip install 'edgebuild[report]' "
                "(the tables hold the same numbers)")


def quality(m: dict) -> tuple[str, float] | None:
    """The quality a person compares targets by (higher is better): accuracy, top-1 agreement, the task's first
    score, or the worst cosine."""
    if not m:
        return None
    if "accuracy" in m:
        return "accuracy (%)", m["accuracy"]
    if "top1_agreement" in m:
        return "top-1 agreement with FP32 (%)", m["top1_agreement"]
    task = m.get("task")
    if task and task.get("artifact"):
        key = (task.get("evaluator_scores") or list(task["artifact"]))[0]
        return key, task["artifact"][key]
    return ("worst cosine vs FP32", m["cosine_min"]) if "cosine_min" in m else None


def available() -> bool:
    """Whether matplotlib is installed (without importing it)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # an import hook refusing it, a module set to None
        return False


def render(build, *args) -> str:
    """Draw one chart (``build`` returns (chart, caption) or None) and return its HTML; '' when there is nothing."""
    if not available():
        return ""  # write_report says once that the charts need matplotlib
    with RENDER:  # matplotlib's rcParams are process-wide: one chart is rendered at a time
        made = build(*args)
        return made[0].to_svg(made[1]) if made else ""


# ---- trade-off: quality vs latency vs size ----------------------------------------------------------------

def tradeoff(manifest: dict) -> str:
    """Quality (y) vs p50 latency (x) per target, circle area ∝ size; each target's FP32 baseline hollow."""
    return render(_tradeoff, manifest)


def tradeoff_points(manifest: dict) -> tuple[str | None, list[dict]]:
    """(quality label, points): one point per target's artifact and one per FP32 baseline that has a quality."""
    points, ylabel = [], None
    model = manifest.get("model", {})
    ref_quality = quality({"accuracy": model["accuracy"]}) if model.get("accuracy") is not None else None
    for i, (name, t) in enumerate(manifest["targets"].items()):
        q, lat = quality(t.get("metrics") or {}), (t.get("latency") or {}).get("p50_ms")
        if t.get("verdict") == "error" or q is None or lat is None or (ylabel and q[0] != ylabel):
            continue
        ylabel, color = q[0], TARGET_COLORS[i % len(TARGET_COLORS)]
        marker = TARGET_MARKERS[(i // len(TARGET_COLORS)) % len(TARGET_MARKERS)]
        precision = str(t.get("precision") or "artifact").upper()
        points.append({"target": name, "label": f"{name} {precision}", "latency": lat, "quality": q[1],
                       "size": t.get("size_bytes") or 0, "color": color, "marker": marker, "fp32": precision == "FP32"})
        base = t.get("baseline_fp32") or {}
        base_lat = (base.get("latency") or {}).get("p50_ms")
        base_q = ref_quality[1] if ref_quality and ref_quality[0] == ylabel else (1.0 if ylabel.startswith("worst cos") else None)
        if base_lat is not None and base_q is not None and precision != "FP32":
            points.append({"target": name, "label": f"{name} FP32", "latency": base_lat, "quality": base_q,
                           "size": base.get("size_bytes") or 0, "color": color, "marker": marker, "fp32": True})
    return ylabel, points


def _tradeoff(manifest: dict):
    from matplotlib.lines import Line2D

    ylabel, points = tradeoff_points(manifest)
    if not points:
        return None
    chart = Chart("tradeoff", "tradeoff", WIDE_IN, 3.4)
    ax = chart.ax
    biggest = max(p["size"] for p in points) or 1
    for p in points:
        p["r"] = 4.0 + 11.0 * math.sqrt(p["size"] / biggest)  # half its width in points: area ∝ size
    unit = "%" if "%" in ylabel else ""
    handles = []
    for p in points:
        size_mb = f"{p['size'] / 1e6:.3f} MB" if p["size"] else "size unknown"
        text = f"{p['label']}: {num(p['quality'])}{(' ' + unit) if unit else ''}, p50 {p['latency']:.3f} ms, {size_mb}"
        face = "none" if p["fp32"] else p["color"]
        ax.scatter([p["latency"]], [p["quality"]], s=(2 * p["r"]) ** 2, marker=p["marker"], facecolors=face,
                   edgecolors=p["color"],
                   alpha=0.9 if p["fp32"] else 0.55, linewidths=1.6 if p["fp32"] else 1.0,
                   linestyles="--" if p["fp32"] else "-", gid=chart.mark(text), zorder=3 if p["fp32"] else 2)
        handles.append(Line2D([], [], linestyle="none", marker=p["marker"], markersize=8, markerfacecolor=face,
                              markeredgecolor=p["color"], markeredgewidth=1.4, alpha=0.8, label=text))
    for p in points:  # FP32 -> what ships
        if not p["fp32"]:
            base = next((b for b in points if b["fp32"] and b["target"] == p["target"]), None)
            if base and (base["latency"], base["quality"]) != (p["latency"], p["quality"]):
                ax.annotate("", xy=(p["latency"], p["quality"]), xytext=(base["latency"], base["quality"]),
                            arrowprops={"arrowstyle": "->", "color": p["color"], "alpha": 0.6, "lw": 1,
                                        "shrinkA": base["r"], "shrinkB": p["r"]}, zorder=1)
    xlog = log_wanted([p["latency"] for p in points])
    axis_style(ax, "x", xlog)
    axis_style(ax, "y", False)
    ax.set_xlabel("p50 latency on this host (ms" + (", log scale)" if xlog else ")")
                  + ";  area ∝ size on disk;  hollow: FP32")
    ax.set_ylabel(ylabel)
    _legend_right(chart, handles)
    for _ in range(4):  # limits depend on the plot area's size, which depends on the tick labels: settle both
        w, h = plot_size_pt(chart)
        needs = [(p["r"] + 2 * PAD_PT, p["r"] + 2 * PAD_PT) for p in points]
        ax.set_xlim(*fit([p["latency"] for p in points], needs, w, xlog))
        if xlog:
            log_ticks(ax, "x", w)
        ax.set_ylim(*fit([p["quality"] for p in points], needs, h, False))
    return chart, "quality vs latency vs size, per target"


def _legend_right(chart: Chart, handles) -> None:
    """A legend right of the plot, one point a row; the figure grows taller when the rows need it."""
    legend = chart.fig.legend(handles=handles, loc="outside right upper", frameon=False, handletextpad=0.4,
                              borderaxespad=0.2, labelspacing=0.7)
    for text in legend.get_texts():
        text.set_gid(chart.label())
    need = legend.get_window_extent(chart.fig.canvas.get_renderer()).height / 72 + 0.3
    if need > chart.fig.get_figheight():
        chart.fig.set_figheight(need)


# ---- bars -------------------------------------------------------------------------------------------------

def hbars(kind: str, title: str, rows: list[tuple[str, float | None, str]], unit: str = "", slug: str = "",
          xlabel: str = "", missing: str = "no value") -> str:
    """Horizontal bars, one per (label, value, colour), first row on top; each bar's value is written at its end,
    a missing value is a row that says ``missing``."""
    return render(_hbars, kind, title, rows, unit, slug or kind, xlabel, missing)


def _hbars(kind, title, rows, unit, slug, xlabel, missing):
    from matplotlib import transforms

    values = [v for _, v, _ in rows if v is not None]
    if not values:
        return None
    chart = Chart(kind, chart_slug(slug), HALF_IN, 0.5 + (0.2 if xlabel else 0) + ROW_IN * max(len(rows), 2))
    ax = chart.ax
    ax.grid(False, axis="y")
    log = log_wanted(values, LOG_SPAN_BARS)
    axis_style(ax, "x", log)
    floor = min(values) / 2 if log else 0.0
    texts = []
    for i, (label, v, color) in enumerate(rows):
        shown = missing if v is None else f"{num(v)}{(' ' + unit) if unit else ''}"
        if v is not None:
            ax.barh([i], [v - floor], left=floor, height=0.7, color=color, gid=chart.mark(f"{label}: {shown}"))
        at = floor if v is None else v
        right = v is None or v >= floor
        offset = transforms.offset_copy(ax.transData, fig=chart.fig, x=4 if right else -4, y=0, units="points")
        texts.append(ax.text(at, i, shown, transform=offset, va="center", ha="left" if right else "right",
                             color="#57606a" if v is None else "#1f2328", gid=chart.label()))
    ax.set_yticks(range(len(rows)), short_labels([r[0] for r in rows]))
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.tick_params(axis="y", length=0)
    if xlabel:
        ax.set_xlabel(xlabel)
    if not log and min(values) >= 0:
        ax.spines["left"].set_visible(True)
    elif not log:
        ax.axvline(0, color="#57606a", linewidth=0.8)
    for _ in range(4):  # room for each value label inside the plot area
        w, _h = plot_size_pt(chart)
        renderer = chart.fig.canvas.get_renderer()
        widths = [t.get_window_extent(renderer).width + 4 + PAD_PT for t in texts]
        pts = [floor if v is None else v for _, v, _ in rows]
        needs = [(wd, PAD_PT) if (v is not None and v < floor) else (PAD_PT, wd) for wd, (_, v, _) in zip(widths, rows)]
        lo, hi = fit(pts, needs, w, log, floor=floor)
        ax.set_xlim(lo if (log or min(values) < 0) else 0.0, hi)
        if log:
            log_ticks(ax, "x", w)
    return chart, title


def versus_fp32(manifest: dict) -> str:
    """Each target's artifact against its FP32 baseline: p50 latency and size."""
    lat, size = [], []
    for name, t in manifest["targets"].items():
        if t.get("verdict") == "error":
            continue
        base, p = t.get("baseline_fp32") or {}, str(t.get("precision") or "artifact").upper()
        lat += [(f"{name} {p}", (t.get("latency") or {}).get("p50_ms"), BLUE)]
        size += [(f"{name} {p}", (t.get("size_bytes") or 0) / 1e6 or None, BLUE)]
        if p != "FP32":
            lat += [(f"{name} FP32", (base.get("latency") or {}).get("p50_ms"), GREY)]
            size += [(f"{name} FP32", (base.get("size_bytes") or 0) / 1e6 or None, GREY)]
    return (hbars("latency", "p50 latency on this host, artifact (blue) vs FP32 (grey)", lat, "ms",
                  xlabel="p50 latency (ms)")
            + hbars("size", "size on disk, artifact (blue) vs FP32 (grey)", size, "MB", xlabel="size (MB)"))


def search(name: str, record: dict) -> str:
    """The accuracy search's tries: one bar per configuration tried, its headline number; green within budget,
    red failed, amber a conversion error."""
    skip = ("latency_p50_ms", "quality_loss", "size_bytes")
    tries = record.get("tries") or []
    key = next((k for a in tries for k, v in a.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k not in skip), None)
    rows = []
    for i, a in enumerate(tries, 1):
        label = f"{i}. {a.get('label', '')}"
        if a.get("error"):
            rows.append((label + " (error)", None, AMBER))
        else:
            rows.append((label, a.get(key) if key else None, RED if a.get("failures") else GREEN))
    better = "lower" if key and key.endswith(("_drop", "disagreement", "_error")) else "higher"
    return hbars("search", f"{name}: accuracy search, {key or 'quality'} of every configuration tried "
                           f"({better} is better; green: within budget, red: over it)", rows,
                 slug=f"search-{name}", xlabel=f"{key or 'quality'} ({better} is better)", missing="conversion error")


def sensitivity(name: str, layers: dict, limit: int = 20) -> str:
    rows = [(n, float(v), RED if i < 3 else AMBER) for i, (n, v) in enumerate(list(layers.items())[:limit])]
    more = f" (top {limit} of {len(layers)})" if len(layers) > limit else ""
    return hbars("sensitivity", f"{name}: per-layer INT8 sensitivity, quality lost when only this layer is "
                                f"quantized{more}", rows, slug=f"sensitivity-{name}", xlabel="quality lost")


def outputs(name: str, metrics: dict) -> str:
    """Per-output fidelity to FP32: SQNR (dB) when known, else cosine."""
    outs = metrics.get("outputs") or {}
    if not outs:
        return ""
    if all(o.get("sqnr_db") is not None for o in outs.values()):
        rows = [(n, o["sqnr_db"], BLUE) for n, o in outs.items()]
        return hbars("outputs", f"{name}: per-output SQNR vs FP32 (higher is better)", rows, "dB",
                     slug=f"outputs-{name}", xlabel="SQNR (dB)")
    rows = [(n, o.get("cosine"), BLUE) for n, o in outs.items()]
    return hbars("outputs", f"{name}: per-output cosine vs FP32", rows, slug=f"outputs-{name}", xlabel="cosine")
