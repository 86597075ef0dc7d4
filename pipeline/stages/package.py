"""Stage: package one target — its metadata inside the artifact, then ``metadata.json`` and ``validation.json``.

The artifact's sha256 is taken after the metadata is embedded, so ``edgebuild validate`` checks the shipped bytes.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from edgebuild.pipeline.results import (
    Baseline,
    CacheUse,
    FileRecord,
    Gate,
    Memory,
    ObjectiveDecision,
    Ratios,
    SearchRecord,
    TargetResult,
    Threads,
    WeightShare,
    decide,
)
from edgebuild.pipeline.stages import validate as V
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.pipeline.stages.candidate import Attempt, file_sha, timing_threads
from edgebuild.targets.base import Artifact, Backend
from edgebuild.targets.profiles import TargetProfile


def _embed(ctx: BuildContext, profile: TargetProfile, art: Artifact, outdir: Path) -> dict:
    """edgebuild's metadata written into the artifact files that can carry it (pipeline/stages/embed.py)."""
    from edgebuild.pipeline.stages.embed import embed_target

    try:
        return embed_target(ctx, profile, art, outdir)
    except Exception as e:  # noqa: BLE001 — the artifact is valid without it; the note says why it is missing
        art.notes.append(f"metadata not embedded in the artifact ({type(e).__name__}: {str(e)[:160]})")
        return {}


def describe(ctx: BuildContext, profile: TargetProfile, backend: Backend, chosen: Attempt, baseline: Attempt | None,
             budget: V.Budget, outdir: Path, search: SearchRecord | None = None, speedup: dict | None = None,
             cache_use: CacheUse | None = None, objective: ObjectiveDecision | None = None,
             quantized: WeightShare | None = None) -> TargetResult:
    art = chosen.artifact
    embedded = _embed(ctx, profile, art, outdir)  # metadata inside the artifact, before its sha256 is taken
    from edgebuild.pipeline.memory import after_packaging

    after_packaging(chosen)  # a microcontroller's flash holds the shipped bytes, metadata included
    files = {f: {"bytes": (outdir / f).stat().st_size, "sha256": file_sha(outdir / f)} for f in art.files}
    metadata = {
        "embedded_metadata": embedded,
        "target": profile.name, "backend": backend.name, "precision": art.precision, "artifact": art.main,
        "files": files, "io": art.io, "settings": art.settings, "notes": art.notes,
        "runtime": {"host": profile.host_runtime, "device": profile.device_runtime, "threads": profile.threads,
                    "threads_host": timing_threads(profile)},
        "host_validation": profile.host_validation, "devices": list(profile.devices),
        "source_model_sha256": ctx.job.model.content_hash, "reference": "../reference/model_fp32.onnx",
        "source_inputs": [asdict(i) for i in ctx.job.model.inputs],
        "budgets": budget.to_dict(), "preprocess": asdict(ctx.job.spec.preprocess),
        "judging": {"task": ctx.job.judging.task, "task_options": ctx.job.judging.options,
                    "labels_output": ctx.job.judging.labels_output, "evaluator": ctx.job.judging.evaluator,
                    "outputs": list(ctx.job.judging.output_names)},
    }
    (outdir / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
    result = TargetResult(
        decide(chosen.failures), backend=backend.name, precision=art.precision, artifact=art.main,
        files={n: FileRecord.from_dict(f) for n, f in files.items()}, settings=art.settings, metrics=chosen.metrics,
        latency=chosen.latency, size_bytes=art.size_bytes, memory=Memory.from_dict(chosen.memory), notes=art.notes,
        budgets=budget, host_validation=profile.host_validation, threads=Threads(profile.threads, timing_threads(profile)),
        cache=cache_use, search=search, objective=objective, evaluation=chosen.data,
        gate=Gate.from_dict(V.gate(chosen.metrics, budget, ctx.job.judging.task)), quantized=quantized,
        **(_versus_baseline(chosen, baseline, speedup) if baseline is not None else {}))
    (outdir / "validation.json").write_text(json.dumps(result.to_validation(), indent=2, default=str))
    return result


def _versus_baseline(chosen: Attempt, baseline: Attempt, speedup: dict | None) -> dict:
    """The FP32 baseline's record and the artifact's size and speed relative to it."""
    art, b = chosen.artifact, baseline.artifact
    return {"baseline_fp32": Baseline(b.main, b.size_bytes, baseline.latency, baseline.metrics, baseline.label,
                                      Memory.from_dict(baseline.memory)),
            "ratios": Ratios(
                art.size_bytes / b.size_bytes,
                # median of the per-round ratios of the interleaved timing; its spread below
                speedup["median"] if speedup else baseline.latency.p50_ms / chosen.latency.p50_ms, speedup)}
