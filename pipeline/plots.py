"""Charts for report.html, drawn here as inline SVG (no script, no library, no external asset: the page opens
offline). Each chart is a ``<figure class="chart" data-chart="...">`` holding one ``<svg>``; every mark carries
a ``<title>`` with its exact value (a tooltip in the browser).

- ``tradeoff``: quality against p50 latency per target, the circle's area proportional to the artifact's size,
  with the FP32 baseline of each target in grey;
- ``versus_fp32``: bars of each target's artifact against its FP32 baseline (latency, size);
- ``search``: the accuracy search's tries, one bar per configuration (its quality), green within budget;
- ``sensitivity``: per-layer INT8 sensitivity, most sensitive first;
- ``outputs``: per-output fidelity (SQNR in dB, or cosine when SQNR is unknown).
"""
from __future__ import annotations

import html
import math

BLUE, GREY, GREEN, RED, AMBER = "#2f81f7", "#8c959f", "#1a7f37", "#cf222e", "#bf8700"
FONT = 'font-size="11" font-family="system-ui,sans-serif"'


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _num(v: float) -> str:
    return f"{v:.4g}"


def figure(kind: str, title: str, width: int, height: int, marks: list[str]) -> str:
    return (f'<figure class="chart" data-chart="{_esc(kind)}"><figcaption>{_esc(title)}</figcaption>'
            f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{_esc(title)}" {FONT}>' + "".join(marks) + "</svg></figure>")


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


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(k for k in (1, 2, 5, 10) if (hi - lo) / (step * k) <= n + 1)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _axes(x0, y0, w, h, xs, ys, sx, sy, xlabel, ylabel) -> list[str]:
    marks = [f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="#57606a"/>',
             f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + h}" stroke="#57606a"/>']
    for t in xs:
        marks.append(f'<text x="{sx(t):.1f}" y="{y0 + h + 14}" text-anchor="middle">{_num(t)}</text>')
    for t in ys:
        marks.append(f'<line x1="{x0}" y1="{sy(t):.1f}" x2="{x0 + w}" y2="{sy(t):.1f}" stroke="#eaeef2"/>'
                     f'<text x="{x0 - 5}" y="{sy(t) + 4:.1f}" text-anchor="end">{_num(t)}</text>')
    marks.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 30}" text-anchor="middle">{_esc(xlabel)}</text>')
    marks.append(f'<text transform="translate(12,{y0 + h / 2}) rotate(-90)" text-anchor="middle">{_esc(ylabel)}</text>')
    return marks


def tradeoff(manifest: dict) -> str:
    """Quality (y) vs p50 latency (x) per target, circle area ∝ size; FP32 baselines in grey."""
    points, ylabel = [], None
    ref_quality = quality({"accuracy": manifest["model"]["accuracy"]}) if "accuracy" in manifest.get("model", {}) else None
    for name, t in manifest["targets"].items():
        q, lat = quality(t.get("metrics") or {}), (t.get("latency") or {}).get("p50_ms")
        if t.get("verdict") == "error" or q is None or lat is None or (ylabel and q[0] != ylabel):
            continue
        ylabel = q[0]
        points.append((f"{name} {str(t.get('precision', '')).upper()}", lat, q[1], t.get("size_bytes") or 0, BLUE))
        base = t.get("baseline_fp32") or {}
        base_lat = (base.get("latency") or {}).get("p50_ms")
        base_q = ref_quality[1] if ref_quality and ref_quality[0] == ylabel else (1.0 if ylabel.startswith("worst cos") else None)
        if base_lat is not None and base_q is not None:
            points.append((f"{name} FP32", base_lat, base_q, base.get("size_bytes") or 0, GREY))
    if not points:
        return ""
    x0, y0, w, h = 60, 12, 420, 220
    xs = _ticks(0, max(p[1] for p in points) * 1.1)
    lo, hi = min(p[2] for p in points), max(p[2] for p in points)
    pad = (hi - lo) * 0.15 or abs(hi) * 0.01 or 1.0
    ys = _ticks(lo - pad, hi + pad)
    sx = lambda v: x0 + w * v / (xs[-1] or 1)  # noqa: E731
    sy = lambda v: y0 + h - h * (v - ys[0]) / ((ys[-1] - ys[0]) or 1)  # noqa: E731
    biggest = max(p[3] for p in points) or 1
    marks = _axes(x0, y0, w, h, xs, ys, sx, sy, "p50 latency on this host (ms); circle area ∝ size", ylabel)
    for label, lat, q, size, color in points:
        r = 4 + 14 * math.sqrt(size / biggest)
        marks.append(f'<circle cx="{sx(lat):.1f}" cy="{sy(q):.1f}" r="{r:.1f}" fill="{color}" fill-opacity="0.55" '
                     f'stroke="{color}"><title>{_esc(label)}: {_num(q)}, p50 {lat:.3f} ms, {size / 1e6:.3f} MB</title></circle>'
                     f'<text x="{sx(lat) + r + 3:.1f}" y="{sy(q) + 4:.1f}">{_esc(label)}</text>')
    return figure("tradeoff", "quality vs latency vs size, per target", x0 + w + 150, y0 + h + 40, marks)


def hbars(kind: str, title: str, rows: list[tuple[str, float | None, str]], unit: str = "") -> str:
    """Horizontal bars, one per (label, value, colour); a missing value is an empty row."""
    values = [abs(v) for _, v, _ in rows if v is not None]
    if not values:
        return ""
    top = max(values) or 1.0
    label_w, bar_w, row_h = 200, 300, 18
    marks = []
    for i, (label, v, color) in enumerate(rows):
        y = 6 + i * row_h
        width = 0 if v is None else max(1.0, bar_w * abs(v) / top)
        text = "–" if v is None else f"{_num(v)}{(' ' + unit) if unit else ''}"
        short = label if len(label) <= 32 else label[:15] + "…" + label[-16:]  # both ends say the most
        marks.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{_esc(short)}</text>'
                     f'<rect x="{label_w}" y="{y + 2}" width="{width:.1f}" height="{row_h - 5}" fill="{color}">'
                     f'<title>{_esc(label)}: {_esc(text)}</title></rect>'
                     f'<text x="{label_w + width + 4:.1f}" y="{y + 12}">{_esc(text)}</text>')
    return figure(kind, title, label_w + bar_w + 90, 12 + len(rows) * row_h, marks)


def versus_fp32(manifest: dict) -> str:
    """Each target's artifact against its FP32 baseline: p50 latency and size."""
    lat, size = [], []
    for name, t in manifest["targets"].items():
        if t.get("verdict") == "error":
            continue
        base, p = t.get("baseline_fp32") or {}, str(t.get("precision", "artifact")).upper()
        lat += [(f"{name} {p}", (t.get("latency") or {}).get("p50_ms"), BLUE),
                (f"{name} FP32", (base.get("latency") or {}).get("p50_ms"), GREY)]
        size += [(f"{name} {p}", (t.get("size_bytes") or 0) / 1e6 or None, BLUE),
                 (f"{name} FP32", (base.get("size_bytes") or 0) / 1e6 or None, GREY)]
    return (hbars("latency", "p50 latency on this host, artifact vs FP32", lat, "ms")
            + hbars("size", "size on disk, artifact vs FP32", size, "MB"))


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
                           f"({better} is better; green: within budget, red: over it)", rows)


def sensitivity(name: str, layers: dict, limit: int = 20) -> str:
    rows = [(n, float(v), RED if i < 3 else AMBER) for i, (n, v) in enumerate(list(layers.items())[:limit])]
    more = f" (top {limit} of {len(layers)})" if len(layers) > limit else ""
    return hbars("sensitivity", f"{name}: per-layer INT8 sensitivity, quality lost when only this layer is "
                                f"quantized{more}", rows)


def outputs(name: str, metrics: dict) -> str:
    """Per-output fidelity to FP32: SQNR (dB) when known, else cosine."""
    outs = metrics.get("outputs") or {}
    if not outs:
        return ""
    if all(o.get("sqnr_db") is not None for o in outs.values()):
        rows = [(n, o["sqnr_db"], BLUE) for n, o in outs.items()]
        return hbars("outputs", f"{name}: per-output SQNR vs FP32 (higher is better)", rows, "dB")
    rows = [(n, o.get("cosine"), BLUE) for n, o in outs.items()]
    return hbars("outputs", f"{name}: per-output cosine vs FP32", rows)
