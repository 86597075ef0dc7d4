"""Weight-only INT8 for the operations an OpenVINO INT8 IR keeps in float (NNCF's ignored scope: the search's float
layers, float regions), as targets/onnx/weight_only.py does for ONNX Runtime (the shared part: targets/weight_only.py):
the weight stored int8 per output channel behind a Convert and a scale Multiply (OpenVINO's weight decompression
pattern), the operation computing in float. Taken where it costs nothing measurable (``Check``, ``choose``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.targets.weight_only import (
    CHECK_SAMPLES, MARK, MAX_LOSS_DB, MIN_ELEMENTS, Check, choose, quantized, rounding_error, weight_only_note)

SUFFIX = "/" + MARK  # the name of the int8 weight constants written here (mark_decompression finds them by it)
# operation type -> (weight input port, the output-channel axis of that weight); MatMul: by transpose_b
_WEIGHTS = {"Convolution": ((1, 0),), "GroupConvolution": ((1, 0),), "ConvolutionBackpropData": ((1, 1),),
            "LSTMSequence": ((4, 1), (5, 1)), "GRUSequence": ((4, 1), (5, 1)), "RNNSequence": ((4, 1), (5, 1))}


def float_weights(ov_model) -> list[tuple[object, int, np.ndarray]]:
    """(the constant's output, channel axis, weight) for each f32 Constant weight read directly by weighted operations
    (NNCF's quantized weights reach theirs through a FakeQuantize); a constant shared by several (Basic Pitch's
    constant-Q kernels, one per octave) once, when every reader reads it as a weight with the same channel axis."""
    readers: dict = {}  # the constant's output -> [(operation, port, axis)]
    for op in ov_model.get_ordered_ops():
        kind = op.get_type_name()
        spec = _WEIGHTS.get(kind, ())
        if kind == "MatMul":
            spec = ((1, 0 if op.get_attributes().get("transpose_b") else -1),)
        for port, axis in spec:
            if port >= op.get_input_size():
                continue
            src = op.input_value(port)
            node = src.get_node()
            if node.get_type_name() == "Constant" and node.get_element_type().get_type_name() == "f32":
                readers.setdefault(src, []).append((op, port, axis))
    out = []
    for src, uses in readers.items():
        w = src.get_node().get_data()
        if w.size < MIN_ELEMENTS or w.ndim == 0 or len(src.get_target_inputs()) != len(uses) \
                or len({axis % w.ndim for _, _, axis in uses}) != 1:
            continue
        out.append((src, uses[0][2] % w.ndim, np.array(w, dtype=np.float32)))
    return out


def int8_weights(ov, ov_model, calib: SampleSet, config: dict, source: str | None = None,
                 max_loss_db: float = MAX_LOSS_DB) -> list[str]:
    """The float operations' weights of ``ov_model`` int8 (in place) where that costs nothing measurable
    (targets/weight_only.py ``Check``, ``choose``); the notes. ``config``: the CPU plugin properties the IR is run
    with (f32 inference precision); ``source``: the FP32 ONNX model (run by ONNX Runtime for the reference)."""
    from edgebuild.calibration.budget import at_most

    found = float_weights(ov_model)
    if not found:
        return []
    found.sort(key=lambda c: rounding_error(c[2], c[1]))
    feeds = list(at_most(calib, CHECK_SAMPLES).feeds())
    core = ov.Core()
    check = Check(_run(core, ov_model, feeds, config), _fp32(source, feeds) if source else None, max_loss_db)

    def judge(chosen):
        undo = [_replace(ov, src, axis, w) for src, axis, w in chosen]
        try:
            return check.judge(_run(core, ov_model, feeds, config))
        finally:
            for restore in undo:
                restore()

    taken = choose(found, judge)
    if not taken:
        return [f"weight-only INT8 not taken: the float operations' weights in int8 cost more than {max_loss_db:g} dB "
                "of the artifact's output SQNR"]
    verdict = judge(taken)
    for src, axis, w in taken:
        _replace(ov, src, axis, w)
    return [weight_only_note(len(taken), len(found), sum(c[2].size for c in taken), verdict)]


def _fp32(source: str, feeds: list[dict]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return [session.run(None, f) for f in feeds]


def _replace(ov, src, axis: int, w: np.ndarray):
    """Constant(i8) -> Convert(f32) -> Multiply(scale) in place of the f32 constant ``src`` for every reader; returns
    what puts the f32 one back."""
    opset = ov.opset13
    q, scale = quantized(w, axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    name = src.get_node().get_friendly_name()
    const = opset.constant(q, dtype=np.int8, name=f"{name}{SUFFIX}")
    decompressed = opset.multiply(opset.convert(const, "f32"),
                                  opset.constant(scale.reshape(shape), dtype=np.float32), name=f"{name}/dequantized")
    readers = list(src.get_target_inputs())
    for r in readers:
        r.replace_source_output(decompressed.output(0))

    def undo():
        for r in readers:
            r.replace_source_output(src)
    return undo


def mark_decompression(xml: Path) -> int:
    """Mark the Converts of the int8 weights written here as weight decompression in the saved IR (the attribute an
    FP16 IR's Converts carry; OpenVINO's Python API cannot set it). Unmarked, the CPU plugin's low-precision pipeline
    keeps i8 -> Convert -> Multiply as a dequantization for an int8 kernel, and a float LSTMSequence, which wants a
    Constant weight, fails to compile ("expects Constant for port 4"); marked, the plugin folds it at load. Returns
    how many were marked."""
    import xml.etree.ElementTree as ET

    from edgebuild.targets.base import replace_file

    tree = ET.parse(xml)
    root = tree.getroot()
    layers = {layer.get("id"): layer for layer in root.iter("layer")}
    ours = {lid for lid, layer in layers.items()
            if layer.get("type") == "Const" and layer.get("name", "").endswith(SUFFIX)}
    marked = 0
    for edge in root.iter("edge"):
        target = layers.get(edge.get("to-layer"))
        if edge.get("from-layer") not in ours or target is None or target.get("type") != "Convert":
            continue
        rt = target.find("rt_info")
        if rt is None:
            rt = ET.Element("rt_info")
            target.insert(0 if target.find("data") is None else 1, rt)
        if not any(a.get("name") == "decompression" for a in rt.findall("attribute")):
            ET.SubElement(rt, "attribute", name="decompression", version="0")
            marked += 1
    if marked:
        replace_file(xml, ET.tostring(root, encoding="utf-8", xml_declaration=True))
    return marked


def _run(core, ov_model, feeds: list[dict], config: dict) -> list[list[np.ndarray]]:
    compiled = core.compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    out = []
    for f in feeds:
        result = request.infer(f)
        out.append([np.array(result[o]) for o in compiled.outputs])
    return out
