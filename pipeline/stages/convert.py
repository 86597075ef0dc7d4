"""Stage: convert one target's artifact (cached), with the sibling artifacts its backend gives from the same run."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from edgebuild.errors import ConversionError
from edgebuild.pipeline.cache import cached
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.targets.base import Artifact, Backend
from edgebuild.targets.profiles import TargetProfile
from edgebuild.targets.settings import Settings
from edgebuild.specs import Precision


@dataclass(frozen=True)
class ConversionOutcome:
    """What ``convert`` gave and how: ``restored`` from the stage cache (sha256 verified), or made in the same
    conversion run as the ``sibling_of`` precision (``Backend.convert_family``), else converted now. These fields,
    never the artifact's notes (which are for people), say where an artifact came from."""

    artifact: Artifact
    restored: bool = False
    sibling_of: Precision | None = None


def convert(ctx: BuildContext, backend: Backend, profile: TargetProfile, precision: Precision, directory: Path,
            settings: Settings | dict | None = None, siblings: dict[Precision, Path] | None = None) -> ConversionOutcome:
    """The artifact (cached), with how it came (``ConversionOutcome``). ``settings``: what to ask the backend for, a whole ``Settings`` (a search variant) or
    a mapping of changes to the profile's (``Backend.requested_settings``; frozen, checked here). ``siblings``
    ({precision: directory}): precisions the backend may give from the same conversion run
    (``Backend.convert_family``); they are cached and kept in ``ctx.carry.siblings`` for the later ``convert`` of that
    precision, which then costs nothing."""
    requested = backend.requested_settings(profile, settings)
    k = _convert_key(ctx, backend, profile, precision, requested)
    directory.mkdir(parents=True, exist_ok=True)
    made = ctx.carry.siblings.pop(k, None)
    if made is not None and made.artifact.directory == directory:
        return made
    cached = ctx.work.cache.get(k, directory)
    if cached is not None:
        cached.target = profile.name
        return ConversionOutcome(cached, restored=True)
    wanted = {}
    for p, d in (siblings or {}).items():
        ss = backend.requested_settings(profile)
        sk = _convert_key(ctx, backend, profile, p, ss)
        if not _in_cache(ctx, sk):
            wanted[p] = (d, ss, sk)
    try:
        arts = backend.convert_family(ctx.job.model, profile, precision, ctx.job.calib, directory, requested,
                                      {p: (d, ss) for p, (d, ss, _) in wanted.items()} or None)
    except ConversionError as e:  # what the same run gave before it failed is kept for the search's float tries
        _keep_siblings(ctx, wanted, getattr(e, "siblings", {}), precision)
        raise
    art = arts.pop(precision)
    ctx.work.cache.put(k, art)
    _keep_siblings(ctx, wanted, arts, precision)
    return ConversionOutcome(art)


def _keep_siblings(ctx: BuildContext, wanted: dict, arts: dict[Precision, Artifact], precision: Precision) -> None:
    for p, sib in arts.items():
        ctx.work.cache.put(wanted[p][2], sib)
        ctx.carry.siblings[wanted[p][2]] = ConversionOutcome(sib, sibling_of=precision)


def _in_cache(ctx: BuildContext, k: str) -> bool:
    return ctx.work.cache.has(k)


def _convert_key(ctx: BuildContext, backend: Backend, profile: TargetProfile, precision: Precision,
                 settings: Settings) -> str:
    # what a conversion depends on; two profiles that differ only in budgets/threads share artifacts
    return cached("convert", inputs={"model": ctx.job.model.content_hash,
                                     "calib": ctx.job.calib.content_hash() if precision == Precision.INT8 else None},
                  config={"io": (profile.io_dtype, profile.layout), "quant": profile.quant, "precision": precision,
                          "settings": settings.for_precision(precision),
                          "inputs": [asdict(i) for i in ctx.job.model.inputs],
                          "isa": _isa() if precision == Precision.INT8 else None},  # `auto` settings come from the host's ISA
                  backend=backend.name)


def _isa() -> dict:
    from edgebuild.targets.isa import host_isa

    return host_isa()


def baseline_dirs(ctx: BuildContext, profile: TargetProfile, precision: Precision) -> dict[Precision, Path] | None:
    """Where the FP32 baseline goes (a sibling of the target's own conversion where the backend can give one), and
    for a searched INT8 build the FP16 the search falls back to (most real models that collapse in INT8 ship it;
    from the same onnx2tf graph it costs one TFLite conversion instead of a second onnx2tf run)."""
    if precision == Precision.FP32:
        return None
    dirs = {Precision.FP32: ctx.work.scratch / profile.name / "fp32"}
    if precision == Precision.INT8 and ctx.job.spec.auto and profile.allow_float_layers \
            and Precision.FP16 in profile.precisions:
        dirs[Precision.FP16] = ctx.work.scratch / profile.name / "fp16-sibling"
    return dirs
