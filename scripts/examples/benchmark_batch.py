"""Measure `edgebuild batch` on this machine: N small demo builds, wall time vs the sum of the cells' times, the
cores they kept busy, and Ray's own cost per cell (a fresh worker process per task, no build in it).

    .venv/bin/python scripts/examples/benchmark_batch.py [--executor ray|local] [--cpus N] [--out DIR]

The matrix: the demo, the low-rank demo and the demo calibrated on 64 samples, each for onnx-cpu and x86 (6 cells),
built on a cold private cache. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

MATRIX = {
    "defaults": {"calib": "digits:train", "eval": "digits:test"},
    "targets": ["onnx-cpu", "x86"],
    "resources": {"num_cpus": 1},
    "models": {"demo": {}, "demo-lowrank": {"compress": [{"lowrank": {"energy": 0.95}}]},
               "demo-calib64": {"calib_samples": 64}},
}


def ray_overhead(cpus: int, tasks: int = 8) -> dict:
    """Seconds per task of a no-op Ray task in a fresh worker process (max_calls=1, as a cell runs), and the
    local cluster's start."""
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=100 << 20,
             log_to_driver=False, logging_level="ERROR")
    started = time.perf_counter() - t0

    @ray.remote(max_calls=1, num_cpus=1)
    def noop():
        return os.getpid()

    ray.get(noop.remote())  # first worker (its code shipped)
    t0 = time.perf_counter()
    pids = ray.get([noop.remote() for _ in range(tasks)])
    per_task = (time.perf_counter() - t0) / tasks * min(cpus, tasks)  # per task per slot
    ray.shutdown()
    return {"cluster_start_s": round(started, 2), "fresh_worker_task_s": round(per_task, 3),
            "distinct_workers": len(set(pids))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--executor", choices=("ray", "local"), default="ray")
    ap.add_argument("--cpus", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from edgebuild.pipeline.batch import run_batch
    from edgebuild.pipeline.timing import host_cores

    cpus = args.cpus or host_cores()
    work = Path(args.out or tempfile.mkdtemp(prefix="edgebuild-bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    matrix = work / "matrix.yaml"
    MATRIX["cache"] = str(work / "cache")  # cold
    matrix.write_text(yaml.safe_dump(MATRIX))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = run_batch(matrix, work / "out", local=args.executor == "local", num_cpus=cpus, resume=False, quiet=True)
    wall = time.perf_counter() - t0
    cells = result.summary["cells"]
    secs = [c["seconds"] for c in cells]
    inner = [c["seconds"] - c["build_seconds"] for c in cells]  # process start + imports + record, inside the worker
    starts = sorted(c["started"] for c in cells)
    report = {
        "executor": result.summary["executor"], "cpus": cpus, "cells": len(cells), "exit": result.exit_code,
        "wall_s": round(wall, 1), "sum_cell_s": round(sum(secs), 1), "longest_cell_s": round(max(secs), 1),
        "ideal_s": round(max(max(secs), sum(secs) / cpus), 1),
        "wall_over_ideal": round(wall / max(max(secs), sum(secs) / cpus), 2),
        "speedup_vs_serial": round(sum(secs) / wall, 2),
        "cores_busy": round(result.summary["cell_cpu_seconds_sum"] / wall, 2),
        "median_cell_s": round(statistics.median(secs), 1),
        "median_in_worker_overhead_s": round(statistics.median(inner), 2),
        "first_cell_started_after_s": round(starts[0] - (time.time() - wall), 1),
        "load_average_at_start": round(load0, 1),
        "per_cell": {f"{c['model']}/{c['target']}": {"s": c["seconds"], "build_s": c["build_seconds"],
                                                     "cpu_s": c["cpu_seconds"]} for c in cells},
    }
    if args.executor == "ray":
        report["ray"] = ray_overhead(cpus)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
