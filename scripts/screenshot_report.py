"""A screenshot of report.html as a person first sees it, for the README: builds the built-in demo (or takes a
finished build's output folder) and writes a PNG of the page as headless Chromium draws it, from the top down to
the end of its first row of charts (``--full``: the whole page).

    .venv/bin/python scripts/screenshot_report.py             # demo on onnx-cpu, x86, arm64 -> scripts/report-screenshot.png
    .venv/bin/python scripts/screenshot_report.py --out out --png /tmp/report.png --full

Needs Chromium (scripts/bootstrap.sh installs it as root: apt-get install chromium). Nothing is fetched: the page is
self-contained and Chromium runs with its network features off.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PNG = ROOT / "scripts" / "report-screenshot.png"
DEFAULT_TARGETS = ("onnx-cpu", "x86", "arm64")
WIDTH = 1100  # the report's column is at most 1100 px wide
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--force-device-scale-factor=1")
PROBE = """<script>
  const first = document.querySelector("div.charts");
  document.body.setAttribute("data-cut", JSON.stringify({
    cut: first ? first.getBoundingClientRect().bottom + window.scrollY : null,
    height: document.documentElement.scrollHeight}));
</script>"""


def chromium() -> str:
    found = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if found is None:
        sys.exit("screenshot_report: no Chromium found (scripts/bootstrap.sh installs it as root: apt-get install chromium)")
    return found


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180)


def build_demo(out: Path, targets: tuple[str, ...]) -> None:
    from edgebuild.pipeline.cli import main

    argv = [a for t in targets for a in ("--target", t)] + ["--out", str(out), "-q"]
    code = main(argv)
    if code not in (0, 1):  # 1: a budget failed, the report is still written
        sys.exit(f"screenshot_report: the demo build exited {code}")


def page_height(browser: str, page: Path, tmp: Path, full: bool) -> int:
    """How tall the screenshot is: the page down to its first row of charts, or all of it."""
    probe = tmp / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    run = _run(browser, tmp / "profile", f"--window-size={WIDTH},1000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-cut="([^"]*)"', run.stdout)
    if run.returncode != 0 or not found:
        sys.exit(f"screenshot_report: Chromium could not lay the page out: {run.stderr.strip()[-500:]}")
    sizes = json.loads(html.unescape(found[1]))
    return int(sizes["height"] if full or sizes["cut"] is None else sizes["cut"] + 24)


def screenshot(page: Path, png: Path, full: bool = False) -> Path:
    """``png``: report ``page`` as Chromium draws it at the report's width, in at most 256 colours (small enough
    for a README)."""
    from PIL import Image

    browser = chromium()
    with tempfile.TemporaryDirectory(prefix="edgebuild-shot-") as tmp:
        tmp = Path(tmp)
        height = min(page_height(browser, page, tmp, full), 16000)
        shot = tmp / "page.png"
        run = _run(browser, tmp / "profile", f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page.as_uri())
        if not shot.is_file():
            sys.exit(f"screenshot_report: Chromium wrote no screenshot: {run.stderr.strip()[-500:]}")
        png.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(shot) as im:
            im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="a finished build's output folder (default: build the demo now)")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="targets of the demo build")
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG, help=f"where to write the PNG (default {DEFAULT_PNG.relative_to(ROOT)})")
    ap.add_argument("--full", action="store_true", help="the whole page, not only down to its first charts")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgebuild-demo-") as tmp:
        out = args.out
        if out is None:
            out = Path(tmp) / "out"
            build_demo(out, tuple(t for t in args.targets.split(",") if t))
        page = out / "report.html"
        if not page.is_file():
            sys.exit(f"screenshot_report: {page} not found (give the output folder of a finished build)")
        png = screenshot(page, args.png, args.full)
    print(f"{png} ({png.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
