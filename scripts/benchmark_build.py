"""Whole-build speed: cold and warm three-target builds of a MobileNetV2 and/or a ResNet-50.

    .venv/bin/python scripts/benchmark_build.py                       # MobileNetV2, onnx-cpu,x86,arm64, cold + warm
    .venv/bin/python scripts/benchmark_build.py --repeat 3 --resnet50 --json bench.json
    .venv/bin/python scripts/benchmark_build.py --models resnet50 --auto --cold-only   # issue 15: <= 10 min, search included
    .venv/bin/python scripts/benchmark_build.py --models demo --via api,cli --repeat 3    # issue 26: the CLI's tail

The models are built here (no downloads): MobileNetV2 exactly as ``scripts/benchmark_int8.py`` builds it, ResNet-50
with torchvision's architecture written out here (no torchvision needed); random weights, BatchNorm statistics
re-estimated on synthetic images. Calibration (300) and evaluation (200) samples are synthetic images saved as
``.npz``; the build's ``calib_samples`` is left to edgebuild (``--calib-samples N`` sets it), and the manifest's
choice (``data.calibration_samples``) is kept in ``--json``.
Each build runs ``edgebuild``'s own ``build()`` in a child process with a private stage cache: the cold build
starts from an empty cache, the warm one re-runs the same build on the cache the cold one left. Per build the table
gives wall time, CPU time and utilisation (CPU / wall, in cores), peak RSS (the largest process: the build or
one of its children), the peak of the process tree's summed RSS (what the machine holds at once; ``--max-memory-gb``
bounds it through the scheduler's estimates), the time per stage kind (summed over targets, so parallel stages add up past the wall
time) and each target's INT8/FP32 speed-up with its spread (median and IQR of the per-round ratios).
``--via api,cli`` runs every build both ways: through ``build()`` as above, and through the ``edgebuild``
command (its log capture, progress and summary included; no per-stage times), side by side on the same cache state,
so the table shows what the command line adds to a build. ``demo`` is the built-in DigitsCNN on scikit-learn digits
(no model file, no data files: edgebuild's own demo build).
This is a benchmark, not a test; on a shared machine the numbers move with the load (printed as loadavg).
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

import numpy as np

HERE = Path(__file__).resolve().parent
STAGE_KINDS = (  # (kind, words in the stage text), first match wins
    ("load+data", ("loading the model", "reading calibration")),
    ("export", ("exporting",)),
    ("reference", ("FP32 reference",)),
    ("search", ("accuracy search", "sensitivity", "search")),
    ("convert", ("converting",)),
    ("validate", ("validating",)),
    ("fp32 baseline", ("FP32 baseline",)),
    ("timing", ("timing",)),
)

CHILD = r"""
import json, sys, time
from contextlib import contextmanager
from edgebuild.pipeline.build import build
from edgebuild.pipeline.spec import BuildSpec

stages = []
@contextmanager
def stage(text):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages.append([text, time.perf_counter() - t0])

spec = BuildSpec.from_dict(json.loads(sys.argv[1]))
jobs = int(sys.argv[3]) if sys.argv[3] != "default" else None
limit = float(sys.argv[4]) if sys.argv[4] != "default" else None
t0 = time.perf_counter()
m = build(spec, stage=stage, jobs=jobs, max_memory_gb=limit).manifest
Path = __import__("pathlib").Path
Path(sys.argv[2]).write_text(json.dumps({"wall_in_process": time.perf_counter() - t0, "stages": stages,
                                         "manifest": m}, default=str))
"""


def resnet50():
    """ResNet-50 (torchvision's architecture: bottleneck blocks 3-4-6-3, 25.6 M parameters), written here so
    the benchmark needs no torchvision and downloads nothing."""
    from torch import nn

    def conv_bn(cin, cout, k, stride=1, relu=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            self.body = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
                                      conv_bn(width, width * 4, 1, relu=False))
            self.skip = conv_bn(cin, width * 4, 1, stride, relu=False) if stride != 1 or cin != width * 4 else nn.Identity()

        def forward(self, x):
            return (self.body(x) + self.skip(x)).relu()

    layers, cin = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))


def make_model(kind: str, workdir: Path) -> Path:
    """Random weights, BatchNorm statistics re-estimated on synthetic images (then eval mode)."""
    import torch

    sys.path.insert(0, str(HERE))
    from benchmark_int8 import build_model, synthetic_images

    if kind == "mobilenet_v2":
        model = build_model(0)
    else:
        from torch import nn

        torch.manual_seed(0)
        model = resnet50()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.train()
        with torch.no_grad():
            for b in range(4):
                model(torch.from_numpy(synthetic_images(8, 2000 + b)))
        model.eval()
    path = workdir / f"{kind}.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    return path


def make_data(workdir: Path, calib: int, evals: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(HERE))
    from benchmark_int8 import synthetic_images

    c, e = workdir / "calib.npz", workdir / "eval.npz"
    np.savez(c, input=synthetic_images(calib, 1))
    np.savez(e, input=synthetic_images(evals, 2))
    return c, e


def cli_args(spec: dict, jobs: str) -> list[str]:
    """The ``edgebuild`` flags of the same build."""
    args = ["--out", spec["out"], "--quiet"]
    for key in ("model", "calib", "eval"):
        if spec.get(key):
            args += [f"--{key}", spec[key]]
    args += ["--target", ",".join(spec["targets"])]
    if not spec.get("auto", True):
        args.append("--no-auto")
    if spec.get("calib_samples"):
        args += ["--calib-samples", str(spec["calib_samples"])]
    if jobs != "default":
        args += ["--jobs", jobs]
    return args


class TreeMemory:
    """The peak of the summed resident memory of a process and all its descendants (sampled every 0.1 s): what the
    machine must hold at once, where ru_maxrss gives only the largest single process. ``children_peak``: the same
    without the build's own process (what ``--max-memory-gb`` bounds: the conversions' and runtimes' children)."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak, self.children_peak, self.stop = pid, 0, 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while not self.stop.wait(0.1):
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            total = own = 0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                own = rss if proc.pid == self.pid else own
            self.peak = max(self.peak, total)
            self.children_peak = max(self.children_peak, total - own)

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return round(self.peak / 2**20, 1)


def run_build(spec: dict, jobs: str, workdir: Path, cache: Path, via: str = "api", limit: str = "default") -> dict:
    result = workdir / f"result-{time.monotonic_ns()}.json"
    env = {**os.environ, "EDGEBUILD_CACHE": str(cache), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if via == "api":
        cmd = [sys.executable, "-c", CHILD, json.dumps(spec), str(result), jobs, limit]
    else:  # the command line a user types (exit 1, a budget failed, still is a finished build)
        cmd = [sys.executable, "-c", "from edgebuild.pipeline.cli import main; raise SystemExit(main())",
               *cli_args(spec, jobs), *(["--max-memory-gb", limit] if limit != "default" else [])]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=workdir)
    tree = TreeMemory(proc.pid)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # usage: this build and every child it waited for
    wall = time.perf_counter() - t0
    tree_peak = tree.done()
    children_peak = round(tree.children_peak / 2**20, 1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if via == "cli" and proc.returncode in (0, 1):
        result.write_text(json.dumps({"stages": [], "manifest": json.loads((Path(spec["out"]) / "manifest.json").read_text())}))
    if proc.returncode not in ((0, 1) if via == "cli" else (0,)) or not result.is_file():
        raise SystemExit(f"build failed (exit {proc.returncode}):\n{err.decode()[-3000:]}")
    r = json.loads(result.read_text())
    kinds: dict[str, float] = {}
    for text, seconds in r["stages"]:
        kind = next((k for k, words in STAGE_KINDS if any(w in text for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    cpu = usage.ru_utime + usage.ru_stime
    targets = {}
    for name, t in r["manifest"]["targets"].items():
        spread = (t.get("ratios") or {}).get("speedup_vs_fp32_spread") or {}
        targets[name] = {"verdict": t["verdict"], "seconds": t.get("seconds"), "cache": t.get("cache"),
                         "speedup_median": spread.get("median"), "speedup_iqr": spread.get("iqr"),
                         "speedup_p25": spread.get("p25"), "speedup_p75": spread.get("p75"),
                         "threads": t.get("threads")}
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cores_used": round(cpu / wall, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_tree_mb": tree_peak, "peak_children_mb": children_peak, "loadavg_before": round(load, 2),
            "stages_s": {k: round(v, 2) for k, v in kinds.items()}, "targets": targets,
            "stages": [[text, round(seconds, 2)] for text, seconds in r["stages"]],
            "calibration": (r["manifest"].get("data") or {}).get("calibration_samples")}


def print_table(rows: list[dict]) -> None:
    kinds = [k for k, _ in STAGE_KINDS] + ["other"]
    head = ["model", "via", "run", "wall s", "cpu s", "cores", "peak RSS MB", "peak tree MB", "load"] + kinds
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["model"], r.get("via", "api"), r["run"], r["wall_s"], r["cpu_s"], r["cores_used"], r["peak_rss_mb"],
                 r.get("peak_tree_mb", ""), r["loadavg_before"]]
        cells += [r["stages_s"].get(k, "") for k in kinds]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print("\n| model | run | target | verdict | target s | INT8/FP32 speed-up (median [p25, p75], IQR) | threads profile/used | from cache |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, t in r["targets"].items():
            sp = (f"{t['speedup_median']:.2f}x [{t['speedup_p25']:.2f}, {t['speedup_p75']:.2f}], {t['speedup_iqr']:.2f}"
                  if t["speedup_median"] else "-")
            th = f"{t['threads']['profile']}/{t['threads']['used']}" if t.get("threads") else "-"
            hits = ",".join(k for k, v in (t.get("cache") or {}).items() if v is True) or "none"
            print(f"| {r['model']} {r.get('via', 'api')} | {r['run']} | {name} | {t['verdict']} | {t['seconds']} | {sp} | {th} | {hits} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="onnx-cpu,x86,arm64")
    ap.add_argument("--repeat", type=int, default=1, help="cold+warm pairs per model (default 1; quote medians of >= 3)")
    ap.add_argument("--jobs", default="default", help="--jobs for the builds (default: edgebuild's default)")
    ap.add_argument("--auto", action="store_true", help="with the accuracy search (default: --no-auto, as in issue 11)")
    ap.add_argument("--models", default="mobilenet_v2",
                    help="comma-separated: mobilenet_v2, resnet50, demo (default mobilenet_v2)")
    ap.add_argument("--via", default="api", help="comma-separated: api (build() in a child), cli (the edgebuild "
                                                 "command); both: side by side on the same cache states")
    ap.add_argument("--resnet50", action="store_true", help="also ResNet-50 (defined here; same targets)")
    ap.add_argument("--cold-only", action="store_true", help="cold builds only (no warm re-run)")
    ap.add_argument("--calib-data", type=int, default=300, help="calibration samples in the data file (default 300)")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="calib_samples of the build (default: not given, edgebuild's automatic budget)")
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--max-memory-gb", default="default",
                    help="--max-memory-gb for the builds (default: edgebuild's default, available memory less 1 GB)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgebuild-bench-") as tmp:
        work = Path(tmp)
        calib, evals = make_data(work, args.calib_data, args.eval_samples)
        names = list(dict.fromkeys(args.models.split(",") + (["resnet50"] if args.resnet50 else [])))
        models = [(name, args.targets) for name in names]
        vias = args.via.split(",")
        for kind, targets in models:
            data = {} if kind == "demo" else {"model": str(make_model(kind, work)), "calib": str(calib),
                                              "eval": str(evals)}
            for i in range(args.repeat):
                for via in vias:  # alternating, so the load of the shared machine falls on both alike
                    cache = work / f"cache-{kind}-{via}-{i}"
                    spec = {**data, "targets": targets.split(","), "out": str(work / f"out-{kind}-{via}-{i}"),
                            "auto": args.auto}
                    if args.calib_samples:
                        spec["calib_samples"] = args.calib_samples
                    for run in ("cold",) if args.cold_only else ("cold", "warm"):
                        print(f"{kind} {via} {run} #{i + 1}: {targets} ...", file=sys.stderr, flush=True)
                        rows.append({"model": kind, "via": via, "run": f"{run} #{i + 1}",
                                     **run_build(spec, args.jobs, work, cache, via, args.max_memory_gb)})
    if args.repeat > 1:  # medians of the repeats, per model, way and kind of run
        for kind, via in dict.fromkeys((r["model"], r["via"]) for r in rows):
            for run in ("cold", "warm"):
                same = [r for r in rows if r["model"] == kind and r["via"] == via and r["run"].startswith(run)]
                if not same:
                    continue
                med = lambda key: round(float(np.median([r[key] for r in same])), 2)  # noqa: E731
                stages = {k: round(float(np.median([r["stages_s"].get(k, 0.0) for r in same])), 2)
                          for k in dict.fromkeys(k for r in same for k in r["stages_s"])}
                rows.append({"model": kind, "via": via, "run": f"{run} median", "wall_s": med("wall_s"), "cpu_s": med("cpu_s"),
                             "cores_used": med("cores_used"), "peak_rss_mb": med("peak_rss_mb"),
                             "peak_tree_mb": med("peak_tree_mb"),
                             "loadavg_before": med("loadavg_before"), "stages_s": stages, "targets": {}})
    print_table(rows)
    print(f"\nhost: {os.cpu_count()} cores; the machine may be shared (see load): numbers move with it")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
