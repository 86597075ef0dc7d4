"""Per-layer INT8 sensitivity, measured once per build in ONNX space and shared by every target.

Each quantizable layer (Conv, Gemm, MatMul, ...) is quantized *alone* by the ONNX backend's public fake-quant
helper (``targets/onnx.py`` ``FakeQuant``: onnxruntime QDQ, per-tensor uint8 activations, per-channel int8
weights, run unfused on ONNX Runtime CPU: the arithmetic of an int8 kernel without any CPU-specific
saturation); its sensitivity is the quality it costs on the selection part of the evaluation split. Layer
names are the FP32 ONNX graph's node names, which every backend maps onto its own ops.
"""
from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from edgebuild.calibration.budget import at_most
from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline.progress import SUBSTEP
from edgebuild.pipeline.stages import validate as V

QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SHAPE_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
SENSITIVITY_CALIB_SAMPLES = 64  # of the build's calibration samples (calibration/budget.py): a ranking, not shipped ranges
SENSITIVITY_EVAL_SAMPLES = 96  # selection samples each layer is scored on, at most
MIN_EVAL_SAMPLES = 16  # ... and at least (when the selection part has them)
LAYER_SAMPLE_BUDGET = 1536  # layers x samples scored at most: more layers, fewer samples each
# the quality loss of a discrete task metric ties: on 96 samples every layer that flips no decision scored -0.5, so the
# ranking of a classifier's layers was their graph order; the output distortion (1 - mean cosine) breaks the ties
TIE_BREAK = 1e-3


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


def layer_sensitivity(onnx_path: Path, calib: SampleSet, select: SampleSet, reference: list,
                      deadline: float, judging: V.Judging, budget: V.Budget, max_layers: int = 64,
                      stage=None) -> dict[str, float]:
    """Quality loss (``V.quality_loss``: the build's own budgets) per layer, most sensitive first. ``stage``
    (the build's progress) shows each layer as a counted step, ``layer i/N``."""
    import numpy as np

    from edgebuild.targets.onnx import FakeQuant

    layers = quantizable_layers(onnx_path)[:max_layers]
    small = at_most(calib, SENSITIVITY_CALIB_SAMPLES)  # a random part: the first ones may be one class
    keep_n = samples_per_layer(len(layers))
    if len(select) > keep_n:  # layers x samples bounded: rank on a fixed-size part
        keep = np.sort(np.random.default_rng(0).permutation(len(select))[:keep_n])
        select, reference = select.subset(keep), [reference[i] for i in keep]
    scores: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgebuild-sens-") as tmp, \
            FakeQuant(onnx_path, small, Path(tmp)) as fake_quant:  # the ONNX backend's fake-quant helper: one child
        for i, name in enumerate(layers, 1):
            if time.monotonic() > deadline:
                break
            try:
                step = stage(f"{SUBSTEP}sensitivity: layer {i}/{len(layers)} ({name})") if stage else nullcontext()
                with step, fake_quant.runner([name]) as runner:
                    metrics = V.compare(reference, V.collect(runner, select), select.labels, judging)
            except Exception:  # noqa: BLE001 — a layer onnxruntime cannot quantize alone has no rank; the search goes on
                continue
            scores[name] = V.quality_loss(metrics, budget, judging.task) + TIE_BREAK * distortion(metrics)
    return dict(sorted(scores.items(), key=lambda kv: -kv[1]))


def samples_per_layer(n_layers: int) -> int:
    """Selection samples each layer is scored on: the work (layers x samples) stays within LAYER_SAMPLE_BUDGET."""
    return max(MIN_EVAL_SAMPLES, min(SENSITIVITY_EVAL_SAMPLES, LAYER_SAMPLE_BUDGET // max(n_layers, 1)))


def distortion(metrics: dict) -> float:
    """How far the outputs moved, continuous and in [0, 2]: 1 - the mean cosine over samples and outputs."""
    return min(max(1.0 - float(metrics.get("cosine_mean", 1.0)), 0.0), 2.0)
