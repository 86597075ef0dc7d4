"""Static INT8 (QDQ) with onnxruntime: activation ranges calibrated on the calibration samples (in chunks, histogram
methods capped), the op types quantized, float regions and the recurrent state path left float."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from edgebuild.calibration.dataset import SampleSet
from edgebuild.errors import ConversionError
from edgebuild.targets.onnx.hard_gates import applies, decompose, fold
from edgebuild.targets.onnx.prepare import prepared, state_path
from edgebuild.targets.regions import graph_index, is_transformer
from edgebuild.targets.settings import OnnxSettings


# ONNX Runtime's recipe for transformers: Q/DQ on the matrix products only; LayerNorm, Softmax, GELU (Erf),
# residual Adds, the attention-mask arithmetic and the embedding Gather stay in float. Measured on a 3-layer
# MiniLM sentence encoder (random tokens): worst cosine of the embedding 0.61 with every op quantized, 0.92 with this.
# The embedding table (Gather of a constant) too: MiniLM-L3's word embeddings are 69 % of its weights; int8 there cost
# nothing measurable (pooled-embedding cosine 0.9389 with, 0.9389 without) and made the file all-INT8 (31 % -> 100 %).
WEIGHTED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"]


CALIB_CHUNK = 16  # calibration samples whose tensors are held at once
# percentile/entropy calibration histograms every activation value of every sample: PP-OCRv4's detector (327 tensors
# of up to 320x320) took 40 s per try on an idle host and 140 s on a loaded one at 120 samples, most of a search's
# time. They read at most this many activation values (at least MIN_HISTOGRAM_SAMPLES samples): a 99.999th
# percentile of tens of millions of values per tensor is as good as of hundreds of millions
HISTOGRAM_ELEMENTS = 600_000_000
HISTOGRAM_METHODS = ("percentile", "entropy")  # mean_minmax reads every sample's min and max only: every sample
MIN_HISTOGRAM_SAMPLES = 32


def quantize_static(src: Path, out: Path, calib: SampleSet, settings: dict, workdir: Path,
                    calibration_cache: Path | None = None, preprocessed: bool = False) -> None:
    """Static INT8 QDQ with onnxruntime (public for the pipeline's sensitivity analysis).

    ``calibration_cache``: a JSON file of activation ranges written by the first call and reused by the next
    ones (onnxruntime's ``calibration_cache_path``), so quantizing one layer at a time calibrates once.
    ``preprocessed``: ``src`` is already ``preprocess(src)``'s output (not pre-processed again per call).
    """
    quantize_qdq(src, out, calib, OnnxSettings().with_changes(settings).to_dict(), workdir, calibration_cache,
                     preprocessed)


def resolve_op_types(src: Path, op_types) -> tuple[list[str] | None, str | None]:
    """The op types given Q/DQ (None: onnxruntime's whole registry) and a note saying why, for ``op_types``."""
    if isinstance(op_types, list):
        return [str(t) for t in op_types], f"quantized op types as configured: {', '.join(map(str, op_types))}"
    if op_types == "weighted" or (op_types == "auto" and is_transformer(src)):
        why = "attention found in the graph (transformer): " if op_types == "auto" else ""
        return list(WEIGHTED_OPS), (f"{why}only {', '.join(WEIGHTED_OPS)} quantized (onnxruntime's recipe for "
                                    "transformers); LayerNorm, Softmax, GELU and the other ops stay in float")
    return None, None


def quantize_qdq(src: Path, out: Path, calib: SampleSet, s: dict, workdir: Path,
                calibration_cache: Path | None = None, preprocessed: bool = False,
                ranges_store: Path | None = None) -> list[str]:
    """Static INT8 QDQ of ``src`` into ``out``; the conversion's notes. ``ranges_store``: a folder where the activation
    ranges are kept across the conversions of one build (``stored_ranges``), so a try whose graph, samples and
    calibration method an earlier try had calibrated does not calibrate again."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy, "mean_minmax": CalibrationMethod.MinMax}
    named = [*s["nodes_to_exclude"], *s["float_layers"], *s["nodes_to_quantize"]]
    pre = src if preprocessed else prepared(src, workdir, keep_names=bool(named))
    if named and not preprocessed:
        import onnx

        present = {n.name for n in onnx.load(str(pre)).graph.node}
        missing = sorted(set(named) - present)
        if missing:
            raise ConversionError(f"nodes named in the quantization settings are not in the model: {', '.join(missing[:5])}")
    extra = {"ActivationSymmetric": bool(s["symmetric_activations"]), "WeightSymmetric": bool(s["symmetric_weights"]),
             "QuantizeBias": bool(s["quantize_bias"]), "DedicatedQDQPair": bool(s["dedicated_qdq_pair"])}
    if s["calibrate_method"] == "percentile":
        extra["CalibPercentile"] = float(s["percentile"])
    op_types, note = resolve_op_types(src, s.get("op_types", "all"))
    regions: list[str] = []
    found: dict = {}
    if s.get("float_regions", False) and not s["nodes_to_quantize"]:
        from edgebuild.targets.regions import describe, float_regions

        found = float_regions(pre)
        regions = [n for v in found.values() for n in v]
        note = "; ".join(filter(None, [note, describe(found)])) or None
    if s.get("float_state", True) and not s["nodes_to_quantize"]:
        state = state_path(pre)
        if state:
            regions += state
            note = "; ".join(filter(None, [note, f"the recurrent state path in float ({len(state)} op(s) between the "
                                                 "state input/output and the recurrent layer)"]))
    if s.get("equalize", False):  # per-channel ranges evened out before depthwise convs (targets/onnx/equalize.py)
        from edgebuild.targets.onnx.equalize import apply as equalized

        pre, eq_note = equalized(pre, calib, workdir, owned=not preprocessed)
        note = "; ".join(filter(None, [note, eq_note]))
        preprocessed = False  # the equalized copy is this call's own: removed below
    if s.get("rounding", "nearest") == "adaround":  # learned weight rounding first (targets/onnx_adaround.py)
        from edgebuild.targets.onnx_adaround import apply

        pre, ada_note = apply(pre, calib, s, workdir, skip={*s["nodes_to_exclude"], *s["float_layers"], *regions},
                              owned=not preprocessed)
        note = "; ".join(filter(None, [note, ada_note]))
        preprocessed = False  # the adjusted copy is this call's own: removed below
    gates = s.get("int8_gates", False) and not s["nodes_to_quantize"] and applies(op_types)
    if gates:  # onnxruntime has no int8 HardSigmoid: the gates as Add -> Clip (targets/onnx/hard_gates.py)
        rewritten = workdir / "_gates.onnx"
        n_gates = decompose(pre, rewritten, skip={*s["nodes_to_exclude"], *s["float_layers"], *regions})
        if n_gates:  # the graph unchanged otherwise (and its calibrated ranges stay keyed to it)
            if not preprocessed:
                pre.unlink()
            pre, preprocessed = rewritten, False
    ranges = calibration_cache or workdir / "_ranges.json"
    if not ranges.is_file():
        used = histogram_samples(pre, calib) if s["calibrate_method"] in HISTOGRAM_METHODS else calib
        if len(used) < len(calib):
            note = "; ".join(filter(None, [note, f"{s['calibrate_method']} calibration histograms {len(used)} of the "
                                                 f"{len(calib)} calibration samples (activation values capped)"]))
        kept = stored_ranges(ranges_store, pre, calib, s)
        if kept is not None and kept.is_file():
            shutil.copyfile(kept, ranges)
        else:
            if s["calibrate_method"] == "minmax":
                calibrate_in_chunks(pre, used, ranges, workdir)
            else:
                bounds = minmax_ranges(pre, calib, s, workdir, ranges_store)
                calibrate_histograms(pre, used, s, bounds, ranges, workdir)
            _store(ranges, kept)
    quantize_static(
        str(pre), str(out), None, quant_format=QuantFormat.QDQ,
        activation_type=types[s["activation_type"]], weight_type=types[s["weight_type"]],
        per_channel=bool(s["per_channel"]), reduce_range=bool(s["reduce_range"]),
        calibrate_method=methods[s["calibrate_method"]],
        nodes_to_exclude=[*s["nodes_to_exclude"], *s["float_layers"], *regions],
        nodes_to_quantize=list(s["nodes_to_quantize"]) or None,
        op_types_to_quantize=op_types, extra_options=extra, calibration_cache_path=ranges,
    )
    if regions and found.get("postprocess"):
        float_into_tail(out, set(found["postprocess"]))
    if gates and n_gates:
        folded = fold(out)
        note = "; ".join(filter(None, [note, f"{n_gates} HardSigmoid/HardSwish gate(s) as int8 Add -> Clip, {folded} slope(s) "
                                             "folded into a scale (onnxruntime has no int8 HardSigmoid)"]))
    if not preprocessed:
        pre.unlink()
    if calibration_cache is None:
        ranges.unlink()
    for leftover in workdir.glob("*.onnx.data"):
        leftover.unlink()
    return [note] if note else []


def float_into_tail(path: Path, tail: set[str]) -> None:
    """No Q/DQ on a tensor that only the float tail reads (an output Softmax/Sigmoid kept float, targets/regions.py):
    onnxruntime quantizes a Gemm/Conv's output whatever reads it, so the logits a float Softmax takes were still 8-bit
    (the arg-max of two close symbols tied). The layer before keeps its int8 weights and inputs, with a float output
    (onnxruntime fuses DQ -> Gemm/MatMul into an integer kernel with float output)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    _, consumers = graph_index(graph)
    outputs = {o.name for o in graph.output}
    drop, rename = [], {}
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in outputs:
            continue
        users = consumers.get(q.output[0], [])
        if len(users) != 1 or users[0].op_type != "DequantizeLinear" or users[0].output[0] in outputs:
            continue
        dq = users[0]
        readers = consumers.get(dq.output[0], [])
        if readers and all(r.name in tail for r in readers):
            drop += [q, dq]
            rename[dq.output[0]] = q.input[0]
    if not drop:
        return
    for n in drop:
        graph.node.remove(n)
    for n in graph.node:
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
    onnx.save(model, str(path))


def stored_ranges(store: Path | None, model: Path, calib: SampleSet, s: dict) -> Path | None:
    """Where ``store`` keeps the activation ranges of this pre-processed graph (its bytes), these calibration samples
    and this calibration method. The ranges are those of every tensor the calibrator augments, whatever is quantized
    afterwards: float layers, float regions and the op types only decide which tensors get Q/DQ, so every
    mixed-precision and float-island try of a search reuses one calibration (PP-OCRv4's detector: calibration was
    38 of a try's 49 s). A graph that differs (AdaRound's adjusted weights, a fused pre-processing) has another key."""
    if store is None:
        return None
    h = hashlib.sha256()
    with open(model, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    from edgebuild.calibration.histogram import ENTROPY_BINS, PERCENTILE_BINS

    method = [s["calibrate_method"], float(s["percentile"]) if s["calibrate_method"] == "percentile" else None,
              HISTOGRAM_ELEMENTS, MIN_HISTOGRAM_SAMPLES, CALIB_CHUNK]
    if s["calibrate_method"] != "minmax":
        method += ["fixed bins", ENTROPY_BINS, PERCENTILE_BINS]
    h.update(json.dumps([calib.content_hash(), method]).encode())
    return Path(store) / f"ranges-{h.hexdigest()[:40]}.json"


def _store(ranges: Path, kept: Path | None) -> None:
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        part = kept.with_name(f".{kept.name}.{os.getpid()}")
        shutil.copyfile(ranges, part)
        part.replace(kept)  # whole or absent: a try killed mid-copy leaves no half file under the name


def minmax_ranges(model: Path, calib: SampleSet, s: dict, workdir: Path, store: Path | None) -> dict:
    """tensor -> (lo, hi): the min-max ranges of ``model`` over every calibration sample, from the ranges store when
    an earlier try calibrated them (the search's first try is min-max), else calibrated now (and stored)."""
    import numpy as np
    from onnxruntime.quantization.calibrate import load_tensors_data

    kept = stored_ranges(store, model, calib, {**s, "calibrate_method": "minmax"})
    path = kept if kept is not None and kept.is_file() else workdir / "_minmax.json"
    if path != kept:
        calibrate_in_chunks(model, calib, path, workdir)
        _store(path, kept)
    data = load_tensors_data(path)
    found = {k: (float(np.ravel(v.range_value[0])[0]), float(np.ravel(v.range_value[1])[0])) for k, v in data.items()}
    if path != kept:
        path.unlink()
    return found


def calibrate_histograms(model: Path, calib: SampleSet, s: dict, bounds: dict, ranges: Path, workdir: Path) -> None:
    """Percentile, entropy or mean-min-max ranges of every tensor onnxruntime's calibrators read, into ``ranges``
    (JSON), by onnxruntime's own threshold search over fixed-bin histograms bounded by the min-max ``bounds``
    (calibration/histogram.py, the same as arm64's). Not onnxruntime's calibrator: with its defaults (128 bins,
    128 quantized bins) the KL search had exactly one candidate, ``+-max|x|`` (wider than min-max on a ReLU output), so
    "entropy calibration" was min-max or worse; with more bins its collector re-binned chunk by chunk (PP-OCR's text
    classifier: 1 s -> 64 s). A tensor without a histogram (constant, never reached) keeps its min-max range."""
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from edgebuild.calibration.adapters import ort_reader
    from edgebuild.calibration.histogram import Histograms

    # mean_minmax reads each tensor's min and max per sample: the min-max calibrator's graph (ReduceMin/ReduceMax
    # outputs), not every activation value
    method = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
              "mean_minmax": CalibrationMethod.MinMax}[s["calibrate_method"]]
    augmented = workdir / "_augmented.onnx"
    calibrator = create_calibrator(model, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                   augmented_model_path=str(augmented), calibrate_method=method)
    histograms = Histograms(s["calibrate_method"], {k: max(abs(lo), abs(hi)) for k, (lo, hi) in bounds.items()},
                            float(s["percentile"]))
    try:  # the calibrator only for its augmented graph (every tensor it reads is an output) and session
        session = calibrator.infer_session
        names = [o.name for o in session.get_outputs()]
        reduced = method == CalibrationMethod.MinMax
        read = {n[:-len("_ReduceMin")] for n in names if n.endswith("_ReduceMin")} if reduced \
            else calibrator.tensors_to_calibrate
        wanted = set(read) & set(bounds)
        reader = ort_reader(calib)
        while (feeds := reader.get_next()) is not None:
            values = dict(zip(names, session.run(None, feeds)))
            if reduced:  # a sample's min and max of each tensor, as one array
                values = {t: np.array([values[f"{t}_ReduceMin"], values[f"{t}_ReduceMax"]])
                          for t in wanted if f"{t}_ReduceMin" in values and f"{t}_ReduceMax" in values}
            histograms.add({n: v for n, v in values.items() if n in wanted})
    finally:
        del calibrator
        augmented.unlink(missing_ok=True)
        for leftover in workdir.glob("_augmented.onnx*"):
            leftover.unlink()
    found = {**bounds, **histograms.ranges()}
    save_tensors_data(TensorsData(method, {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                                           for k, (lo, hi) in found.items()}), ranges)


def calibrate_in_chunks(model: Path, calib: SampleSet, ranges: Path, workdir: Path) -> None:
    """Min-max activation ranges over every calibration sample, CALIB_CHUNK samples at a time, into ``ranges``
    (JSON): onnxruntime's calibrator keeps each sample's tensors until the ranges are computed, and its
    ``collect_data`` merges into what earlier calls collected, so chunks bound the memory and give the same ranges.
    (Not ``CalibMaxIntermediateOutputs``: in onnxruntime 1.32 it clears collected outputs without merging them,
    silently calibrating on the last few samples only.)
    """
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from edgebuild.calibration.adapters import ort_reader

    augmented = workdir / "_augmented.onnx"
    calibrator = create_calibrator(model, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                   augmented_model_path=str(augmented), calibrate_method=CalibrationMethod.MinMax)
    try:
        for start in range(0, len(calib), CALIB_CHUNK):
            calibrator.collect_data(ort_reader(calib.subset(np.arange(start, min(start + CALIB_CHUNK, len(calib))))))
        save_tensors_data(calibrator.compute_data(), ranges)
    finally:
        del calibrator
        augmented.unlink(missing_ok=True)
        for leftover in workdir.glob("_augmented.onnx*"):
            leftover.unlink()


def histogram_samples(model: Path, calib: SampleSet) -> SampleSet:
    """The calibration samples a histogram method reads: all, or a random part whose activation values stay within
    HISTOGRAM_ELEMENTS (never fewer than MIN_HISTOGRAM_SAMPLES)."""
    from edgebuild.calibration.budget import activation_elements, at_most

    per = activation_elements(model)
    if not per:
        return calib
    limit = max(MIN_HISTOGRAM_SAMPLES, HISTOGRAM_ELEMENTS // per)
    return at_most(calib, limit) if limit < len(calib) else calib
