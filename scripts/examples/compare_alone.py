"""Build every cell of a finished batch again alone — the ordinary CLI on the cell's manifest, no cache, the cell's
thread count — and compare: artifact files byte for byte, verdict, precision, and the manifest but for what was
measured (``outputs_sha256``, pipeline/batch/cell.py). One build at a time.

    .venv/bin/python scripts/examples/compare_alone.py BATCH_OUT [--work DIR]

Prints one JSON object: per cell whether it is identical, and if not, which paths of the manifest differ.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def _status(verdict) -> str:
    return verdict.get("status") if isinstance(verdict, dict) else verdict


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("batch_out")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    from edgebuild.pipeline.batch.cell import THREAD_ENV, outputs_digest, reproducible

    out = Path(args.batch_out)
    work = Path(args.work or tempfile.mkdtemp(prefix="edgebuild-alone-"))
    doc = json.loads((out / "batch.json").read_text())
    edgebuild = Path(sys.executable).parent / "edgebuild"
    rows = []
    for c in doc["cells"]:
        if c["verdict"] not in ("pass", "fail"):
            continue
        name = f"{c['model']}/{c['target']}"
        threads = str(c.get("threads") or 1)
        env = {**os.environ, **{k: threads for k in THREAD_ENV}, "TF_NUM_INTEROP_THREADS": "1"}
        alone = work / c["model"] / c["target"]
        t0 = time.perf_counter()
        r = subprocess.run([str(edgebuild), "-c", str(out / name / "manifest.json"), "-o", str(alone), "--no-cache",
                            "-q"], env=env, capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 1)
        if not (alone / "manifest.json").is_file():
            rows.append({"cell": name, "identical": False, "error": r.stderr.strip().splitlines()[-1:]})
            continue
        mine = json.loads((out / name / "manifest.json").read_text())
        theirs = json.loads((alone / "manifest.json").read_text())
        files = mine["targets"][c["target"]].get("files") or {}
        same_bytes = all((out / name / c["target"] / f).read_bytes() == (alone / c["target"] / f).read_bytes()
                         for f in files if (alone / c["target"] / f).is_file())
        same = outputs_digest(theirs) == c.get("outputs_sha256") and same_bytes
        rows.append({"cell": name, "identical": same, "artifact_bytes_equal": same_bytes, "alone_s": seconds,
                     "verdict": [c["verdict"], _status(theirs["targets"][c["target"]]["verdict"])],
                     "precision": [c["precision"], theirs["targets"][c["target"]]["precision"]],
                     "differs": _diff(reproducible(mine), reproducible(theirs))[:12]})
    print(json.dumps({"cells": len(rows), "identical": sum(r["identical"] for r in rows), "rows": rows}, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
