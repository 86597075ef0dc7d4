"""The INT8 share of an OpenVINO IR's weights (pipeline/stages/weights.py asks ``Backend.weight_counts``): the
constants feeding each weighted layer, found back through the ops a quantizer puts on a weight (Convert, scale
Multiply, Subtract, Reshape...), and their element types."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MIN_WEIGHT = 16  # constants smaller than this are scales, zero points or shapes, not weights
WEIGHTED = {"Convolution": (1,), "GroupConvolution": (1,), "ConvolutionBackpropData": (1,),
            "GroupConvolutionBackpropData": (1,), "MatMul": (0, 1), "LSTMSequence": (4, 5), "GRUSequence": (4, 5),
            "RNNSequence": (4, 5), "LSTMCell": (3, 4), "GRUCell": (2, 3), "Gather": (0,)}
PASS = ("Convert", "Multiply", "Subtract", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "FakeQuantize")


def weight_counts(path: Path) -> list[tuple[int, bool, str, bool]]:
    """``(elements, stored in 8 bits or fewer, operation name, weight-only)`` per weight constant: weight-only means
    stored int8 by targets/openvino_weight_only.py for an operation that computes in float."""
    from edgebuild.targets.weight_only import MARK

    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    layers = {}
    for layer in root.iter("layer"):
        data = layer.find("data")
        layers[layer.get("id")] = (layer.get("type"), layer.get("name"), data.attrib if data is not None else {})
    into: dict[tuple[str, str], str] = {}  # (to layer, to port) -> from layer
    for e in root.iter("edge"):
        into[(e.get("to-layer"), e.get("to-port"))] = e.get("from-layer")
    ports: dict[str, list[str]] = {}
    for layer in root.iter("layer"):
        inp = layer.find("input")
        ports[layer.get("id")] = [p.get("id") for p in inp.findall("port")] if inp is not None else []

    def consts(lid: str, depth: int = 0) -> list[tuple[int, str, str, bool]]:
        typ, name, data = layers[lid]
        if typ == "Const":
            shape = [int(d) for d in data.get("shape", "").split(",") if d.strip()]
            return [(int(np.prod(shape)) if shape else 1, data.get("element_type", ""), lid, name.endswith("/" + MARK))]
        if typ not in PASS or depth > 6:
            return []
        found = []
        for p in ports[lid]:
            src = into.get((lid, p))
            if src is not None:
                found += consts(src, depth + 1)
        return found

    seen: set[str] = set()
    out = []
    for lid, (typ, name, _) in layers.items():
        for i in WEIGHTED.get(typ, ()):
            if i >= len(ports[lid]):
                continue
            src = into.get((lid, ports[lid][i]))
            if src is None:
                continue
            found = [c for c in consts(src) if c[0] >= MIN_WEIGHT and c[1] not in ("i32", "i64", "boolean")]
            if not found:
                continue
            size, etype, cid, weight_only = max(found)
            if cid in seen:
                continue
            seen.add(cid)
            out.append((size, etype in ("i8", "u8", "i4", "u4", "nf4"), name, weight_only))
    return out
