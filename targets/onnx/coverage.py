"""What onnxruntime's CPU provider runs as int8 kernels in a quantized model, and what it runs in float between them.

A QDQ file says which tensors are quantized; what runs is what onnxruntime's QDQ fusions make of it (DQ -> Conv -> Q
becomes a QLinearConv; an op without an int8 kernel stays float between a DequantizeLinear and a QuantizeLinear).
Each float op in an INT8 model costs a dequantize and a quantize besides its own work: on PaddleOCR's orientation
classifier 28 float HardSigmoid chains took as long as every int8 conv (targets/onnx/hard_gates.py). The count comes
from the graph onnxruntime optimizes at load (its extended level: the QDQ fusions), not from the file.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

# onnxruntime's integer kernels (the QLinear* family counts too)
INT8_KERNELS = {"QGemm", "QAttention", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeLSTM",
                "DynamicQuantizeMatMul", "QEmbedLayerNormalization", "QOrderedMatMul"}
BOUNDARY = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# ops that move or select data (run on int8 tensors as they are), never counted as float compute
LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Gather", "GatherElements", "Concat",
          "Split", "Slice", "Identity", "Cast", "Constant", "Expand", "ConstantOfShape", "Range", "MaxPool", "Resize",
          "Pad", "DepthToSpace", "SpaceToDepth", "Tile", "Size", "NonZero", "ArgMax", "TopK", "If", "Loop"}


def runtime_ops(path: Path) -> dict:
    """{"int8": n, "float": m, "float_ops": {op type: count}} of the model onnxruntime runs for ``path``."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgebuild-ortopt-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node)
    int8 = sum(c for t, c in ops.items() if t.startswith("QLinear") or t in INT8_KERNELS)
    floats = {t: c for t, c in ops.most_common() if not (t.startswith("QLinear") or t in INT8_KERNELS or t in BOUNDARY
                                                          or t in LAYOUT)}
    return {"int8": int8, "float": sum(floats.values()), "float_ops": floats}


MAX_BYTES = 1 << 30  # onnxruntime writes an optimized model in one protobuf (< 2 GB): larger models get no count


def coverage_note(path: Path) -> str | None:
    """One line for the artifact's notes: the int8 kernels onnxruntime runs and the float ops between them."""
    if Path(path).stat().st_size > MAX_BYTES:
        return None
    found = runtime_ops(path)
    if not found["float"]:
        return f"onnxruntime runs {found['int8']} int8 kernel(s) and no float op between them"
    listed = ", ".join(f"{t} x{c}" for t, c in list(found["float_ops"].items())[:6])
    more = ", ..." if len(found["float_ops"]) > 6 else ""
    return (f"onnxruntime runs {found['int8']} int8 kernel(s) and {found['float']} op(s) without one, in float "
            f"({listed}{more})")
