"""Mixed precision in the accuracy search (``pipeline/stages/search.py``): an INT8 artifact with its most sensitive
layers kept in float, 1, 2, 3, 4, 6, 8... at a time (``FLOAT_LAYER_STEPS``), at most ``MAX_FLOAT_SHARE`` of the
weights.

The layers are ranked by the per-layer sensitivity (stages/sensitivity.py) or, on a larger graph, by the quantization
noise of one fake-quantized run (stages/proxy.py); the fake-quant proxy says how many layers in float are worth a
real try; the float layers are added to the INT8 variant that came closest to the budget (else to the profile's
settings). Each real try goes through ``Search.attempt`` (stages/search_state.py) and is judged like any other.
"""
from __future__ import annotations

import time

import numpy as np

from edgebuild.pipeline.stages.candidate import Attempt
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.pipeline.stages.search_state import Search
from edgebuild.specs import Precision
from edgebuild.targets.base import Backend
from edgebuild.targets.profiles import TargetProfile
from edgebuild.targets.settings import Settings

FLOAT_LAYER_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
MAX_FLOAT_SHARE = 0.5  # an "_int8_mixed" artifact keeps at most this share of the weights in float
RELAXED_LOSS_DB = 3.0  # a passing mixed artifact under the INT8 name share: its float layers' weights int8 at this cost


def mixed(ctx, backend: Backend, profile: TargetProfile, search: Search, settings: Settings) -> Attempt | None:
    """The most sensitive layers kept in float, 1, 2, 3, 4, 6, 8... at a time, at most half of the weights."""
    if not profile.allow_float_layers:
        search.record.float_layers_forbidden = f"profile {profile.name} runs integer-only: no layer may stay in float"
        return None
    if not backend.supports_float_layers or search.mixed_done:
        return None
    if not search.room():
        search.record.mixed_skipped = (f"a try takes up to {max(search.durations, default=0):.0f} s: mixed precision "
                                          "does not fit the search's time left")
        return None
    search.mixed_done = True
    ranked = _ranking(ctx, search)
    if getattr(settings, "float_regions", False):  # the backend keeps these float from the start: not worth a try of their own
        from edgebuild.targets.regions import float_regions

        already = {n for v in float_regions(ctx.job.model.onnx_path).values() for n in v}
        ranked = [n for n in ranked if n not in already]
    weights = _layer_weights(ctx.job.model.onnx_path)
    total = sum(weights.values()) or 1
    # a layer that alone holds more than the float share allowed (R-Net's dense layer: 74 % of the weights) is not
    # kept in float — the model would not be INT8 any more — but the next most sensitive layers still may be
    heavy = [n for n in ranked if weights.get(n, 0) / total > MAX_FLOAT_SHARE]
    if heavy:
        search.record.float_share_skipped = {n: round(weights.get(n, 0) / total, 4) for n in heavy}
        ranked = [n for n in ranked if n not in heavy]
    done = set()
    plain = next((t.artifact for t in search.tries if t.artifact.precision == Precision.INT8
                  and not (t.artifact.settings or {}).get("float_layers")), None)
    settings = _best_int8_base(search, settings)
    start = _proxy_start(ctx, search, ranked, weights, total, settings)
    if start is None:
        search.record.mixed_skipped = ("the fake-quant proxy: even the most layers in float allowed miss the budget; "
                                       "no mixed-precision conversion tried")
        return None
    for k in FLOAT_LAYER_STEPS:
        if k < start:  # fewer layers in float fail the fake-quant proxy: no real try for them
            continue
        layers = tuple(ranked[:k])
        if not layers or layers in done or not search.room():
            break
        share = sum(weights.get(n, 0) for n in layers) / total
        if share > MAX_FLOAT_SHARE:  # mostly float: not an INT8 model any more; FP16 is smaller and honest
            search.record.float_share_limit = (f"keeping {len(layers)} layers in float would leave {share:.0%} of "
                                                  f"the weights float (> {MAX_FLOAT_SHARE:.0%}): stopped")
            break
        done.add(layers)
        a = search.attempt(f"INT8 with {len(layers)} layer(s) in float", Precision.INT8, settings.replace(float_layers=tuple(layers)))
        if a is not None and plain is not None and _same_files(a.artifact, plain):
            # the float island changed nothing: the backend did not find the layers (a renamed or fused op)
            if search.record.float_layers_no_effect is None:
                search.record.float_layers_no_effect = []
            search.record.float_layers_no_effect.append(
                f"{a.label}: byte-identical to plain INT8 ({', '.join(layers[:3])}{'…' if len(layers) > 3 else ''} "
                "not found in the backend's graph)")
        if a is not None and a.quality_ok:
            a = _float_weights_int8(search, backend, a, settings.replace(float_layers=tuple(layers))) or a
            search.record.float_layers = {n: round(search.ranking[n], 4) for n in layers}
            search.record.float_weight_share = round(share, 4)
            return a
    return None


def _float_weights_int8(search: Search, backend: Backend, a: Attempt, settings: Settings) -> Attempt | None:
    """A passing mixed artifact whose float layers' weights stayed float (they failed the weight-only check,
    targets/weight_only.py, at its default cost) so that under 90 % of its weights are stored in 8 bits: once more
    with the check allowing RELAXED_LOSS_DB, the gate deciding (a speaker encoder's float first LSTM: its recurrent
    weights in int8 cost 1.5 dB; the file 0.42 -> 0.28 of FP32). The weights stay float-computing: the INT8 share
    does not change, the file shrinks. The passing one is kept, else None."""
    from edgebuild.pipeline.stages.weights import INT8_NAME_SHARE, weight_share

    loss = getattr(settings, "weight_only_loss_db", None)
    if not getattr(settings, "weight_only", False) or loss is None or loss >= RELAXED_LOSS_DB:
        return None
    share = (weight_share(a.artifact.path, backend.name) or {}).get("stored_int8_share")
    if share is None or share >= INT8_NAME_SHARE:
        return None
    b = search.attempt(f"{a.label}, their weights int8 (up to {RELAXED_LOSS_DB:g} dB)", Precision.INT8,
                       settings.replace(weight_only_loss_db=RELAXED_LOSS_DB))
    if b is None or not b.quality_ok:
        return None
    b_share = (weight_share(b.artifact.path, backend.name) or {}).get("stored_int8_share")
    return b if b_share is not None and b_share > share else None


def _best_int8_base(search: Search, settings: Settings) -> Settings:
    """The settings float layers are added to: the INT8 variant that came closest (PP-OCRv4's detector on onnx-cpu:
    Q/DQ on the weighted layers only reached mIoU 89.73 against 90, the profile settings 87.2), else the profile's."""
    best = search.closest_variant()
    if best is None:
        return settings
    search.record.mixed_from = f"{best.label} (the INT8 variant closest to the budget: quality loss {best.loss:.3g})"
    return search.asked[best.label]


def _proxy_start(ctx, search: Search, ranked: list[str], weights: dict, total: int,
                 settings: Settings | None = None) -> int | None:
    """The fewest float layers worth a real try, by the fake-quant proxy (pipeline/stages/proxy.py) within a third of
    the search's time left; 1 (every step, as before) when it cannot tell; None when even the most layers in float
    miss there. The proxy quantizes what the base settings quantize (only the weighted layers, for ``op_types:
    weighted``)."""
    from edgebuild.pipeline.stages.proxy import first_step

    steps = [k for k in FLOAT_LAYER_STEPS if k <= len(ranked)
             and sum(weights.get(n, 0) for n in ranked[:k]) / total <= MAX_FLOAT_SHARE]
    if len(steps) < 2 or search.ranking is None:
        return 1
    now = time.monotonic()
    until = now + max(0.0, search.deadline - now) / 3
    with ctx.work.stage("mixed precision: how many layers in float (fake-quant proxy)"):
        index, record = first_step(ctx.job.model.onnx_path, ctx.job.calib, search.select[0], search.select[1], ranked,
                                   steps, ctx.job.judging, search.budget, until,
                                   weighted_only=getattr(settings, "op_types", None) == "weighted",
                                   equalize=bool(getattr(settings, "equalize", False)))
    if time.monotonic() > until:
        search.timed_out("the fake-quant proxy's bisection was cut short by the time limit")
    search.record.float_layers_proxy = record
    if record.get("all_miss"):
        return None
    return steps[index] if index is not None else 1


def _same_files(a, b) -> bool:
    """Two artifacts with byte-identical model files (a float island that changed nothing)."""
    from edgebuild.pipeline.stages.candidate import file_sha

    pick = lambda files: sorted(f for f in files if f.endswith(".bin")) or sorted(files)  # noqa: E731 (IR: weights)
    try:
        fa, fb = pick(a.files), pick(b.files)
        return len(fa) == len(fb) and all(file_sha(a.directory / x) == file_sha(b.directory / y) for x, y in zip(fa, fb))
    except OSError:
        return False


def _layer_weights(onnx_path) -> dict[str, int]:
    """Weight elements per node of the FP32 ONNX (its initializer inputs), by node name."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    for n in graph.node:  # weights held by Constant nodes (tf2onnx, PyTorch's inlined branches) count as well
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            sizes[n.output[0]] = int(np.prod(n.attribute[0].t.dims))
    return {n.name: sum(sizes.get(x, 0) for x in n.input) for n in graph.node if n.name}


def _ranking(ctx: BuildContext, search: Search) -> list[str]:
    """The layers mixed precision keeps in float first: the per-layer sensitivity (one layer quantized at a time) when
    it was measured already or the graph has at most NOISE_RANK_LAYERS quantizable layers; else the quantization
    noise each layer adds in ONE fake-quantized run (stages/proxy.py ``noise_ranking``): layer by layer, a graph of
    that size costs minutes (PP-OCRv4's detector: its 64 layers did not fit the search's time, so mixed precision
    was never tried)."""
    from edgebuild.pipeline.stages.proxy import NOISE_RANK_LAYERS, noise_ranking
    from edgebuild.pipeline.stages.sensitivity import quantizable_layers

    if search.ranking is None and search.sensitivity is None:
        layers = quantizable_layers(ctx.job.model.onnx_path)
        if len(layers) > NOISE_RANK_LAYERS:
            with ctx.work.stage("mixed precision: per-layer quantization noise (one fake-quant run)"):
                scores, record = noise_ranking(ctx.job.model.onnx_path, ctx.job.calib, search.select[0], layers)
            search.record.sensitivity = record
            if scores:
                search.ranking = scores
                return list(scores)
    ranked = sensitive_layers(ctx, search)
    search.ranking = search.sensitivity.layers
    return ranked


def sensitive_layers(ctx: BuildContext, search: Search) -> list[str]:
    """Layers ranked by sensitivity (a stage output keyed by its inputs, stages/sensitivity.py), measured within half
    of the search's time left."""
    from edgebuild.pipeline.stages.sensitivity import measure

    record = search.record
    if search.sensitivity is None:
        t0 = time.monotonic()
        until = t0 + max(0.0, min(search.deadline, ctx.work.deadline) - t0) / 2
        search.sensitivity = measure(ctx, search.select, search.budget, until)
        if not search.sensitivity.complete:
            search.timed_out("the per-layer sensitivity was cut short by the time limit")
    sens = search.sensitivity.layers
    record.sensitivity = {"method": "one layer quantized at a time, ONNX Runtime fake-quant, on evaluation[select]; "
                                       "quality loss = worst relative excess over the quality budgets",
                             "seconds": search.sensitivity.seconds, "cached": search.sensitivity.cached,
                             "layers": {n: round(v, 4) for n, v in list(sens.items())[:10]}}
    floor = min(sens.values(), default=0.0)
    return [n for n, v in sens.items() if v > floor + 1e-9] or list(sens)
