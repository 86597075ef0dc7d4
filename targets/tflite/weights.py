"""How much of a ``.tflite`` really is INT8: the weights of its weighted ops, counted by storage type.

The TFLite side of pipeline/stages/weights.py's ``weight_share``: the weights counted are the constant operands of
the ops that carry them (CONV_2D, CONV_3D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV, FULLY_CONNECTED, BATCH_MATMUL, the fused
sequence LSTM/RNN ops, an embedding GATHER's table), found back through a DEQUANTIZE (FP16 or dynamic-range storage
is not INT8). Each buffer counts once (an unrolled LSTM's steps share theirs). Biases, scales and shapes are not
weights (constants under ``MIN_WEIGHT`` elements, and int32/int64 tensors, are left out).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MIN_WEIGHT = 16
WEIGHTED = {"CONV_2D": (1,), "CONV_3D": (1,), "DEPTHWISE_CONV_2D": (1,), "TRANSPOSE_CONV": (1,),
            "FULLY_CONNECTED": (1,), "BATCH_MATMUL": (0, 1), "GATHER": (0,), "EMBEDDING_LOOKUP": (1,),
            "UNIDIRECTIONAL_SEQUENCE_LSTM": tuple(range(1, 9)), "BIDIRECTIONAL_SEQUENCE_LSTM": tuple(range(1, 18)),
            "UNIDIRECTIONAL_SEQUENCE_RNN": (1, 2), "SVDF": (1, 2)}


def weight_counts(path: Path) -> list[tuple[int, bool, str]]:
    """``(elements, stored in 8 bits or fewer, op output name)`` per weight buffer of the main graph."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    small = {schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT4}
    skip = {schema.TensorType.INT32, schema.TensorType.INT64, schema.TensorType.BOOL}
    graph = model.subgraphs[0]
    producer = {int(t): op for op in graph.operators for t in op.outputs}

    def constant(t: int, depth: int = 0) -> int | None:
        """The tensor holding ``t``'s data: ``t`` itself, or what a DEQUANTIZE reads (FP16/dynamic-range storage)."""
        tensor = graph.tensors[t]
        data = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
        if data is not None and len(data):
            return t
        op = producer.get(t)
        if op is None or depth > 2 or not len(op.inputs):
            return None
        code = model.operatorCodes[op.opcodeIndex]
        if names.get(max(code.builtinCode, code.deprecatedBuiltinCode)) != "DEQUANTIZE":
            return None
        return constant(int(op.inputs[0]), depth + 1)

    seen: set[int] = set()
    out = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        for i in WEIGHTED.get(names.get(max(code.builtinCode, code.deprecatedBuiltinCode), ""), ()):
            if i >= len(op.inputs) or op.inputs[i] < 0:
                continue
            t = constant(int(op.inputs[i]))
            if t is None:
                continue
            tensor = graph.tensors[t]
            size = int(np.prod(tensor.shape)) if tensor.shape is not None and len(tensor.shape) else 1
            if tensor.buffer in seen or size < MIN_WEIGHT or tensor.type in skip:
                continue
            seen.add(tensor.buffer)
            name = graph.tensors[int(op.outputs[0])].name if len(op.outputs) else tensor.name
            out.append((size, tensor.type in small, name.decode(errors="replace") if isinstance(name, bytes) else str(name)))
    return out
