"""report.html beside report.md: self-contained, settings as tables, charts, a word on INT8 slower than FP32;
rendered by a real headless browser when one is installed."""
import copy
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgebuild.pipeline.report import settings_rows, slower_than_fp32, write_report


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import torch

    from edgebuild import build

    tmp = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(64, 3))
    x = np.random.default_rng(0).normal(size=(48, 1, 4, 4)).astype(np.float32)
    result = build(model=net, input_shape=(1, 1, 4, 4), calib=x, targets=["onnx-cpu"], out=str(tmp / "out"),
                   auto=False, cache=False, budgets={"cosine_min": 0.5})
    return result


def test_build_writes_a_self_contained_html_report_beside_the_markdown(built):
    page = (built.out / "report.html").read_text()
    md = (built.out / "report.md").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "</html>" in page
    assert not re.search(r"<script|<link|<img|<image|\bsrc=|url\((?!#)|https?://|@font-face", page), \
        "no external asset, nothing to fetch (url(#id) is a clip path of the same page)"
    assert "<th>setting</th>" in page and "| setting | value |" in md
    assert "{'" not in md and "{&#x27;" not in page, "settings are a table, not a raw dict"
    assert "onnx-cpu" in page and "model_int8_qdq.onnx" in page
    for output in built.manifest["model"]["outputs"]:
        assert output["name"] in page  # the per-output table


def test_int8_slower_than_fp32_is_named_in_the_report(built, tmp_path):
    manifest = copy.deepcopy(built.manifest)
    t = manifest["targets"]["onnx-cpu"]
    # an INT8 that shipped though slower (objective size, or a target whose host is not its device): a 4x4 conv's
    # INT8 is slower than FP32 on a host without VNNI, and the default objective ships FP32 instead (not this case)
    t["ratios"]["speedup_vs_fp32"] = 0.85
    t["precision"], t["objective"] = "int8", None
    warnings = slower_than_fp32(manifest)
    assert len(warnings) == 1 and "slower than FP32" in warnings[0] and "0.85×" in warnings[0]
    write_report(manifest, tmp_path / "report.md")
    assert "slower than FP32" in (tmp_path / "report.md").read_text()
    assert 'class="warning"' in (tmp_path / "report.html").read_text()
    t["ratios"]["speedup_vs_fp32"] = 1.3
    assert slower_than_fp32(manifest) == []


def test_settings_rows_flatten_nested_settings():
    rows = dict(settings_rows({"a": 1, "b": {"c": [1, 2], "d": {"e": True}}, "f": {}}))
    assert rows == {"a": 1, "b.c": [1, 2], "b.d.e": True, "f": {}}


def _browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium installed (apt-get install chromium)")
def test_html_report_renders_in_a_headless_browser(built, tmp_path):
    page = built.out / "report.html"
    common = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<table>" in dom.stdout and "<svg" in dom.stdout and "onnx-cpu" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, text=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a page with content, not a blank


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium installed (apt-get install chromium)")
def test_screenshot_report_writes_a_small_png_of_the_report_down_to_its_first_charts(built, tmp_path):
    """scripts/screenshot_report.py (the README's screenshot) on a finished build's output folder."""
    import sys

    from PIL import Image

    script = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_report.py"
    png = tmp_path / "shot.png"
    run = subprocess.run([sys.executable, str(script), "--out", str(built.out), "--png", str(png)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with Image.open(png) as im:
        width, height = im.size
        colours = len(im.convert("RGB").getcolors(1 << 16) or [])
    assert width == 1100 and 400 < height < 3000 and 20 < colours <= 256  # the top of the report, charts drawn
    assert png.stat().st_size < 300_000
    run = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "nothing"), "--png", str(png)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "not found (give the output folder of a finished build)" in run.stderr


@pytest.mark.slow
def test_a_build_embeds_its_metadata_in_the_onnx_artifact_and_records_the_embedded_bytes(tmp_path):
    import hashlib
    import json

    import onnx

    from edgebuild.pipeline.cli import main

    out = tmp_path / "out"
    assert main(["--target", "onnx-cpu", "--no-auto", "--out", str(out)]) == 0
    meta = json.loads((out / "onnx-cpu" / "metadata.json").read_text())
    art = out / "onnx-cpu" / meta["artifact"]
    props = {p.key: p.value for p in onnx.load(str(art)).metadata_props}
    assert any(k.startswith("edgebuild") for k in props), props
    assert meta["embedded_metadata"] and meta["files"][meta["artifact"]]["sha256"] == hashlib.sha256(art.read_bytes()).hexdigest()
