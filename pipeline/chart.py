"""The machinery of report.html's charts (pipeline/plots.py draws them): one matplotlib figure rendered to inline
SVG with stable, page-unique ids and a tooltip per mark (``Chart``), one chart rendered at a time (``RENDER``), axes
padded until every mark and label lies inside the plot area (``fit``), logarithmic where the values span a decade
(``log_wanted``, ``axis_style``, ``log_ticks``), and row labels shortened so that they still tell rows apart
(``short_labels``). matplotlib is imported only when a chart is drawn."""
from __future__ import annotations

import html
import io
import math
import re
import threading

FONT_PT = 9  # at the page's scale (1 pt of the figure = 4/3 px): 12 px, the size of the tables' text
PX_PER_PT = 4 / 3
WIDE_IN, HALF_IN = 10.4, 5.2  # a chart alone on its row; two side by side in the report's 1068 px column
ROW_IN = 0.27  # one bar's row: tick labels 12 px tall never touch
LOG_SPAN = 10.0  # max/min above which a scatter's axis is logarithmic (a decade or more)
LOG_SPAN_BARS = 50.0  # bars compare lengths: logarithmic only when the short ones would vanish
LABEL_CHARS = 36  # a bar's row label longer than this is shortened (the tooltip and the tables keep it whole)
PAD_PT = 4.0  # between a mark (or a value label) and the plot area's edge
SANS = ["DejaVu Sans", "Bitstream Vera Sans", "Arial", "Helvetica", "Liberation Sans"]  # DejaVu ships with matplotlib
RENDER = threading.Lock()  # matplotlib's rcParams are process-wide: one chart is rendered at a time


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def num(v: float) -> str:
    return f"{v:.4g}"


def chart_slug(*parts: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-") or "chart"


# ---- one chart: a figure, its ids and tooltips, its SVG ------------------------------------------------------

class Chart:
    """One matplotlib figure with a single axes, the ids of its marks and the tooltip of each."""

    def __init__(self, kind: str, slug: str, width_in: float, height_in: float):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.kind, self.slug, self.titles = kind, slug, {}
        self.fig = Figure(figsize=(width_in, height_in), dpi=72, layout="constrained")  # 72 dpi: 1 px = 1 pt
        FigureCanvasAgg(self.fig)  # measures text as the SVG writer will (same font metrics), no pyplot
        self.fig.get_layout_engine().set(h_pad=4 / 72, w_pad=4 / 72)
        self.ax = self.fig.add_subplot()
        self.ax.patch.set_gid(f"{slug}--plot-area")
        self.ax.set_axisbelow(True)
        self.ax.grid(True, color="#eaeef2", linewidth=0.8)
        for side in ("top", "right"):
            self.ax.spines[side].set_visible(False)
        self.marks = 0
        self.labels = 0

    def mark(self, title: str) -> str:
        gid = f"{self.slug}--mark-{self.marks}"
        self.marks += 1
        self.titles[gid] = title
        return gid

    def label(self) -> str:
        gid = f"{self.slug}--label-{self.labels}"
        self.labels += 1
        return gid

    def to_svg(self, caption: str) -> str:
        import matplotlib

        buf = io.StringIO()
        rc = {"svg.fonttype": "none", "svg.hashsalt": self.slug, "svg.id": self.slug,
              "font.sans-serif": SANS}  # the fonts a browser tries: DejaVu's metrics (the layout's), then narrower
        with matplotlib.rc_context(rc):
            self.fig.savefig(buf, format="svg", metadata={"Date": None})
        svg = buf.getvalue()
        svg = svg[svg.index("<svg"):]
        svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)  # creator URL: nothing to follow
        svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg).replace("xlink:href=", "href=")  # inline in HTML5
        m = re.match(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"', svg)
        w, h = float(m[1]) * PX_PER_PT, float(m[2]) * PX_PER_PT
        svg = svg.replace(m[0], f'<svg width="{w:.0f}" height="{h:.0f}" style="max-width:100%;height:auto" '
                                f'role="img" aria-label="{esc(caption)}"', 1)
        svg = prefix_ids(svg, self.slug)
        for gid, title in self.titles.items():
            svg = svg.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{esc(title)}</title>', 1)
        return (f'<figure class="chart" data-chart="{esc(self.kind)}"><figcaption>{esc(caption)}</figcaption>'
                + svg.strip() + "</figure>")


def prefix_ids(svg: str, slug: str) -> str:
    """matplotlib numbers its ids per figure (``figure_1``, ``text_3``): prefix them, and what refers to them, with
    the chart's slug, so every id on a page of charts is unique."""
    mine = slug + "-"

    def fix(name: str) -> str:
        return name if name.startswith(mine) or name == slug else mine + name

    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{fix(m[1])}"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{fix(m[1])})", svg)
    return re.sub(r'href="#([^"]+)"', lambda m: f'href="#{fix(m[1])}"', svg)


# ---- axes that hold every mark ----------------------------------------------------------------------------

def log_wanted(values, span: float = LOG_SPAN) -> bool:
    pos = [v for v in values if v is not None]
    return bool(pos) and min(pos) > 0 and max(pos) / min(pos) >= span


def fit(values: list[float], needs: list[tuple[float, float]], length_pt: float, log: bool,
         floor: float | None = None) -> tuple[float, float]:
    """Axis limits that put every value ``v`` at least ``needs[i] = (before, after)`` points from the axis' ends
    (a circle's radius, a label's width, plus padding), on an axis ``length_pt`` long; ``floor``: a limit that
    must stay in (a bar's zero)."""
    t = [math.log10(v) for v in values] if log else list(values)
    f = (math.log10(floor) if log else floor) if floor is not None else None
    lo, hi = min(t + ([f] if f is not None else [])), max(t + ([f] if f is not None else []))
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # one value: an axis around it (half a decade, 1 %, or 0 to 1)
        half = 0.25 if log else abs(hi) * 0.005
        lo, hi = (hi - half, hi + half) if half else (hi, hi + 1.0)
        t, needs = t + [lo, hi], list(needs) + [(0.0, 0.0), (0.0, 0.0)]
    span = hi - lo
    for _ in range(50):  # the fixpoint of: limits -> points per unit -> limits
        new_lo = min(v - b / length_pt * span for v, (b, _) in zip(t, needs))
        new_hi = max(v + a / length_pt * span for v, (_, a) in zip(t, needs))
        if f is not None:
            new_lo, new_hi = min(new_lo, f), max(new_hi, f)
        new_span = new_hi - new_lo
        if abs(new_span - span) <= 1e-9 * max(1.0, abs(span)):
            break
        span = max(new_span, 1e-12)
    lo, hi = new_lo, new_hi
    return (10 ** lo, 10 ** hi) if log else (lo, hi)


def axis_style(ax, axis: str, log: bool) -> None:
    from matplotlib import ticker

    a = ax.xaxis if axis == "x" else ax.yaxis
    if log:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        a.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        a.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        a.set_minor_formatter(ticker.NullFormatter())
    else:
        a.set_major_locator(ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        fmt = ticker.ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        a.set_major_formatter(fmt)


def log_ticks(ax, axis: str, length_pt: float) -> None:
    """1, 2 and 5 of each decade where a decade is long enough for three labels, else decades only."""
    from matplotlib import ticker

    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    per_decade = length_pt / max(math.log10(hi / lo), 1e-9)
    subs = (1.0, 2.0, 5.0) if per_decade >= 150 else (1.0,)
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(ticker.LogLocator(base=10, subs=subs))


def plot_size_pt(chart: Chart) -> tuple[float, float]:
    """The plot area's width and height in points, after laying the figure out."""
    chart.fig.draw_without_rendering()
    bbox = chart.ax.get_window_extent()
    return bbox.width, bbox.height


# ---- row labels -------------------------------------------------------------------------------------------


def short_labels(labels: list[str], limit: int = LABEL_CHARS) -> list[str]:
    """Row labels that fit ``limit`` characters and still tell the rows apart: what all long labels share at the
    start (``/features/features.``, cut after a separator) becomes "…", then, when that is not enough, what they
    share at the end; a label still too long keeps both of its ends."""
    long = [s for s in labels if len(s) > limit]
    if len(long) < 2:
        return [s if len(s) <= limit else _ends(s, limit) for s in labels]
    pre = _common(long)
    suf = _common([s[::-1] for s in long])[::-1] if any(len(s) - len(pre) + 1 > limit for s in long) else ""
    out = []
    for s in labels:
        if len(s) <= limit:
            out.append(s)
            continue
        core = s[len(pre):len(s) - len(suf)] if len(pre) + len(suf) < len(s) else s
        core = ("…" if pre and core is not s else "") + core + ("…" if suf and core is not s else "")
        out.append(core if len(core) <= limit else _ends(core, limit))
    return out


def _common(strings: list[str]) -> str:
    """The longest common start of ``strings`` that ends just after a separator (``/ . _ : -``)."""
    first = strings[0]
    n = next((i for i in range(len(first)) if any(len(s) <= i or s[i] != first[i] for s in strings)), len(first))
    cut = max((i + 1 for i, c in enumerate(first[:n]) if c in "/._:-"), default=0)
    return first[:cut] if cut >= 4 else ""


def _ends(label: str, limit: int) -> str:
    head = (limit - 1) // 2
    return label[:head] + "…" + label[-(limit - 1 - head):]  # both ends say the most
