"""Per-layer INT8 sensitivity: a stage whose output is keyed by all it depends on, so every target gets the same.

Each quantizable layer (Conv, Gemm, MatMul, ...) is quantized *alone* by the reference backend's fake-quant
helper (``targets/base.py`` ``fake_quant``, the backend contract's ``Backend.fake_quant``; ONNX: onnxruntime QDQ, per-tensor uint8 activations, per-channel int8
weights, run unfused on ONNX Runtime CPU: the arithmetic of an int8 kernel without any CPU-specific
saturation); its sensitivity is the quality it costs on the selection part of the evaluation split. Layer
names are the FP32 ONNX graph's node names, which every backend maps onto its own ops.

``measure(ctx, select, budget, until)`` is the stage: its output is keyed by (model, calibration samples, selection
split and its reference outputs, judging, budget, runtime versions), shared by the targets of a build that ask with
the same key (``stages.context.Memo``) and kept in the stage cache, so a target's ranking is the same whether it searches first,
last, alone or on another machine. Only a measurement cut short by the time limit (``complete`` false, recorded)
depends on the clock: it is used by the target that measured it and never shared nor cached.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgebuild.calibration.budget import at_most
from edgebuild.calibration.dataset import SampleSet, whole_runs
from edgebuild.pipeline.progress import SUBSTEP
from edgebuild.pipeline.stages import validate as V
from edgebuild.procs import tempdir

QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM")  # LSTM: int8 weights (DynamicQuantizeLSTM)
SHAPE_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
SENSITIVITY_CALIB_SAMPLES = 64  # of the build's calibration samples (calibration/budget.py): a ranking, not shipped ranges
SENSITIVITY_EVAL_SAMPLES = 96  # selection samples each layer is scored on, at most
MIN_EVAL_SAMPLES = 16  # ... and at least (when the selection part has them)
LAYER_SAMPLE_BUDGET = 1536  # layers x samples scored at most: more layers, fewer samples each
# the quality loss of a discrete task metric ties: on 96 samples every layer that flips no decision scored -0.5, so the
# ranking of a classifier's layers was their graph order; the output distortion (1 - mean cosine) breaks the ties
TIE_BREAK = 1e-3
MAX_LAYERS = 64  # layers ranked at most (the graph's first ones)


@dataclass(frozen=True)
class Sensitivity:
    layers: dict[str, float]  # ONNX node name -> quality loss with only that layer quantized, most sensitive first
    seconds: float  # what measuring it cost (0 when it came from the stage cache)
    complete: bool = True  # False: the time limit stopped it before every layer was measured (depends on the clock)
    cached: bool = False  # from the stage cache (an earlier build's measurement of the same key)


def stage_key(ctx, select, budget: V.Budget) -> str | None:
    """What a sensitivity ranking depends on; None when a user's evaluator judges (its code is not part of a key)."""
    from edgebuild.pipeline.cache import cached
    from edgebuild.targets.base import REFERENCE_BACKEND

    if ctx.job.judging.evaluator:
        return None
    judging = asdict(ctx.job.judging)
    judging.pop("evaluator_base", None)
    samples, reference = select
    ref = hashlib.sha256()
    for outputs in reference:
        for o in outputs:
            ref.update(np.ascontiguousarray(o).tobytes())
    return cached("sensitivity", inputs={"model": ctx.job.model.content_hash, "calib": ctx.job.calib.content_hash(),
                                         "select": samples.content_hash(), "reference": ref.hexdigest()},
                  config={"judging": judging, "budget": budget.to_dict(), "max_layers": MAX_LAYERS,
                          "layers": QUANTIZABLE},
                  backend=REFERENCE_BACKEND)  # the reference backend's fake quantization measures it


def measure(ctx, select, budget: V.Budget, until: float) -> Sensitivity:
    """The stage: the per-layer sensitivity for this build's model and calibration, on the selection split
    ``select`` = (samples, their reference outputs), judged with ``budget``; from the build's memo, the stage cache,
    or measured (stopping at ``until``, time.monotonic())."""
    k = stage_key(ctx, select, budget)

    def make() -> tuple[Sensitivity, bool]:
        hit = ctx.work.cache.get_result(k) if k else None
        if hit is not None and isinstance(hit[0].get("layers"), dict):
            return Sensitivity({str(n): float(v) for n, v in hit[0]["layers"].items()}, 0.0, True, True), True
        with ctx.work.stage("measuring per-layer INT8 sensitivity"):
            t0 = time.monotonic()
            layers, complete = rank_layers(ctx.job.model.onnx_path, ctx.job.calib, select[0], select[1], until,
                                           ctx.job.judging, budget, stage=ctx.work.stage)
            result = Sensitivity(layers, round(time.monotonic() - t0, 2), complete)
        if complete and k:
            ctx.work.cache.put_result(k, {"layers": layers})
        return result, complete

    return ctx.carry.stages.get(k, make) if k else make()[0]


def quantizable_layers(onnx_path: Path) -> list[str]:
    """Weighted layers, plus the nodes that produce the model's outputs (a head that concatenates box
    coordinates and class scores shares one int8 scale between them when quantized)."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    producer = {t: n for n in graph.node for t in n.output}
    heads = []
    for o in graph.output:  # back from each output through shape-only ops to the op that makes its values
        node = producer.get(o.name)
        while node is not None and node.op_type in SHAPE_OPS and node.input:
            node = producer.get(node.input[0])
        if node is not None and node.name and node.op_type not in QUANTIZABLE and node.name not in heads:
            heads.append(node.name)
    return heads + [n.name for n in graph.node if n.op_type in QUANTIZABLE and n.name]


def layer_sensitivity(onnx_path: Path, calib: SampleSet, select: SampleSet, reference: list, deadline: float,
                      judging: V.Judging, budget: V.Budget, max_layers: int = MAX_LAYERS, stage=None) -> dict[str, float]:
    """``rank_layers``'s ranking alone."""
    return rank_layers(onnx_path, calib, select, reference, deadline, judging, budget, max_layers, stage)[0]


def rank_layers(onnx_path: Path, calib: SampleSet, select: SampleSet, reference: list,
                deadline: float, judging: V.Judging, budget: V.Budget, max_layers: int = MAX_LAYERS,
                stage=None) -> tuple[dict[str, float], bool]:
    """Quality loss (``V.quality_loss``: the build's own budgets) per layer, most sensitive first, and whether every
    layer was measured before ``deadline``. ``stage`` (the build's progress) shows each layer as a counted step."""

    from edgebuild.targets.base import fake_quant

    layers = quantizable_layers(onnx_path)[:max_layers]
    small = at_most(calib, SENSITIVITY_CALIB_SAMPLES)  # a random part: the first ones may be one class
    keep_n = samples_per_layer(len(layers))
    if len(select) > keep_n:  # layers x samples bounded: rank on a fixed-size part
        keep = np.sort(np.random.default_rng(0).permutation(len(select))[:keep_n])
        if select.sequences is not None:  # whole sequences (contiguous pieces), judged closed loop
            keep = whole_runs(select, keep_n, 0, max_steps=keep_n)[0]
        select, reference = select.subset(keep), [reference[i] for i in keep]
    scores: dict[str, float] = {}
    complete = True
    with tempfile.TemporaryDirectory(prefix="edgebuild-sens-", dir=tempdir()) as tmp, \
            fake_quant(onnx_path, small, Path(tmp)) as quantizer:  # the reference backend's fake-quant: one child
        for i, name in enumerate(layers, 1):
            if time.monotonic() > deadline:
                complete = False
                break
            try:
                step = stage(f"{SUBSTEP}sensitivity: layer {i}/{len(layers)} ({name})") if stage else nullcontext()
                with step, quantizer.runner([name]) as runner:
                    metrics = V.compare(reference, V.collect(runner, select), select.labels, judging)
            except Exception:  # noqa: BLE001 — a layer onnxruntime cannot quantize alone has no rank; the search goes on
                continue
            scores[name] = V.quality_loss(metrics, budget, judging.task) + TIE_BREAK * distortion(metrics)
    return dict(sorted(scores.items(), key=lambda kv: -kv[1])), complete


def samples_per_layer(n_layers: int) -> int:
    """Selection samples each layer is scored on: the work (layers x samples) stays within LAYER_SAMPLE_BUDGET."""
    return max(MIN_EVAL_SAMPLES, min(SENSITIVITY_EVAL_SAMPLES, LAYER_SAMPLE_BUDGET // max(n_layers, 1)))


def distortion(metrics: V.Metrics) -> float:
    """How far the outputs moved, continuous and in [0, 2]: 1 - the mean cosine over samples and outputs."""
    mean = metrics.cosine_mean if metrics.cosine_mean is not None else 1.0
    return min(max(1.0 - float(mean), 0.0), 2.0)
