"""Stage: a target whose profile names ``alternatives`` — other profiles for the same devices, e.g. arm64's two
ways: LiteRT (PyTorch -> ONNX -> onnx2tf -> .tflite) and ExecuTorch (PyTorch -> torch.export -> .pte).

- ``alternatives_mode: fallback`` (``arm64``): the alternatives are built only when the profile's own conversion
  fails (a ConversionError: onnx2tf cannot convert the model, ...). The first alternative that converts ships in
  the target's directory, under the target's name; the record says what failed and what shipped. When every one
  fails too, the target fails with its own error and theirs (exit 3).
- ``alternatives_mode: compete`` (``arm64-best``): the profile and its alternatives are all built, validated and
  timed, each against its own profile's budgets (the user's budgets override them all). What ships: one that passes
  its budgets over one that fails; among those that pass, the better by the build's objective — ``precision``: the
  requested precision reached, then the lower p50 latency on this host; ``latency``: the lower p50; ``size``: the
  smaller artifact; ``accuracy``: the lower quality loss. Ties and "all fail" go to the profile itself.

An alternative that cannot take this model (an ExecuTorch profile and an ONNX file, a program torch.export cannot
capture), whose backend is not installed or that does not run the requested precision is skipped, with the reason in
the record: the profile itself can still build. Alternatives' own alternatives are not followed.

The record is the target's ``alternatives`` entry (manifest.json, validation.json: ``requested`` the target's own
profile, ``shipped`` the one whose artifact ships) and a note; the target's ``profile`` is the shipped one's. The build's
scheduler (pipeline/schedule.py) calls ``prepare_target``/``finish_target`` here: per_target's own for a profile
without alternatives (per_target knows nothing of alternatives).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.pipeline.errors import BadInputError, ConversionError, EdgeBuildError
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.targets.base import TORCH_EXPORT, get_backend
from edgebuild.targets.profiles import TargetProfile, catalogue


@dataclass
class Candidate:
    profile: TargetProfile
    outdir: Path
    prepared: object = None  # per_target.Prepared
    result: object = None  # TargetResult, after finish
    error: str | None = None


@dataclass
class PreparedAlternatives:
    """What ``prepare_target`` returns for a profile with alternatives; ``finish_target`` picks what ships."""

    profile: TargetProfile
    outdir: Path
    candidates: list[Candidate]
    skipped: dict[str, str] = field(default_factory=dict)


def prepare_target(ctx: BuildContext, profile: TargetProfile, outdir: Path):
    """``per_target.prepare_target``, or for a profile with alternatives, its candidates (``PreparedAlternatives``)."""
    from edgebuild.pipeline.stages import per_target

    if profile.alternatives:
        return prepare_alternatives(ctx, profile, outdir)
    return per_target.prepare_target(ctx, profile, outdir)


def finish_target(ctx: BuildContext, prepared):
    """``per_target.finish_target``, or for a profile with alternatives, what ships among its candidates."""
    from edgebuild.pipeline.stages import per_target

    if isinstance(prepared, PreparedAlternatives):
        return finish_alternatives(ctx, prepared)
    return per_target.finish_target(ctx, prepared)


def alternatives_of(profile: TargetProfile, extra: tuple[str, ...] = ()) -> list[TargetProfile]:
    if not profile.alternatives:
        return []
    cat = catalogue(extra)
    return [cat[a] for a in profile.alternatives]


def eager_programs(profiles: list[TargetProfile], spec, reloadable: bool = True) -> list[TargetProfile]:
    """The profiles whose backends need the torch.export program when the build starts: the targets, the
    alternatives that compete, and, for a model a fallback could not load again (compressed, or a Python object
    the build was given: ``reloadable`` False), every alternative. A fallback of a model loaded from its spec exports
    its program only when it is needed."""
    out = list(profiles)
    for p in profiles:
        if p.alternatives_mode == "compete" or spec.compress or not reloadable:
            out += alternatives_of(p, spec.profile_files)
    return out


def _usable(ctx: BuildContext, profile: TargetProfile) -> tuple[list[TargetProfile], dict[str, str]]:
    from edgebuild.pipeline.stages.per_target import precision_for

    usable, skipped = [], {}
    for alt in alternatives_of(profile, ctx.job.spec.profile_files):
        try:
            backend = get_backend(alt.backend)
            backend.check_available(alt.name)
            backend.check_profile(alt)
            precision_for(alt, ctx.job.spec)
        except BadInputError as e:
            skipped[alt.name] = str(e)
            continue
        usable.append(dataclasses.replace(alt, alternatives=()))  # not followed
    return usable, skipped


def _with_program(ctx: BuildContext, alt: TargetProfile) -> BuildContext:
    """``ctx`` for an alternative whose backend consumes a torch.export program: the build's, or one exported now
    from the model loaded again (a fallback's program is made only when it is needed). BadInputError when the
    source is not a PyTorch model or torch.export cannot capture it."""
    if get_backend(alt.backend).consumes != TORCH_EXPORT or ctx.job.model.program is not None:
        return ctx
    if ctx.job.model.program_error:
        raise BadInputError(ctx.job.model.program_error)
    from edgebuild.pipeline.stages.export import export_program
    from edgebuild.pipeline.stages.load import load_model
    from edgebuild.targets.base import check_source

    if ctx.job.spec.compress:
        raise BadInputError("a compressed model's torch.export program was not made")
    loaded = load_model(ctx.job.spec)
    check_source(get_backend(alt.backend), alt.name, loaded.kind)
    with ctx.work.stage(f"exporting the torch.export program for {alt.name}"):
        model, record = export_program(loaded, ctx.job.model, ctx.work.scratch)
    if model.program is None:
        raise BadInputError(record.get("torch_export", "torch.export failed"))
    return dataclasses.replace(ctx, job=dataclasses.replace(ctx.job, model=model))


def prepare_alternatives(ctx: BuildContext, profile: TargetProfile, outdir: Path) -> PreparedAlternatives:
    from edgebuild.pipeline.stages.per_target import prepare_target

    own = dataclasses.replace(profile, alternatives=())
    cands = [Candidate(own, outdir)]
    try:
        cands[0].prepared = prepare_target(ctx, own, outdir)
    except ConversionError as e:
        cands[0].error = str(e)
        _empty(outdir)
    compete = profile.alternatives_mode == "compete"
    skipped: dict[str, str] = {}
    if compete or cands[0].error:
        alts, skipped = _usable(ctx, profile)
        for alt in alts:
            c = Candidate(alt, ctx.work.scratch / f"alternative-{profile.name}-{alt.name}")
            c.outdir.mkdir(parents=True, exist_ok=True)
            try:
                actx = _with_program(ctx, alt)
            except BadInputError as e:
                skipped[alt.name] = str(e)
                continue
            try:
                c.prepared = prepare_target(actx, alt, c.outdir)
            except ConversionError as e:
                c.error = str(e)
            cands.append(c)
            if c.prepared is not None and not compete:
                break
    if all(c.prepared is None for c in cands):
        raise ConversionError(_failed_text(profile, cands, skipped))
    return PreparedAlternatives(profile, outdir, cands, skipped)


def _failed_text(profile: TargetProfile, cands: list[Candidate], skipped: dict[str, str]) -> str:
    text = cands[0].error or f"{profile.name}: nothing was built"
    for c in cands[1:]:
        text += f" | alternative {c.profile.name} ({c.profile.backend}) failed too: {c.error}"
    for name, why in skipped.items():
        text += f" | alternative {name} skipped: {why}"
    return text


def finish_alternatives(ctx: BuildContext, pa: PreparedAlternatives):
    from edgebuild.pipeline.stages import objective as O
    from edgebuild.pipeline.stages.per_target import finish_target, precision_for

    for c in pa.candidates:
        if c.prepared is not None:
            try:
                c.result = finish_target(ctx, c.prepared)
            except BadInputError:
                raise
            except EdgeBuildError as e:
                c.error = str(e)
    built = [c for c in pa.candidates if c.result is not None]
    if not built:
        raise ConversionError(_failed_text(pa.profile, pa.candidates, pa.skipped))
    objective = O.objective_for(pa.profile, ctx.job.spec)
    requested = precision_for(pa.profile, ctx.job.spec)
    best = choose(built, objective, requested)
    why = _why(pa, best, built, objective, requested)
    summaries = [_summary(c) for c in pa.candidates]  # before the move: a candidate's checks read its files' sizes
    if best.outdir != pa.outdir:
        _empty(pa.outdir)
        for f in best.outdir.iterdir():
            shutil.move(str(f), str(pa.outdir / f.name))
    record = {"mode": pa.profile.alternatives_mode, "objective": objective, "requested": pa.profile.name,
              "shipped": best.profile.name,
              "backend": best.profile.backend, "why": why,
              "candidates": summaries,
              **({"skipped": pa.skipped} if pa.skipped else {})}
    r = best.result
    validation = pa.outdir / "validation.json"  # written by finish_target: the record goes there too
    if validation.is_file():
        validation.write_text(json.dumps({**json.loads(validation.read_text()), "alternatives": record}, indent=2,
                                         default=str))
    shipped = pa.profile if best is pa.candidates[0] else best.profile  # the profile whose artifact ships
    return dataclasses.replace(r, notes=[*(r.notes or []), f"alternatives: {why}"], profile=shipped.to_dict(),
                               extra={**r.extra, "alternatives": record})


def _p50(c: Candidate) -> float:
    return (c.result.latency.p50_ms if c.result.latency else None) or math.inf


def choose(built: list[Candidate], objective: str, requested: str) -> Candidate:
    """What ships among the candidates that were built (the profile's own first)."""
    return min(built, key=lambda c: _rank(c, objective, requested, built.index(c)))


def _rank(c: Candidate, objective: str, requested: str, index: int) -> tuple:
    if not c.result.verdict.passed:
        return (1 if c.result.verdict.status == "fail" else 2, 0, index)  # failing ones: the profile's own first
    if objective == "size":
        key = (c.result.size_bytes or math.inf,)
    elif objective == "accuracy":
        key = (c.prepared.chosen.loss,)
    elif objective == "latency":
        key = (_p50(c),)
    else:
        key = (0 if c.result.precision == requested else 1, _p50(c))
    return (0, key, index)


def _name(c: Candidate) -> str:
    return f"{c.profile.name} ({c.profile.backend}{', ' + c.result.artifact if c.result is not None else ''})"


def _why(pa: PreparedAlternatives, best: Candidate, built: list[Candidate], objective: str, requested: str) -> str:
    own = pa.candidates[0]
    failed = [c for c in pa.candidates if c.result is None]
    parts = [f"{c.profile.name} ({c.profile.backend}) failed: {(c.error or '').split(' | ')[0][:300]}" for c in failed]
    if best is own and len(built) == 1:
        return "; ".join(parts + [f"{_name(best)} ships"])
    if len(built) == 1:
        return "; ".join(parts + [f"{_name(best)} ships instead ({pa.profile.alternatives_mode})"])
    others = [c for c in built if c is not best]
    if not best.result.verdict.passed:
        return "; ".join(parts + [f"no candidate meets its budgets: {_name(best)}, the profile's own, ships"])
    if not all(o.result.verdict.passed for o in others):
        losers = ", ".join(f"{_name(o)} {o.result.verdict.status}s its budgets" for o in others if not o.result.verdict.passed)
        return "; ".join(parts + [f"{_name(best)} meets its budgets and ships; {losers}"])
    def measure(c):
        if objective == "size":
            return f"{c.result.size_bytes / 1e6:.3f} MB"
        if objective == "accuracy":
            return f"quality loss {c.prepared.chosen.loss:.4f}"
        return f"{c.result.precision}, p50 {_p50(c):.3f} ms on this host"
    rule = {"size": "the smaller", "accuracy": "the more accurate", "latency": "the faster on this host"}.get(
        objective, f"{requested} reached, then the faster on this host")
    return "; ".join(parts + [f"all within budget; objective {objective} ({rule}): {_name(best)} ships, "
                              f"{measure(best)} vs " + ", ".join(f"{_name(o)} {measure(o)}" for o in others)])


def _summary(c: Candidate) -> dict:
    d = {"profile": c.profile.name, "backend": c.profile.backend}
    if c.result is None:
        return {**d, "verdict": "error", "error": c.error}
    r = c.result
    return {**d, "verdict": r.verdict.status, "artifact": r.artifact, "precision": r.precision,
            "size_bytes": r.size_bytes, "latency_p50_ms": r.latency.p50_ms if r.latency else None,
            "quality_loss": round(c.prepared.chosen.loss, 4), "failures": [str(f) for f in r.verdict.failures]}


def _empty(folder: Path) -> None:
    for f in list(folder.iterdir()) if folder.is_dir() else []:
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f)
        else:
            f.unlink()
