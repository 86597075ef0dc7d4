"""Accuracy-aware INT8: when the first INT8 artifact misses its quality budget, search for one that meets it.

Cheapest first, stopping at the first configuration within budget, bounded by ``spec.auto_max_tries`` and
``spec.auto_max_seconds``: the backend's calibration/granularity/range variants, then mixed precision
(layers kept in float, most sensitive first), then FP16 where the profile allows float. Candidates are
judged on a *selection* part of the evaluation split; the chosen artifact's reported numbers come from the
*held-out* rest, which played no part in choosing.
"""
from __future__ import annotations

import shutil
import time

import numpy as np

from edgebuild.pipeline import validate as V
from edgebuild.pipeline.errors import EdgeBuildError
from edgebuild.pipeline.target import Attempt, BuildContext, convert, evaluate
from edgebuild.targets.base import Backend
from edgebuild.targets.profiles import TargetProfile

SELECT_FRACTION = 0.4
MIN_SEARCH_SAMPLES = 10
FLOAT_LAYER_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def _quality(a: Attempt) -> float:
    """Lower is better: accuracy drop, top-1 disagreement, or 1 - cosine."""
    metric, value = V.quality_metric(a.metrics)
    return 1.0 - value if metric == "cosine_min" else value


def _split(ctx: BuildContext):
    n = len(ctx.evalset)
    perm = np.random.default_rng(ctx.spec.seed + 1).permutation(n)
    k = max(1, int(n * SELECT_FRACTION))
    sel, hold = np.sort(perm[:k]), np.sort(perm[k:])
    part = lambda idx, name: (ctx.evalset.subset(idx, name), [ctx.reference[i] for i in idx])  # noqa: E731
    return part(sel, "evaluation[select]"), part(hold, "evaluation[holdout]")


def recover(ctx: BuildContext, backend: Backend, profile: TargetProfile, budget: V.Budget, first: Attempt,
            outdir) -> tuple[Attempt, dict]:
    record: dict = {"enabled": True, "tries": [first.summary() | {"data": "evaluation (all)"}], "chosen": first.label}
    if first.quality_ok:
        return first, record
    if len(ctx.evalset) < MIN_SEARCH_SAMPLES:
        record["result"] = f"no search: {len(ctx.evalset)} evaluation samples cannot be split into selection and hold-out"
        return first, record
    started = time.monotonic()
    select, holdout = _split(ctx)
    first_on_select = evaluate(ctx, backend, profile, first.artifact, budget, timed=False, data=select)
    first_on_select.label = first.label
    tries = [first_on_select]
    record["selection"] = (f"candidates judged on {len(select[0])} samples of the evaluation split (seed "
                           f"{ctx.spec.seed + 1}); the chosen one is reported on the other {len(holdout[0])}")
    deadline = started + ctx.spec.auto_max_seconds

    def attempt(label: str, precision: str, settings: dict) -> Attempt | None:
        if len(tries) >= ctx.spec.auto_max_tries or time.monotonic() > deadline:
            return None
        directory = ctx.scratch / profile.name / f"try{len(tries)}"
        with ctx.stage(f"{profile.name}: accuracy search — {label}"):
            try:
                art = convert(ctx, backend, profile, precision, directory, settings)
                a = evaluate(ctx, backend, profile, art, budget, timed=False, data=select)
            except EdgeBuildError as e:  # a candidate that cannot be built is a failed try, not a failed build
                record["tries"].append({"label": label, "precision": precision, "error": str(e), "failures": [str(e)],
                                        "size_bytes": 0})
                return None
        a.label = label
        tries.append(a)
        record["tries"].append(a.summary() | {"data": "evaluation[select]"})
        return a

    found = _search(ctx, backend, profile, first, attempt, record, select)
    best = found or min(tries, key=_quality)
    record["chosen"] = best.label
    record["seconds"] = round(time.monotonic() - started, 2)
    if best is first_on_select:
        record["result"] = "no configuration met the budget; the profile settings are kept"
        return first, record
    if not found:
        record["result"] = "no configuration met the budget; the best one found is kept (and fails the gate)"
    final = _install(ctx, backend, profile, budget, best, outdir, holdout)
    final.label = best.label
    return final, record


def _search(ctx, backend: Backend, profile: TargetProfile, first: Attempt, attempt, record, select):
    settings = backend.default_settings(profile, "int8")  # what `first` was asked for (its record may say more)
    for label, overrides in backend.recovery_candidates(profile, settings):
        a = attempt(label, "int8", {**settings, **overrides})
        if a is not None and a.quality_ok:
            return a
    if profile.allow_float_layers and backend.supports_float_layers:
        ranked = _sensitivity(ctx, select, record)
        done = set()
        for k in FLOAT_LAYER_STEPS:
            layers = tuple(ranked[:k])
            if not layers or layers in done:
                break
            done.add(layers)
            a = attempt(f"INT8 with {len(layers)} layer(s) in float", "int8", {**settings, "float_layers": list(layers)})
            if a is not None and a.quality_ok:
                record["float_layers"] = {n: round(ctx.shared["sensitivity"][n], 4) for n in layers}
                return a
    elif not profile.allow_float_layers:
        record["float_layers_forbidden"] = f"profile {profile.name} runs integer-only: no layer may stay in float"
    if profile.allow_float_layers and "fp16" in profile.precisions:
        a = attempt("FP16 (no INT8)", "fp16", {})
        if a is not None and a.quality_ok:
            return a
    return None


def _sensitivity(ctx: BuildContext, select, record) -> list[str]:
    from edgebuild.pipeline.sensitivity import layer_sensitivity

    if "sensitivity" not in ctx.shared:
        with ctx.stage("measuring per-layer INT8 sensitivity"):
            t0 = time.monotonic()
            ctx.shared["sensitivity"] = layer_sensitivity(ctx.model.onnx_path, ctx.calib, select[0], select[1],
                                                          t0 + ctx.spec.auto_max_seconds / 2)
            ctx.shared["sensitivity_seconds"] = round(time.monotonic() - t0, 2)
    sens = ctx.shared["sensitivity"]
    record["sensitivity"] = {"method": "one layer quantized at a time, ONNX Runtime fake-quant, on evaluation[select]",
                             "seconds": ctx.shared["sensitivity_seconds"],
                             "layers": {n: round(v, 4) for n, v in list(sens.items())[:10]}}
    return [n for n, v in sens.items() if v > 0] or list(sens)


def _install(ctx, backend, profile, budget, best: Attempt, outdir, holdout) -> Attempt:
    """Put the chosen artifact in the target directory and validate it on the held-out part."""
    for f in list(outdir.iterdir()):
        if f.is_file():
            f.unlink()
    for f in best.artifact.files:
        shutil.copyfile(best.artifact.directory / f, outdir / f)
    best.artifact.directory = outdir
    return evaluate(ctx, backend, profile, best.artifact, budget, timed=True, data=holdout)
