"""How many calibration samples a build uses: decided once, from the model's cost, for every backend.

Every INT8 calibrator edgebuild drives runs the FP32 model on each calibration sample and records every
activation it will quantize: ONNX Runtime's calibrator adds each tensor as a graph output and reduces it in
numpy, NNCF keeps statistics per quantization point, the TFLite converter runs its own calibration graph. Their
cost per sample is therefore about the model's activation volume (the elements of every float tensor a node
writes, from ONNX shape inference), not its parameter count: a detector at 800x608 writes ~100x what a digits
CNN does, and spent ~400 s calibrating 120 samples in each backend (issue 15).

Rule: ``samples x activation elements per sample <= ELEMENT_BUDGET``, never fewer than ``MIN_SAMPLES`` and never
more than asked for. The count is a function of the exported model alone (not of a timing), so a re-run of a
build, and the stage cache keyed on the calibration set's content, see the same samples.

What the toolkits say: NNCF's ``subset_size`` defaults to 300, inherited from OpenVINO's POT, whose docs
recommend "not less than 300 samples" for ``stat_subset_size``; TensorFlow's post-training guide asks for "a
small subset (around ~100-500 samples)" and ``tf.lite.RepresentativeDataset`` for "a few hundred"; NVIDIA
suggests about 500 images for TensorRT's entropy calibrator; ONNX Runtime names no count. Those numbers cover
histogram/percentile calibrators and bias correction, which need many samples to estimate a distribution's
tail; min-max ranges (what every backend here uses by default) are the running max of per-sample maxima and
change little after a few dozen samples of a CNN (the per-tensor maximum of the next samples rarely exceeds it
by more than the int8 step). 32 is the floor: below it a range misses too often.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from edgebuild.calibration.dataset import SampleSet, cap

DEFAULT_SAMPLES = 300  # calibration samples at most when the build does not say (NNCF's and POT's default)
MIN_SAMPLES = 32  # never fewer (unless fewer are available)
# activation elements x samples per calibration. Per sample: ResNet-50 at 224x224 26.4 M elements (-> 37 samples),
# MobileNetV2 13.0 M (-> 76), the digits demo 19 k (-> 300); a detector at 800x608 (~100 M) gets the floor, 32
ELEMENT_BUDGET = 1_000_000_000
FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class SampleChoice:
    """What was chosen and why (recorded in the manifest as ``data.calibration_samples``)."""

    requested: int  # the user's calib_samples, or DEFAULT_SAMPLES when not given
    explicit: bool  # calib_samples was given (edgebuild.yaml, --calib-samples, the API): it wins
    available: int  # calibration samples the data holds (after the overlap with evaluation is removed)
    used: int
    activation_elements: int | None  # per sample, from ONNX shape inference (None: shapes unknown)
    budget: int  # ELEMENT_BUDGET (activation elements x samples)
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def choose_samples(available: int, requested: int | None, elements: int | None,
                   budget: int | None = None) -> SampleChoice:
    """The calibration sample count: ``requested`` (explicit) wins; otherwise at most DEFAULT_SAMPLES and as
    many as fit ``budget`` (default ELEMENT_BUDGET) activation elements, at least MIN_SAMPLES; never more than
    ``available``."""
    budget = ELEMENT_BUDGET if budget is None else budget
    explicit = requested is not None
    asked = int(requested) if explicit else DEFAULT_SAMPLES
    want = min(asked, available)
    have = f"{available} available" if available < asked else f"{asked} {'requested' if explicit else 'by default'}"
    if explicit:
        reason = f"calib_samples {asked} given: used as asked ({have})" if want == asked else \
            f"calib_samples {asked} given; the data holds {available}"
    elif not elements:
        reason = f"{have}; the model's activation volume is unknown (shape inference), so no cost cap"
    else:
        fit = max(MIN_SAMPLES, budget // elements)
        if fit < want:
            want = fit
            floor = " (the floor)" if fit == MIN_SAMPLES and budget // elements < MIN_SAMPLES else ""
            reason = (f"{have}; {_human(elements)} activation elements per sample: {fit}{floor} fit the calibration "
                      f"budget of {_human(budget)} elements (set calib_samples to use more)")
        else:
            reason = f"{have}; {_human(elements)} activation elements per sample fit the calibration budget"
    return SampleChoice(asked, explicit, available, max(min(want, available), 0), elements, budget, reason)


def at_most(calib: SampleSet, limit: int | None, seed: int = 0) -> SampleSet:
    """What a backend calibrates on: the build's samples (chosen once by ``choose_samples``), or a random ``limit``
    of them when the target's profile asks for fewer (OpenVINO ``quant.subset_size``, TFLite
    ``quant.calibration_samples``). Backends use every sample this returns and cap nothing themselves."""
    return calib if not limit else cap(calib, int(limit), seed)


def activation_elements(onnx_path: Path) -> int | None:
    """Elements of every float tensor the main graph's nodes write, per sample (batch 1), from ONNX shape
    inference; a dimension left symbolic counts as 1. None when shape inference fails or knows no shape."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
        for init in model.graph.initializer:  # weights' values are not needed, only shapes: inference 60x faster
            if init.data_type in FLOAT_TYPES and len(init.raw_data) > 4096:  # (small ones may be Reshape targets)
                init.ClearField("raw_data")
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 — an op shape inference does not know: the cost is unknown, not an error
        return None
    produced = {o for n in inferred.graph.node if n.op_type != "Constant" for o in n.output}
    total, known = 0, False
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = v.type.tensor_type
        if v.name not in produced or t.elem_type not in FLOAT_TYPES or not t.HasField("shape"):
            continue
        produced.discard(v.name)  # once: a graph that kept its value_info gets each tensor listed again by inference
        n = 1
        for d in t.shape.dim:
            n *= d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
        total, known = total + n, True
    return total if known else None


def _human(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)
