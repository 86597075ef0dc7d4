"""Memory against wall time: a cold three-target ResNet-50 build with and without ``--max-memory-gb``.

    .venv/bin/python scripts/benchmark_memory.py                         # ResNet-50, onnx-cpu,x86,arm64, --jobs 2
    .venv/bin/python scripts/benchmark_memory.py --limit-gb 1.2 --json mem.json
    .venv/bin/python scripts/benchmark_memory.py --models mobilenet_v2 --targets onnx-cpu,x86

ResNet-50 is torchvision's architecture written out in ``scripts/benchmark_build.py`` (random weights, BatchNorm
statistics re-estimated on synthetic images; nothing downloaded). Every build is a cold ``edgebuild`` command
(``--no-auto``, a fresh stage cache) in a process of its own:

1. ``no limit``: the default limit (the available memory less 1 GB). The first build of the model: scheduled by
   the model-size estimate; it measures each target's peak (its child processes) and records it in its cache.
2. ``limit, measured``: ``--max-memory-gb L`` with a fresh cache that holds only the peak records of build 1 (every
   conversion runs again): scheduled by the measured peaks.
3. ``limit, first build`` (``--also-unmeasured``): the same limit, empty cache: scheduled by the estimate.

L is ``--limit-gb``, else the largest peak build 1 measured for one target plus 10 % (rounded up to 0.1 GB): every
target fits alone, two fit side by side only when their peaks add up to less. Per build: wall and CPU time, the peak of the process tree's summed
resident memory (the build's own process and its children), of the children alone (what the limit bounds), and
per target what it was scheduled by and what it measured (from ``build.log``). The machine may be shared: the
load is printed; the cost of the limit in wall time is the ratio of builds 2 and 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchmark_build import make_data, make_model, run_build  # noqa: E402

LINE = re.compile(r"edgebuild\.schedule: (?P<target>\S+): scheduled by (?P<scheduled>\d+) MB \((?P<source>[^)]+)\); "
                  r"(?:its children's peak (?P<measured>\d+) MB measured|no child measured)")


def schedule_lines(out: Path) -> dict:
    """Per target: {scheduled_mb, source, measured_mb} from the build's log."""
    found = {}
    for line in (out / "build.log").read_text(errors="replace").splitlines():
        m = LINE.search(line)
        if m:
            found[m["target"]] = {"scheduled_mb": int(m["scheduled"]), "source": m["source"],
                                  "measured_mb": int(m["measured"]) if m["measured"] else None}
    return found


def peak_entries(cache: Path, into: Path) -> int:
    """Copy the cache's measured-peak records (and nothing else) into a new cache; how many."""
    into.mkdir(parents=True, exist_ok=True)
    n = 0
    for entry in cache.iterdir() if cache.is_dir() else ():
        result = entry / "result.json"
        try:
            payload = json.loads(result.read_text())["payload"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(payload, dict) and "peak_bytes" in payload:
            shutil.copytree(entry, into / entry.name)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50", help="resnet50 or mobilenet_v2 (default resnet50)")
    ap.add_argument("--targets", default="onnx-cpu,x86,arm64")
    ap.add_argument("--jobs", default="2")
    ap.add_argument("--limit-gb", type=float, default=None, help="the limit (default: from build 1's measured peaks)")
    ap.add_argument("--also-unmeasured", action="store_true", help="also build 3: the limit, scheduled by the estimate")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgebuild-mem-") as tmp:
        work = Path(tmp)
        calib, evals = make_data(work, 300, 200)
        model = make_model(args.models, work)

        def build(name: str, limit: str, cache: Path) -> dict:
            out = work / f"out-{len(rows)}"
            spec = {"model": str(model), "calib": str(calib), "eval": str(evals), "targets": args.targets.split(","),
                    "out": str(out), "auto": False}
            print(f"{name}: --max-memory-gb {limit} ...", file=sys.stderr, flush=True)
            r = run_build(spec, args.jobs, work, cache, via="cli", limit=limit)
            row = {"build": name, "limit_gb": limit, **{k: r[k] for k in ("wall_s", "cpu_s", "peak_tree_mb",
                                                                           "peak_children_mb", "loadavg_before")},
                   "targets": schedule_lines(out),
                   "verdicts": {t: v["verdict"] for t, v in r["targets"].items()}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            return row

        first = build("no limit", "default", work / "cache-1")
        measured = [t["measured_mb"] for t in first["targets"].values() if t["measured_mb"]]
        limit = args.limit_gb or math.ceil(max(measured) * 1.1 / 1024 * 10) / 10
        seeded = work / "cache-2"
        print(f"{peak_entries(work / 'cache-1', seeded)} measured peak(s) carried to build 2", file=sys.stderr)
        build("limit, measured", f"{limit:g}", seeded)
        if args.also_unmeasured:
            build("limit, first build", f"{limit:g}", work / "cache-3")
    print(f"\n{args.models} {args.targets} --jobs {args.jobs}, cold builds (--no-auto), {os.cpu_count()} cores\n")
    print("| build | --max-memory-gb | wall s | CPU s | load | peak tree MB | peak children MB | per target: "
          "scheduled by MB (source) / measured MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per = "; ".join(f"{t} {v['scheduled_mb']} ({v['source']}) / {v['measured_mb']}" for t, v in r["targets"].items())
        print(f"| {r['build']} | {r['limit_gb']} | {r['wall_s']} | {r['cpu_s']} | {r['loadavg_before']} | "
              f"{r['peak_tree_mb']} | {r['peak_children_mb']} | {per} |")
    if len(rows) > 1:
        print(f"\nwall with the limit / without: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}; children's peak "
              f"{rows[1]['peak_children_mb']} MB under a limit of {float(rows[1]['limit_gb']) * 1024:.0f} MB "
              f"(without: {rows[0]['peak_children_mb']} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
