"""report.html's plots: inline SVG drawn by pipeline/plots.py (quality vs latency vs size, artifact vs FP32, the
accuracy search's tries, per-layer sensitivity, per-output metrics), checked in the markup and in a real headless
Chromium (the SVG elements are laid out with a size, and the screenshot shows them)."""
import copy
import re
import shutil
import subprocess

import numpy as np
import pytest

from edgebuild.pipeline import plots
from edgebuild.pipeline.report import write_report

CHARTS = ("tradeoff", "latency", "size", "search", "sensitivity", "outputs")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A real build's manifest, with the search record of a target whose first INT8 try missed its budget."""
    import torch

    from edgebuild import build

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(64, 3))
    x = np.random.default_rng(0).normal(size=(48, 1, 4, 4)).astype(np.float32)
    out = tmp_path_factory.mktemp("plots") / "out"
    m = copy.deepcopy(build(model=net, input_shape=(1, 1, 4, 4), calib=x, targets=["onnx-cpu"], out=str(out),
                            auto=False, cache=False, budgets={"cosine_min": 0.5}).manifest)
    t = m["targets"]["onnx-cpu"]
    t["search"] = {"tries": [
        {"label": "profile settings", "cosine_min": 0.91, "quality_loss": 0.4, "size_bytes": 5000,
         "latency_p50_ms": 0.02, "failures": ["cosine_min 0.91 < 0.95"]},
        {"label": "percentile calibration", "error": "conversion failed"},
        {"label": "3 layers in float", "cosine_min": 0.97, "quality_loss": 0.0, "size_bytes": 6000,
         "latency_p50_ms": 0.03, "failures": []}],
        "sensitivity": {"method": "one layer at a time", "layers": {"/0/Conv": 0.3, "/3/Gemm": 0.05}}}
    return m


def _charts(page: str) -> dict[str, str]:
    return dict(re.findall(r'<figure class="chart" data-chart="(\w+)">(.*?)</figure>', page, flags=re.S))


def test_every_chart_is_inline_svg_with_a_mark_per_value(manifest, tmp_path):
    write_report(manifest, tmp_path / "report.md")
    page = (tmp_path / "report.html").read_text()
    charts = _charts(page)
    assert set(CHARTS) <= set(charts), sorted(charts)
    assert not re.search(r"<script|<link|<img|\bsrc=|url\(|https?://", page), "nothing to fetch: opens offline"
    assert charts["tradeoff"].count("<circle") == 2  # the INT8 artifact and its FP32 baseline
    assert "onnx-cpu INT8" in charts["tradeoff"] and "onnx-cpu FP32" in charts["tradeoff"]
    assert charts["search"].count("<rect") == 3 and "(error)" in charts["search"]
    assert "#cf222e" in charts["search"] and "#1a7f37" in charts["search"]  # failed red, within budget green
    assert "/0/Conv: 0.3" in charts["sensitivity"] and charts["sensitivity"].count("<rect") == 2
    for name in manifest["targets"]["onnx-cpu"]["metrics"]["outputs"]:
        assert f"<title>{name}:" in charts["outputs"]
    assert "<svg" not in (tmp_path / "report.md").read_text()  # the Markdown stays text


def test_a_report_without_a_search_has_no_search_charts(manifest, tmp_path):
    m = copy.deepcopy(manifest)
    del m["targets"]["onnx-cpu"]["search"]
    write_report(m, tmp_path / "report.md")
    charts = _charts((tmp_path / "report.html").read_text())
    assert "search" not in charts and "sensitivity" not in charts and "tradeoff" in charts


def test_ticks_cover_the_range():
    ticks = plots._ticks(0.0, 0.37)
    assert ticks[0] <= 0.0 + 1e-12 and ticks[-1] >= 0.3 and 3 <= len(ticks) <= 6
    assert plots._ticks(5.0, 5.0)  # one value still gets an axis


def _browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium installed (apt-get install chromium)")
def test_chromium_lays_out_every_chart_and_the_screenshot_shows_them(manifest, tmp_path):
    from PIL import Image

    write_report(manifest, tmp_path / "report.md")
    page = tmp_path / "report.html"
    # a probe appended to a copy of the page: Chromium measures each chart's SVG after layout and writes the
    # sizes into the DOM it dumps (the report itself carries no script)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", """<script>
      document.body.setAttribute("data-sizes", JSON.stringify([...document.querySelectorAll("figure.chart")].map(
        f => [f.dataset.chart, f.querySelector("svg").getBoundingClientRect().width,
              f.querySelector("svg").getBoundingClientRect().height, f.querySelectorAll("svg rect, svg circle").length])));
    </script></body>"""))
    common = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    import html
    import json

    sizes = json.loads(html.unescape(re.search(r'data-sizes="([^"]*)"', dom.stdout)[1]))
    assert {s[0] for s in sizes} >= set(CHARTS)
    assert all(w > 100 and h > 10 and marks > 0 for _, w, h, marks in sizes), sizes
    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
                   capture_output=True, text=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    blue = (abs(img[..., 0] - 0x2f) < 40) & (abs(img[..., 1] - 0x81) < 40) & (img[..., 2] > 200)
    green = (img[..., 0] < 60) & (abs(img[..., 1] - 0x7f) < 40) & (img[..., 2] < 90)
    red = (img[..., 0] > 180) & (img[..., 1] < 70) & (img[..., 2] < 80)
    assert blue.sum() > 200 and green.sum() > 50 and red.sum() > 50, (blue.sum(), green.sum(), red.sum())
