"""After the search: the chosen artifact installed in the target directory and judged on the held-out part
(``install``), and what ships when it misses there (``held_out_miss``): the next INT8 candidates, FP16, FP32."""
from __future__ import annotations

import shutil

from edgebuild.specs import Precision
from edgebuild.pipeline.stages.candidate import Attempt, candidates, evaluate
from edgebuild.pipeline.stages.search_state import Search
from edgebuild.targets.profiles import TargetProfile


def held_out_miss(ctx, backend, profile, budget, search: Search, best: Attempt, final: Attempt, outdir, holdout) -> Attempt:
    """A choice that met the budget on the selection part but misses it on the held-out part does not ship: after an
    INT8 miss the next INT8 candidates (backend variants not tried yet) are tried first, each judged on the selection
    part and then on the held-out part; then FP16 (allowed, and not already missed on the selection part); when none
    of those holds on the held-out part (or the choice was FP16), FP32 where the profile allows it. The held-out miss
    is the better evidence of the two."""
    if final.quality_ok or best.artifact.precision == Precision.FP32:
        return final
    missed = (f"{best.label} met the budget on the selection part but not on the held-out part "
              f"({'; '.join(map(str, final.failures))})")
    if best.artifact.precision == Precision.INT8:
        held = _next_int8(ctx, backend, profile, budget, search, missed, outdir, holdout)
        if held is not None and held.quality_ok:
            return held
        final = held or final
        fp16 = _fp16_instead(ctx, backend, profile, budget, search, missed, outdir, holdout)
        if fp16 is not None:
            if fp16.quality_ok:
                return fp16
            final, missed = fp16, f"{missed}; FP16 missed it too ({'; '.join(map(str, fp16.failures))})"
    if not float_allowed(profile, Precision.FP32):
        return final
    a = search.attempt("FP32 (the choice missed the budget on the held-out part)", Precision.FP32, None,
                       fallback=True)
    return _instead(ctx, backend, profile, budget, search, a, f"{missed}: FP32 instead", outdir, holdout) or final


def _fp16_instead(ctx, backend, profile, budget, search: Search, missed: str, outdir, holdout) -> Attempt | None:
    """FP16 after an INT8 held-out miss, installed and judged on the held-out part (None where the profile does not
    allow it, or it missed on the selection part already)."""
    if not fp16_allowed(profile):
        return None
    # an FP16 that met the budget on the selection part (the safety net the INT8 search went on beside) ships now
    a = next((t for t in search.tries if t.artifact.precision == Precision.FP16 and t.quality_ok), None)
    if a is None and any(t.artifact.precision == Precision.FP16 for t in search.tries):
        return None
    a = a or search.attempt("FP16 (the INT8 choice missed the budget on the held-out part)", Precision.FP16, None,
                            fallback=True)
    return _instead(ctx, backend, profile, budget, search, a, f"{missed}: FP16 instead", outdir, holdout)


def _instead(ctx, backend, profile, budget, search: Search, a: Attempt | None, why: str, outdir, holdout) -> Attempt | None:
    """``a`` (a float fallback that met the budget on the selection part) installed and judged on the held-out part,
    and recorded as what ships instead; None when it did not meet the budget."""
    if a is None or not a.quality_ok:
        return None
    search.record.held_out_miss, search.record.chosen = why, a.label
    return _install_as(ctx, backend, profile, budget, a, outdir, holdout)


def _next_int8(ctx, backend, profile, budget, search: Search, missed: str, outdir, holdout) -> Attempt | None:
    """The next INT8 candidates after a held-out miss: the first that holds on both parts (None when none was
    installed; else the last installed, which missed too)."""
    if backend is None:
        return None
    tried = {t.label for t in search.record.tries}
    settings = backend.requested_settings(profile)
    final = None
    for label, overrides in candidates(ctx, backend, profile, settings):
        if label in tried:
            continue
        a = search.attempt(f"{label} (next INT8 candidate after a held-out miss)", Precision.INT8, overrides)
        if a is None or not a.quality_ok:
            continue
        final = _install_as(ctx, backend, profile, budget, a, outdir, holdout)
        if final.quality_ok:
            search.record.held_out_miss, search.record.chosen = f"{missed}: {a.label} instead", a.label
            return final
    return final  # the last installed missed too: it stands unless another candidate holds


def _install_as(ctx, backend, profile, budget, a: Attempt, outdir, holdout) -> Attempt:
    held = install(ctx, backend, profile, budget, a, outdir, holdout)
    held.label = a.label
    return held


def float_allowed(profile: TargetProfile, precision: str) -> bool:
    """May the search fall back to this float precision: the profile runs it and allows float layers."""
    return profile.allow_float_layers and precision in profile.precisions


def fp16_allowed(profile: TargetProfile) -> bool:
    return float_allowed(profile, Precision.FP16)


def install(ctx, backend, profile, budget, best: Attempt, outdir, holdout) -> Attempt:
    """Put the chosen artifact in the target directory and validate it on the held-out part."""
    for f in list(outdir.iterdir()):
        if f.is_file():
            f.unlink()
    for f in best.artifact.files:
        shutil.copyfile(best.artifact.directory / f, outdir / f)
    best.artifact.directory = outdir
    return evaluate(ctx, backend, profile, best.artifact, budget, timed=True, data=holdout, restored=best.restored)
