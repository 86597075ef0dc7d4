"""INT8 vs FP32 latency of a MobileNetV2 through every backend's real conversion and runtime.

    .venv/bin/python scripts/benchmark_int8.py                     # x86 (OpenVINO), onnx-cpu, arm64 when present
    .venv/bin/python scripts/benchmark_int8.py --target x86 --threads 2 --explain --json bench.json

A MobileNetV2 (1.0, 224x224, 1000 classes; torchvision's architecture, written out here) is built with
random weights whose BatchNorm statistics are re-estimated on synthetic images (smooth colour fields with
shapes and texture, ImageNet-normalized), so activations have the ranges of a trained network and INT8
calibration sees realistic-ish data. It is exported by the pipeline's own ONNX export; then, per target,
the target's backend converts it to FP32 and to INT8 with the profile's settings (the same calls a build
makes) and both artifacts are timed at batch 1 in one run, on the same threads, interleaved in rounds so
that load on the machine hits both alike. The number printed per target is p50(FP32) / p50(INT8).

``--explain`` (OpenVINO) prints time per operation type and kernel for both IRs, from the runtime's
performance counters: the kernel names show which layers really ran in int8 and where the time goes.
This is a benchmark, not a test; it downloads nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_TARGETS = ("x86", "onnx-cpu", "arm64")  # one per backend that runs natively on a CPU host
GOAL = {"openvino": 1.8}  # INT8/FP32 speedup aimed at on an AVX2 host


# ---- the model ------------------------------------------------------------------------------------------


def mobilenet_v2(num_classes: int = 1000):
    """MobileNetV2 1.0 (Sandler et al. 2018): inverted residuals, ReLU6, linear bottlenecks (3.5 M params)."""
    from torch import nn

    def conv_bn(cin, cout, k, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return layers + [nn.ReLU6(inplace=True)] if act else layers

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = conv_bn(cin, hidden, 1) if expand != 1 else []
            layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + conv_bn(hidden, cout, 1, act=False)
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            blocks, cin = [nn.Sequential(*conv_bn(3, 32, 3, 2))], 32
            for expand, cout, repeat, stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
                for i in range(repeat):
                    blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                    cin = cout
            blocks.append(nn.Sequential(*conv_bn(cin, 1280, 1)))
            self.features = nn.Sequential(*blocks)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    return MobileNetV2()


def synthetic_images(n: int, seed: int, size: int = 224) -> np.ndarray:
    """Natural-looking-ish images, ImageNet-normalized NCHW float32: smooth colour fields, a few flat
    shapes, fine texture. Random noise would give activation statistics no real input has."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((n, 3, 6, 6), dtype=np.float32))
    img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).numpy()
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.integers(12, size // 2, 2)
            y0, y1, x0, x1 = max(cy - ry, 0), min(cy + ry + 1, size), max(cx - rx, 0), min(cx + rx + 1, size)
            box = (slice(y0, y1), slice(x0, x1))
            region = img[i, :, y0:y1, x0:x1]  # a view
            mask = ((yy[box] - cy) / ry) ** 2 + ((xx[box] - cx) / rx) ** 2 <= 1 if rng.random() < 0.5 else \
                np.ones((y1 - y0, x1 - x0), bool)
            region[:, mask] = rng.random((3, 1), dtype=np.float32)  # flat coloured ellipse or rectangle
    img = np.clip(img + 0.04 * rng.standard_normal(img.shape, dtype=np.float32), 0, 1)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return ((img - mean) / std).astype(np.float32)


def build_model(seed: int):
    """Random weights, BatchNorm statistics re-estimated on synthetic images (then eval mode)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = mobilenet_v2()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over all batches
    model.train()
    with torch.no_grad():
        for b in range(6):
            model(torch.from_numpy(synthetic_images(16, seed + 1000 + b)))
    return model.eval()


# ---- measuring ----------------------------------------------------------------------------------------


def host() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    isa = [f for f in ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return {"cpu": name, "cores": os.cpu_count(), "isa": isa, "machine": platform.machine(),
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def fidelity(fp32_outputs, int8_outputs) -> dict:
    from edgebuild.similarity import cosine

    cos = [cosine(a, b) for a, b in zip(fp32_outputs, int8_outputs)]
    agree = np.mean([a.argmax() == b.argmax() for a, b in zip(fp32_outputs, int8_outputs)]) * 100
    return {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)), "top1_agreement": float(agree)}


def bench_target(profile, model, calib, evalset, workdir: Path, threads: int, rounds: int, runs: int) -> dict:
    from edgebuild.pipeline.errors import EdgeBuildError
    from edgebuild.pipeline.stages.per_target import open_runner
    from edgebuild.targets.base import get_backend

    backend = get_backend(profile.backend)
    try:
        backend.check_available(profile.name)
    except EdgeBuildError as e:
        return {"target": profile.name, "backend": profile.backend, "skipped": str(e)}
    arts, seconds = {}, {}
    for precision in ("fp32", "int8"):
        directory = workdir / profile.name / precision
        directory.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            arts[precision] = backend.convert(model, profile, precision, calib, directory, None)
        except EdgeBuildError as e:  # one backend failing does not stop the others
            return {"target": profile.name, "backend": profile.backend, "skipped": f"{precision}: {e}"}
        seconds[precision] = round(time.perf_counter() - t0, 2)
    feed = evalset.feed(0)
    samples = {"fp32": [], "int8": []}
    with open_runner(backend, arts["fp32"], threads) as r32, open_runner(backend, arts["int8"], threads) as r8:
        runners = {"fp32": r32, "int8": r8}
        outputs = {p: [r.run(f)[0] for f in evalset.feeds()] for p, r in runners.items()}
        for _ in range(rounds):  # interleaved: machine load during the run hits both alike
            for p, r in runners.items():
                samples[p] += r.time_ms(feed, 5, runs, 60.0)
    p50 = {p: float(np.percentile(s, 50)) for p, s in samples.items()}
    return {
        "target": profile.name, "backend": profile.backend, "threads": threads,
        "artifacts": {p: a.main for p, a in arts.items()}, "convert_seconds": seconds,
        "size_mb": {p: a.size_bytes / 1e6 for p, a in arts.items()},
        "p50_ms": p50, "p90_ms": {p: float(np.percentile(s, 90)) for p, s in samples.items()},
        "runs": {p: len(s) for p, s in samples.items()},
        "speedup_int8_vs_fp32": p50["fp32"] / p50["int8"],
        "fidelity_int8_vs_fp32": fidelity(outputs["fp32"], outputs["int8"]),
        "settings": arts["int8"].settings, "_artifacts": arts,
    }


def explain_openvino(result: dict, feed: dict, threads: int) -> dict:
    """Per operation type and kernel: time in the FP32 IR and in the INT8 IR (runtime performance counters)."""
    from edgebuild.targets.openvino import OpenVinoRunner

    tables = {}
    for precision, art in result["_artifacts"].items():
        with OpenVinoRunner(art.path, precision, threads, perf_count=True) as r:
            r.layer_times(feed, 10)  # warm-up
            tables[precision] = r.layer_times(feed, 30)
            tables[f"{precision}_threads_used"] = int(r.property("INFERENCE_NUM_THREADS"))
    return tables


def _print_explain(name: str, tables: dict) -> None:
    print(f"\n{name}: where the time goes (OpenVINO performance counters; µs per inference, "
          f"threads used: {tables['fp32_threads_used']})")
    for precision in ("fp32", "int8"):
        rows = tables[precision]
        total = sum(r["us"] for r in rows)
        print(f"  {precision.upper()} IR: {total:,.0f} µs in layers")
        for r in rows[:8]:
            print(f"    {r['type']:<30} {r['kernel']:<24} x{r['count']:<3} {r['us']:>8,.0f} µs  "
                  f"{100 * r['us'] / total:4.1f} %")
    by_type = {}
    for precision in ("fp32", "int8"):
        for r in tables[precision]:
            key = r["type"].replace("FullyConnectedQuantizedLegacy", "FullyConnected")
            by_type.setdefault(key, {}).setdefault(precision, 0.0)
            by_type[key][precision] += r["us"]
    print("  speedup per operation type (FP32 µs / INT8 µs):")
    for t, v in sorted(by_type.items(), key=lambda kv: -kv[1].get("fp32", 0)):
        if v.get("fp32", 0) > 20 and v.get("int8"):
            print(f"    {t:<30} {v['fp32']:>8,.0f} -> {v['int8']:>8,.0f} µs  {v['fp32'] / v['int8']:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", "-t", action="append",
                    help=f"target profile(s) (default: {', '.join(DEFAULT_TARGETS)} where present)")
    ap.add_argument("--threads", type=int, help="threads for both precisions (default: each profile's threads)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved FP32/INT8 timing rounds (default 6)")
    ap.add_argument("--runs", type=int, default=40, help="timed runs per precision per round (default 40)")
    ap.add_argument("--calib-samples", type=int, default=128, help="synthetic calibration images (default 128)")
    ap.add_argument("--explain", action="store_true", help="OpenVINO: time per operation type/kernel, FP32 vs INT8")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.spec import InputSpec
    from edgebuild.pipeline.stages.export import export_onnx
    from edgebuild.pipeline.stages.load import LoadedModel
    from edgebuild.targets.profiles import catalogue

    profiles = catalogue()
    names = [n for chunk in (args.target or []) for n in chunk.split(",") if n] or \
        [n for n in DEFAULT_TARGETS if n in profiles]
    unknown = [n for n in names if n not in profiles]
    if unknown:
        print(f"unknown target(s) {unknown}; known: {', '.join(profiles)}", file=sys.stderr)
        return 2
    info = host()
    print(f"host: {info['cpu']} · {info['cores']} cores · {' '.join(info['isa'])} · load {info['loadavg_1min']:.2f}")
    print("model: MobileNetV2 1.0, 1x3x224x224, random weights with BatchNorm statistics from synthetic images")

    t0 = time.perf_counter()
    module = build_model(args.seed)
    spec = InputSpec("input", (1, 3, 224, 224), "float32", "NCHW")
    calib = SampleSet("synthetic[calib]", {"input": synthetic_images(args.calib_samples, args.seed + 1)})
    evalset = SampleSet("synthetic[eval]", {"input": synthetic_images(32, args.seed + 2)})
    results = []
    with tempfile.TemporaryDirectory(prefix="edgebuild-bench-") as tmp:
        loaded = LoadedModel("torch", "MobileNetV2 (benchmark)", (spec,), module=module)
        model, record = export_onnx(loaded, evalset, Path(tmp))
        print(f"exported FP32 ONNX in {time.perf_counter() - t0:.1f} s ({record['exporter']}; "
              f"fidelity vs torch: cosine {record['fidelity_vs_torch']['min_cosine']:.6f})")
        for name in names:
            profile = profiles[name]
            threads = args.threads or profile.threads
            print(f"\n{name} ({profile.backend}): converting FP32 and INT8, timing {args.rounds}x{args.runs} runs each "
                  f"at {threads} threads ...", flush=True)
            r = bench_target(profile, model, calib, evalset, Path(tmp), threads, args.rounds, args.runs)
            results.append(r)
            _print_target(r)
            if args.explain and profile.backend == "openvino" and "skipped" not in r:
                r["explain"] = explain_openvino(r, evalset.feed(0), threads)
                _print_explain(name, r["explain"])
    info["loadavg_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    _print_summary(results)
    if args.json:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        args.json.write_text(json.dumps({"host": info, "results": clean}, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0


def _print_target(r: dict) -> None:
    if "skipped" in r:
        print(f"  skipped: {r['skipped']}")
        return
    print(f"  FP32 {r['artifacts']['fp32']}: p50 {r['p50_ms']['fp32']:.2f} ms  ({r['size_mb']['fp32']:.2f} MB)")
    print(f"  INT8 {r['artifacts']['int8']}: p50 {r['p50_ms']['int8']:.2f} ms  ({r['size_mb']['int8']:.2f} MB, "
          f"converted in {r['convert_seconds']['int8']} s; "
          f"cosine to FP32 {r['fidelity_int8_vs_fp32']['cosine_mean']:.4f})")


def _print_summary(results: list[dict]) -> None:
    print("\nINT8/FP32 speedup at batch 1 (p50, same run, same threads):")
    for r in results:
        if "skipped" in r:
            print(f"  {r['target']:<12} {r['backend']:<10} skipped")
            continue
        goal = GOAL.get(r["backend"])
        verdict = "" if goal is None else (f"  (goal {goal}x: met)" if r["speedup_int8_vs_fp32"] >= goal else
                                           f"  (goal {goal}x: NOT met on this host; see --explain)")
        print(f"  {r['target']:<12} {r['backend']:<10} {r['threads']} threads  "
              f"{r['p50_ms']['fp32']:7.2f} ms -> {r['p50_ms']['int8']:7.2f} ms  "
              f"= {r['speedup_int8_vs_fp32']:.2f}x{verdict}")


if __name__ == "__main__":  # the isolated runners use spawned processes: keep the entry point guarded
    sys.exit(main())
