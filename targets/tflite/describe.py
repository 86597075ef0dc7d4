"""What a converted .tflite holds: its signature I/O, builtin ops and versions, min_runtime_version, and the ops of the
main graph that still touch a float tensor (the full-integer check, targets/tflite/mixed.py ``check_integer``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def describe_tflite(path: Path) -> dict:
    """Signature I/O details, the builtin ops with their versions, and the model's min_runtime_version."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # no delegate, no allocation: LiteRT prepares no kernel here, so a graph that aborts it (an int8 ADD whose
    # rescaling it cannot express) is still described, and the isolated load check names the op (xnnpack.py)
    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    runner = it.get_signature_runner()

    def io(details: dict) -> dict:
        out = {}
        for key, d in details.items():
            scale, zp = d["quantization"]
            quantized = d["dtype"] in (np.int8, np.uint8, np.int16)
            out[key] = {"shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                        "scale": float(scale) if quantized else None, "zero_point": int(zp) if quantized else None}
        return out

    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = sorted({f"{names.get(max(c.builtinCode, c.deprecatedBuiltinCode), c.customCode)} v{c.version}"
                  for c in model.operatorCodes})
    meta = {"float_ops": _float_ops(model, names)}
    for m in model.metadata or []:
        data = model.buffers[m.buffer].data
        if m.name == b"min_runtime_version" and data is not None:
            meta["min_runtime_version"] = bytes(data).rstrip(b"\0").decode(errors="replace")
    return {"inputs": io(runner.get_input_details()), "outputs": io(runner.get_output_details()), "ops": ops, **meta}


def _float_ops(model, names: dict) -> list[str]:
    """Ops of the main graph that touch a float tensor other than the model's own inputs and outputs:
    ``{"op": type, "outputs": [output tensor names]}``."""
    from ai_edge_litert import schema_py_generated as schema

    graph = model.subgraphs[0]
    floating = {schema.TensorType.FLOAT32, schema.TensorType.FLOAT16}
    edges = set(graph.inputs) | set(graph.outputs)
    inner = {i for i, t in enumerate(graph.tensors) if t.type in floating and i not in edges}
    ops = []
    for op in graph.operators:
        if inner & ({int(i) for i in op.inputs if i >= 0} | {int(i) for i in op.outputs}):
            code = model.operatorCodes[op.opcodeIndex]
            ops.append({"op": names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM"),
                        "outputs": [tensor_name(graph.tensors[int(i)].name) for i in op.outputs]})
    return ops


def tensor_name(name) -> str:
    """A flatbuffer tensor name as text."""
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
