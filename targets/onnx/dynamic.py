"""Dynamic INT8 with onnxruntime (``quantize_dynamic``): int8 weights of MatMul/Gemm, embedding tables and LSTMs,
activations quantized per call. No calibration."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.errors import ConversionError
from edgebuild.targets.onnx.prepare import prepared, weights_by_op


# onnxruntime's dynamic INT8 (quantize_dynamic; ORT's CPU recipe for BERT-class and LSTM models, as Optimum's and
# Olive's CPU configs): the ops with a fast integer kernel and a weight: MatMul with a constant B (MatMulInteger, fused
# to DynamicQuantizeMatMul at load), an embedding table (Gather of a constant: int8 table, DequantizeLinear after it)
# and LSTM (DynamicQuantizeLSTM). A Gemm with a constant B is rewritten as MatMul + Add first; Conv stays float
# (ConvInteger has no fast kernel). MiniLM-L3 (3 x 384): pooled-embedding cosine mean 0.9947 / worst 0.9915,
# 2.2x faster than FP32; static QDQ on the same ops: mean 0.947.
DYNAMIC_OPS = ("MatMul", "Gather", "LSTM")
# the dynamic candidate is offered when these ops hold at least this share of the graph's weights: the share an
# artifact needs to be named _int8 (pipeline/stages/weights.py INT8_NAME_SHARE). Below it the candidate would leave the
# convolutions float (a CNN whose dense head holds 59 % of the weights: dynamic INT8 is no INT8 model of it)
DYNAMIC_SHARE = 0.9


def dynamic_share(onnx_path: Path) -> float:
    """The share of the graph's weights in the layers dynamic INT8 quantizes (DYNAMIC_OPS and constant-B Gemm)."""
    import onnx

    found = weights_by_op(onnx.load(str(onnx_path), load_external_data=False).graph)
    total = sum(n for _, n, _ in found)
    return sum(n for op, n, _ in found if op in (*DYNAMIC_OPS, "Gemm")) / total if total else 0.0


def quantize_int8_dynamic(src: Path, out: Path, s: dict, workdir: Path) -> list[str]:
    """INT8 with activations quantized per call (onnxruntime ``quantize_dynamic``) on DYNAMIC_OPS, the search's
    candidate for graphs whose weights sit in MatMul/Gemm, LSTM and embedding tables. No calibration."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = prepared(src, workdir, keep_names=True)  # no fusion: node names stay the FP32 graph's
    model = onnx.load(str(pre))
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    gemms = _gemm_as_matmul(model.graph)
    excluded = {*s.get("nodes_to_exclude", ()), *s.get("float_layers", ())}
    if s.get("float_regions", True):
        from edgebuild.targets.regions import float_regions

        onnx.save(model, str(pre))
        excluded |= {n for v in float_regions(pre).values() for n in v}
    nodes = [n.name for op, _, n in weights_by_op(model.graph) if op in DYNAMIC_OPS and n.name not in excluded]
    if not nodes:
        raise ConversionError("dynamic INT8: no MatMul, Gemm, LSTM or embedding Gather with constant weights to quantize")
    onnx.save(model, str(pre))
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    quantize_dynamic(str(pre), str(out), op_types_to_quantize=list(DYNAMIC_OPS), nodes_to_quantize=nodes,
                     per_channel=bool(s["per_channel"]), reduce_range=bool(s["reduce_range"]),
                     weight_type=types[s["weight_type"]], extra_options={"MatMulConstBOnly": True})
    pre.unlink()
    for leftover in workdir.glob("*.onnx.data"):
        leftover.unlink()
    counts = {op: sum(1 for o, _, n in weights_by_op(model.graph) if o == op and n.name in nodes) for op in DYNAMIC_OPS}
    return [f"dynamic INT8 (onnxruntime quantize_dynamic): {counts['MatMul']} MatMul/Gemm, {counts['Gather']} embedding "
            f"Gather, {counts['LSTM']} LSTM layer(s) with int8 weights "
            f"({'per channel' if s['per_channel'] else 'per tensor'}), activations quantized per call"
            + (f"; {gemms} Gemm rewritten as MatMul + Add" if gemms else "") + "; Conv and the other ops float"]


def quantize_dynamic_all(src: Path, out: Path, workdir: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = prepared(src, workdir)
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    pre.unlink()


def recurrent_layers(path: Path) -> list[str]:
    """The named LSTM nodes of an ONNX model: the recurrent layers onnxruntime has an int8 kernel for."""
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "LSTM" and n.name]


def quantize_recurrent(path: Path, s: dict, workdir: Path) -> list[str]:
    """LSTM layers (which static QDQ leaves in float) with int8 weights: onnxruntime's DynamicQuantizeLSTM (weights
    int8 per tensor, activations quantized at run time). A 3-layer LSTM of 128: 3.7x smaller, output cosine
    0.9999995. GRU/RNN have no such kernel in onnxruntime and stay float (the INT8 weight share says so)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = {*s.get("nodes_to_exclude", ()), *s.get("float_layers", ())}
    lstms = [n for n in recurrent_layers(path) if n not in excluded]
    if not lstms:
        return []
    tmp = workdir / "_recurrent.onnx"
    quantize_dynamic(str(path), str(tmp), op_types_to_quantize=["LSTM"], nodes_to_quantize=lstms,
                     weight_type=QuantType.QInt8)
    tmp.replace(path)
    return [f"{len(lstms)} LSTM layer(s) with int8 weights (onnxruntime DynamicQuantizeLSTM; static QDQ leaves "
            "recurrent layers float)"]


def _gemm_as_matmul(graph) -> int:
    """Each Gemm with a constant B (and no transA) as MatMul (+ Add of beta*C): onnxruntime's dynamic quantization
    has no Gemm kernel. The MatMul keeps the Gemm's name (float layers are named by the FP32 graph's nodes)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    done = 0
    for idx, n in reversed(list(enumerate(graph.node))):
        if n.op_type != "Gemm" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if a.get("transA", 0):
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) * float(a.get("alpha", 1.0))
        if a.get("transB", 0):
            w = w.T
        wname = f"{n.input[1]}_as_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), wname))
        y = n.output[0]
        new = [helper.make_node("MatMul", [n.input[0], wname], [y if len(n.input) < 3 or not n.input[2] else y + "_mm"],
                                name=n.name or f"gemm_{idx}")]
        if len(n.input) > 2 and n.input[2]:
            c = n.input[2]
            beta = float(a.get("beta", 1.0))
            if beta != 1.0 and c in inits:
                cname = f"{c}_beta"
                graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[c]) * np.float32(beta), cname))
                c = cname
            elif beta != 1.0:
                continue
            new.append(helper.make_node("Add", [y + "_mm", c], [y], name=f"{new[0].name}_bias"))
        del graph.node[idx]
        for k, m in enumerate(new):
            graph.node.insert(idx + k, m)
        done += 1
    return done
