"""How much of an artifact really is INT8: the share of the weighted layers' weights stored in 8 bits or fewer and
run by an int8 layer (a float layer's weights stored int8 by weight-only INT8, targets/weight_only.py, are counted
apart: smaller, not INT8 compute).

A file named ``_int8`` whose LSTM (95 % of the weights) stayed float is INT8 in name only. The weights counted are
those of the layers that carry them — Conv/ConvTranspose/Gemm/MatMul (the initializer side), LSTM/GRU/RNN (W and R),
and an embedding Gather's table — found back from each such layer through the ops a quantizer puts on a weight
(DequantizeLinear, Convert, scale Multiply, Reshape, Transpose...). Biases, scales and shapes are not weights.
The MAC share (multiply-accumulates in int8 kernels) is not measured: it needs shapes per layer on every runtime.

``INT8_NAME_SHARE``: an artifact is named ``_int8`` only when at least this share of its weights is INT8, else
``_int8_mixed`` (``rename_to_share``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.specs import Precision

INT8_NAME_SHARE = 0.9
MIN_WEIGHT = 16  # constants smaller than this are scales, zero points or shapes, not weights
_ONNX_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "LSTM": (1, 2),
                       "GRU": (1, 2), "RNN": (1, 2), "Gather": (0,), "DynamicQuantizeLSTM": (1, 2),
                       "MatMulInteger": (1,), "ConvInteger": (1,), "QLinearConv": (3,), "QLinearMatMul": (3,),
                       "DynamicQuantizeMatMul": (1,), "MatMulIntegerToFloat": (1,), "QGemm": (3,)}
# Mul: an int8 weight scaled per channel after a Cast (weight-only INT8 before opset 13, targets/onnx/weight_only.py)
_ONNX_PASS = ("DequantizeLinear", "Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "QuantizeLinear",
              "Mul")
_INT_TYPES_ONNX = {2, 3, 22, 21, 4, 5}  # uint8, int8, int4, uint4, uint16, int16 (TensorProto)


def weight_share(path: Path, backend: str) -> dict | None:
    """{int8_weights, float_weights, int8_weight_share, float_layers: [up to 5 largest float layers]} or None when this
    backend's format is not read here."""
    try:
        if path.suffix == ".onnx":
            counts = _onnx_counts(path)
        else:  # a format its backend reads (Backend.weight_counts)
            from edgebuild.targets.base import get_backend

            counts = get_backend(backend).weight_counts(path)
            if counts is None:
                return None
    except Exception as e:  # noqa: BLE001 — a measurement, not the build: say why it is missing
        return {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    # (elements, stored in 8 bits or fewer, layer[, weight-only: stored int8 for a layer that computes in float])
    only = sum(c[0] for c in counts if c[1] and len(c) > 3 and c[3])
    int8 = sum(c[0] for c in counts if c[1]) - only
    flt = sum(c[0] for c in counts if not c[1])
    total = int8 + flt + only
    biggest = sorted(((c[0], c[2]) for c in counts if not c[1] or (len(c) > 3 and c[3])), reverse=True)[:5]
    return {"int8_weights": int(int8), "float_weights": int(flt), "weight_only_weights": int(only),
            "int8_weight_share": round(int8 / total, 4) if total else None,
            "stored_int8_share": round((int8 + only) / total, 4) if total else None,
            "float_layers": [{"layer": name, "weights": int(n)} for n, name in biggest],
            "method": "weights of the weighted layers (Conv, MatMul/Gemm, LSTM/GRU/RNN, embedding Gather) that run in "
                      "int8 layers; a float layer's weights stored int8 (weight-only INT8) are counted apart "
                      "(weight_only_weights; stored_int8_share counts them as INT8 storage); biases, scales and "
                      "shapes excluded"}


def _onnx_counts(path: Path) -> list[tuple[int, bool, str, bool]]:
    import onnx

    from edgebuild.targets.weight_only import MARK

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute
              and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    producer = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    out = []

    def find(tensor: str, depth: int = 0):
        t = inits.get(tensor) or consts.get(tensor)
        if t is not None:
            return tensor, t
        node = producer.get(tensor)
        if node is None or depth > 6 or node.op_type not in _ONNX_PASS or not node.input:
            return None
        return find(node.input[0], depth + 1)

    for node in graph.node:
        for i in _ONNX_WEIGHT_INPUTS.get(node.op_type, ()):
            if i >= len(node.input) or not node.input[i]:
                continue
            hit = find(node.input[i])
            if hit is None or hit[0] in seen:
                continue
            name, t = hit
            size = int(np.prod(t.dims)) if len(t.dims) else 1
            if size < MIN_WEIGHT or t.data_type in (6, 7, 9):  # int32/int64/bool: indices, shapes
                continue
            seen.add(name)
            out.append((size, t.data_type in _INT_TYPES_ONNX, node.name or name, name.endswith("." + MARK)))
    return out


def rename_to_share(art, share: dict | None) -> str | None:
    """``_int8`` -> ``_int8_mixed`` for an artifact whose INT8 weight share is below INT8_NAME_SHARE (files renamed in
    place, ``art.main``/``art.files`` updated). Returns the note, or None when the name already tells the truth."""
    s = (share or {}).get("int8_weight_share")
    if art.precision != Precision.INT8 or s is None or s >= INT8_NAME_SHARE or "_int8_mixed" in art.main or "_int8" not in art.main:
        return None
    renamed = {}
    for f in art.files:
        new = f.replace("_int8", "_int8_mixed", 1) if "_int8" in f and "_int8_mixed" not in f else f
        if new != f:
            (art.directory / f).rename(art.directory / new)
        renamed[f] = new
    old = art.main
    art.files = [renamed[f] for f in art.files]
    art.main = renamed.get(art.main, art.main)
    note = (f"named {art.main}, not {old}: only {s:.0%} of the weights are INT8 (< {INT8_NAME_SHARE:.0%}); "
            + ", ".join(f"{x['layer']} ({x['weights']})" for x in share.get("float_layers", [])[:3]) + " stay float")
    art.notes.append(note)
    return note
