"""Stage: build one target profile — convert (cached), validate against the FP32 reference, judge budgets."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from edgebuild.calibration.dataset import CalibrationSet
from edgebuild.pipeline import validate as V
from edgebuild.pipeline.cache import StageCache, code_hash, key
from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.pipeline.export import file_hash
from edgebuild.pipeline.spec import BuildSpec
from edgebuild.pipeline.versions import tool_versions
from edgebuild.targets.base import Artifact, Backend, ModelInput, Runner, get_backend
from edgebuild.targets.profiles import TargetProfile


@dataclass
class BuildContext:
    spec: BuildSpec
    model: ModelInput
    calib: CalibrationSet
    evalset: CalibrationSet
    reference: list  # FP32 reference outputs on the evaluation set
    judging: V.Judging  # what the outputs mean (resolved against the reference)
    cache: StageCache
    scratch: Path  # throw-away work (baselines, candidates)
    shared: dict = field(default_factory=dict)  # per-build results reused across targets (layer sensitivity)
    stage: Callable[[str], object] = field(default=lambda text: _null())  # progress: `with ctx.stage("..."):`
    deadline: float = float("inf")  # time.monotonic() past which no accuracy search starts a try (build_max_seconds)


@dataclass
class Attempt:
    """One conversion with its validation."""

    artifact: Artifact
    metrics: dict
    latency: dict
    failures: list[V.Check]
    label: str = "profile settings"
    data: dict = field(default_factory=dict)  # the evaluation data these numbers were measured on
    loss: float = 0.0  # V.quality_loss: lower is better, <= 0 within every quality budget

    @property
    def quality_ok(self) -> bool:
        return not V.quality_failed(self.failures)

    def summary(self) -> dict:
        name, value = V.headline(self.metrics)
        return {"label": self.label, "precision": self.artifact.precision, "settings": self.artifact.settings, name: value,
                "quality_loss": round(self.loss, 4), "size_bytes": self.artifact.size_bytes,
                "latency_p50_ms": self.latency.get("p50_ms"), "failures": [str(f) for f in self.failures]}


@contextmanager
def _null() -> Iterator[None]:
    yield


def precision_for(profile: TargetProfile, spec: BuildSpec) -> str:
    precision = spec.precision or profile.precision
    if precision not in profile.precisions:
        raise BadInputError(f"target {profile.name} does not run {precision} (it runs {', '.join(profile.precisions)})")
    return precision


def budget_for(profile: TargetProfile, spec: BuildSpec) -> V.Budget:
    b, o = profile.budgets, spec.budgets
    pick = lambda name: getattr(o, name) if getattr(o, name) is not None else getattr(b, name)  # noqa: E731
    metrics = dict(o.metrics)
    min_cosine = metrics.pop("cosine_min", b.min_cosine)  # `cosine_min: 0.995` raises every output's floor
    return V.Budget(pick("max_accuracy_drop"), pick("max_latency_ms"), pick("max_size_mb"), min_cosine,
                    tuple(sorted(metrics.items())))


def open_runner(backend: Backend, artifact: Artifact, threads: int) -> Runner:
    if backend.isolate_runner:
        from edgebuild.targets.isolated import IsolatedRunner

        return IsolatedRunner(backend.name, artifact, threads)
    return backend.runner(artifact, threads)


def convert(ctx: BuildContext, backend: Backend, profile: TargetProfile, precision: str, directory: Path,
            settings: dict | None = None) -> Artifact:
    settings = {**backend.default_settings(profile, precision), **(settings or {})}
    versions = {k: v for k, v in tool_versions().items() if v}
    # what a conversion depends on; two profiles that differ only in budgets/threads share artifacts
    k = key(stage="convert", backend=backend.name, io=(profile.io_dtype, profile.layout), quant=profile.quant,
            precision=precision, settings=settings, model=ctx.model.content_hash, code=code_hash(),
            inputs=[asdict(i) for i in ctx.model.inputs],
            calib=ctx.calib.content_hash() if precision == "int8" else None, versions=versions)
    directory.mkdir(parents=True, exist_ok=True)
    cached = ctx.cache.get(k, directory)
    if cached is not None:
        cached.target = profile.name
        return cached
    art = backend.convert(ctx.model, profile, precision, ctx.calib, directory, settings)
    ctx.cache.put(k, art)
    return art


def evaluate(ctx: BuildContext, backend: Backend, profile: TargetProfile, art: Artifact, budget: V.Budget,
             timed: bool = True, data: tuple[CalibrationSet, list] | None = None) -> Attempt:
    """Validate ``art`` on the evaluation set (or on ``data`` = (a subset, its reference outputs))."""
    evalset, reference = data or (ctx.evalset, ctx.reference)
    with open_runner(backend, art, profile.threads) as runner:
        outputs = V.collect(runner, evalset)
        lat = V.latency(runner, evalset) if timed else {}
    try:
        metrics = V.compare(reference, outputs, evalset.labels, ctx.judging)
    except ValueError as e:
        raise ConversionError(f"{profile.name}: {art.main} gives outputs unlike the source model ({e})") from e
    failures = V.judge(metrics, art.size_bytes, lat or None, budget, ctx.judging.task)
    loss = V.quality_loss(metrics, budget, ctx.judging.task)
    return Attempt(art, metrics, lat, failures, data=evalset.describe(), loss=loss)


def build_target(ctx: BuildContext, profile: TargetProfile, outdir: Path) -> dict:
    """Build, validate and describe one target; raises ConversionError when it cannot be built."""
    backend = get_backend(profile.backend)
    backend.check_available(profile.name)
    precision = precision_for(profile, ctx.spec)
    budget = budget_for(profile, ctx.spec)
    searching = precision == "int8" and ctx.spec.auto
    chosen, failed = None, None
    try:
        with ctx.stage(f"{profile.name}: converting to {precision}"):
            art = convert(ctx, backend, profile, precision, outdir)
        with ctx.stage(f"{profile.name}: validating {art.main}"):
            chosen = evaluate(ctx, backend, profile, art, budget)
    except ConversionError as e:  # with the search on, a failed INT8 conversion is where the search starts
        if not searching:
            raise
        failed = e
    search = None
    if searching:
        from edgebuild.pipeline.recover import recover

        chosen, search = recover(ctx, backend, profile, budget, chosen, outdir, first_error=failed)
    baseline = None
    if precision != "fp32":
        with ctx.stage(f"{profile.name}: FP32 baseline for size and speed ratios"):
            base_art = convert(ctx, backend, profile, "fp32", ctx.scratch / profile.name / "fp32")
            baseline = evaluate(ctx, backend, profile, base_art, budget)
    return describe(ctx, profile, backend, chosen, baseline, budget, outdir, search)


def describe(ctx: BuildContext, profile: TargetProfile, backend: Backend, chosen: Attempt, baseline: Attempt | None,
             budget: V.Budget, outdir: Path, search: dict | None = None) -> dict:
    art = chosen.artifact
    files = {f: {"bytes": (outdir / f).stat().st_size, "sha256": file_hash(outdir / f)} for f in art.files}
    metadata = {
        "target": profile.name, "backend": backend.name, "precision": art.precision, "artifact": art.main,
        "files": files, "io": art.io, "settings": art.settings, "notes": art.notes,
        "runtime": {"host": profile.host_runtime, "device": profile.device_runtime, "threads": profile.threads},
        "host_validation": profile.host_validation, "devices": list(profile.devices),
        "source_model_sha256": ctx.model.content_hash, "reference": "../reference/model_fp32.onnx",
        "source_inputs": [asdict(i) for i in ctx.model.inputs],
        "budgets": budget.to_dict(), "preprocess": asdict(ctx.spec.preprocess),
        "judging": {"task": ctx.judging.task, "task_options": ctx.judging.options,
                    "labels_output": ctx.judging.labels_output, "evaluator": ctx.judging.evaluator,
                    "outputs": list(ctx.judging.output_names)},
    }
    failures = [str(f) for f in chosen.failures]
    validation = {
        "verdict": "fail" if chosen.failures else "pass", "failures": failures,
        "failed_checks": [f.to_dict() for f in chosen.failures],
        "metrics": chosen.metrics, "latency": chosen.latency, "size_bytes": art.size_bytes,
        "budgets": budget.to_dict(), "threads": profile.threads, "evaluation": chosen.data,
    }
    if baseline is not None:
        b = baseline.artifact
        validation["baseline_fp32"] = {"artifact": b.main, "size_bytes": b.size_bytes, "latency": baseline.latency,
                                       "metrics": baseline.metrics}
        validation["ratios"] = {
            "size_vs_fp32": art.size_bytes / b.size_bytes,
            "speedup_vs_fp32": baseline.latency["p50_ms"] / chosen.latency["p50_ms"],
        }
    if search is not None:
        validation["search"] = search
    (outdir / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
    (outdir / "validation.json").write_text(json.dumps(validation, indent=2, default=str))
    return {"verdict": validation["verdict"], "backend": backend.name, "precision": art.precision,
            "artifact": art.main, "files": files, "settings": art.settings, "metrics": chosen.metrics,
            "latency": chosen.latency, "size_bytes": art.size_bytes, "ratios": validation.get("ratios"),
            "baseline_fp32": validation.get("baseline_fp32"), "failures": failures,
            "failed_checks": validation["failed_checks"], "notes": art.notes,
            "budgets": budget.to_dict(), "host_validation": profile.host_validation,
            **({"search": search} if search is not None else {})}
