"""TFLite mixed precision: keep the accuracy search's float layers (ONNX node names) in float.

onnx2tf does not name Keras layers after ONNX nodes, but it keeps a map from ONNX tensor names to Keras
tensors: a node's layers are those between its inputs and its outputs. TFLite ops are matched to those
layers through their output tensor names, and the MLIR quantizer leaves exactly those ops in float
(``denylisted_nodes``, what tf.lite.experimental.QuantizationDebugger does). Runs inside the conversion
child process (targets/tflite/convert.py).
"""
from __future__ import annotations

import re
from pathlib import Path

AUTO_FLOAT = "(kept in float by the converter)"  # the float_ops_requested key of ops no ONNX layer asked for
TRANSFORMER_FLOAT = "(transformer: LayerNorm, Softmax, GELU)"  # ... and of a transformer's (targets/tflite/transformer.py)
TAIL_FLOAT = "(post-processing tail)"  # ... and of a detector's decode tail (targets/tflite/tail.py)
FRONT_FLOAT = "(signal-processing front-end)"  # ... and of a spectrogram built from ops (targets/tflite/tail.py)


class ConversionFailure(Exception):
    def __init__(self, stage: str, message: str, op: str | None = None, ops: list[dict] | None = None):
        super().__init__(message)
        self.stage, self.op = stage, op
        self.ops = ops or []  # the TFLite ops at fault, {"op": type, "outputs": [tensor names]}


def float_layer_map(km, tensors: dict, onnx_path: str, names: list[str]) -> dict[str, list[str]]:
    """The Keras layers onnx2tf made for each ONNX node of ``names``: those that compute the node's outputs
    from its inputs (a Conv's Pad, convolution and bias Add). A name that is not an ONNX node fails."""
    import onnx

    nodes = {n.name: n for n in onnx.load(onnx_path, load_external_data=False).graph.node}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise ConversionFailure("float layers", f"float_layers not in the model: {', '.join(missing)} "
                                                f"(nodes include {', '.join(list(nodes)[:4])}, ...)")

    def keras(name: str):
        t = tensors.get(name.replace(":", "__"))  # onnx2tf's sanitized tensor names
        return t if hasattr(t, "_keras_history") else None

    return {n: sorted(_layers_behind([keras(o) for o in nodes[n].output]) - _layers_behind([keras(i) for i in nodes[n].input]))
            for n in names}


def region_layers(km, tensors: dict, nodes: list) -> list[str]:
    """The Keras layers onnx2tf made for a region of ONNX nodes (NodeProtos, named or not): those between the tensors
    entering the region and the region's outputs."""
    def keras(name: str):
        t = tensors.get(name.replace(":", "__"))
        return t if hasattr(t, "_keras_history") else None

    made = {o for n in nodes for o in n.output}
    entering = {i for n in nodes for i in n.input if i and i not in made}
    return sorted(_layers_behind([keras(o) for o in made]) - _layers_behind([keras(i) for i in entering]))


def _layers_behind(keras_tensors) -> set[str]:
    """Names of the Keras layers that the given tensors are computed by, transitively."""
    seen, stack = set(), [t for t in keras_tensors if t is not None]
    while stack:
        layer, index, _ = stack.pop()._keras_history
        if layer.name not in seen:
            seen.add(layer.name)
            stack.extend(layer._inbound_nodes[index].keras_inputs)
    return seen


def tflite_ops_of(model: bytes, km, layer_map: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Per ONNX node: the TFLite ops built from its Keras layers, ``{"op": type, "tensor": output name}``.

    TFLite names an op's output after the TF ops fused into it (``model/tf.nn.relu_1/Relu;model/
    tf.math.add_1/Add;model/tf.nn.convolution_1/convolution;...``); a model output is named after the
    signature instead (``PartitionedCall:0``), so it is matched through the Keras model's outputs.
    """
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    tensor_names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    signature = it.get_signature_runner().get_output_details()
    output_layer = {signature[key]["index"]: t._keras_history[0].name
                    for key, t in zip(km.output_names, km.outputs) if key in signature}
    prefix = km.name + "/"

    def layers(index: int) -> set[str]:
        found = {output_layer[index]} if index in output_layer else set()
        for segment in tensor_names[index].split(";"):
            if segment.startswith(prefix):
                found |= {name for name in _all_layers(km) if segment[len(prefix):].startswith(name + "/")
                          or segment[len(prefix):] == name}
        return found

    ops = [(op, set().union(*(layers(int(i)) for i in op["outputs"]))) for op in it._get_ops_details()]
    return {node: [{"op": op["op_name"], "tensor": tensor_names[int(o)]} for op, found in ops if found & set(wanted)
                   for o in op["outputs"]] for node, wanted in layer_map.items()}


def ops_of_types(model: bytes, types) -> list[dict]:
    """Every op of the given TFLite op types, ``{"op": type, "tensor": output name}`` per output.

    The MLIR quantizer is not deterministic on unrolled LSTMs: the same inputs leave a different subset of the gate
    SPLITs in float from one run to the next, so keeping the ones one run named in float and converting again met
    other float SPLITs, until the repairs ran out ("1 op(s) still run in float (SPLIT)", exit 3, about one build in
    six). An op type with no int8 kernel in one place has none anywhere: the repair keeps the whole type float."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    wanted = set(types)
    return [{"op": op["op_name"], "tensor": names[int(o)]} for op in it._get_ops_details()
            if op["op_name"] in wanted for o in op["outputs"]]


OUTLIER_RATIO = 8.0  # an output range this many times the median FULLY_CONNECTED output range is an outlier


def outlier_ops(calibrated: bytes) -> list[dict]:
    """The FULLY_CONNECTED and ADD ops of a calibrated transformer whose output range is ``OUTLIER_RATIO`` times the
    median range of the FULLY_CONNECTED outputs or more: ``{"op", "tensor"}``.

    BERT-style encoders have a few hidden dimensions with outlier activations in a feed-forward output and the
    residual sum after it: in the real MiniLM-L3, layer 0's second feed-forward MatMul spans [-5.7, 192] and its
    residual Add [-10, 214], where the other MatMul outputs span about 10 (one int8 step there: 0.91, every ordinary
    dimension rounded to a few steps). With only those two ops float (3.5 % of the weights) the pooled embedding's
    cosine to FP32 went from 0.854 to 0.987."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    g = m.subgraphs[0]
    kinds = {schema.BuiltinOperator.FULLY_CONNECTED: "FULLY_CONNECTED", schema.BuiltinOperator.ADD: "ADD"}

    def width(i: int) -> float | None:
        q = g.tensors[i].quantization
        if q is None or q.min is None or q.max is None or len(q.min) != 1:
            return None
        return float(q.max[0]) - float(q.min[0])

    ops = []
    for op in g.operators:
        code = m.operatorCodes[op.opcodeIndex]
        kind = kinds.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if kind and op.outputs is not None and len(op.outputs) == 1 and width(int(op.outputs[0])) is not None:
            ops.append((kind, int(op.outputs[0]), width(int(op.outputs[0]))))
    fc = [w for kind, _, w in ops if kind == "FULLY_CONNECTED"]
    if len(fc) < 4:
        return []
    typical = float(np.median(fc))
    name = lambda i: g.tensors[i].name.decode(errors="replace") if isinstance(g.tensors[i].name, bytes) \
        else str(g.tensors[i].name)  # noqa: E731
    return [{"op": kind, "tensor": name(i)} for kind, i, w in ops if typical > 0 and w >= OUTLIER_RATIO * typical]


def _all_layers(km) -> list[str]:
    return [layer.name for layer in km.layers]


def selective_int8(converter, km, job: dict, io_type) -> bytes:
    """INT8 with the ops of ``float_layers`` left in float: calibrate once, then quantize with those ops'
    output tensors on the MLIR quantizer's deny list (what tf.lite.experimental.QuantizationDebugger's
    ``denylisted_nodes`` does; TF's legacy quantizer cannot do this). The map of ONNX node -> TFLite
    tensors is written into ``job["float_ops_requested"]``."""
    from tensorflow.lite.python import convert as tf_convert

    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    transformer = {n: layers for n, layers in (job.get("transformer_float_map") or {}).items()
                   if n not in (job.get("float_layer_map") or {})}
    requested = tflite_ops_of(calibrated, km, {**transformer, **(job.get("float_layer_map") or {})})
    if transformer:  # one entry for them all: no single node of them is a requested float layer
        requested[TRANSFORMER_FLOAT] = [op for n in transformer for op in requested.pop(n)]
        known = {op["tensor"] for op in requested[TRANSFORMER_FLOAT]}
        requested[TRANSFORMER_FLOAT] += [op for op in outlier_ops(calibrated) if op["tensor"] not in known]
    if job.get("tail_float_map"):  # a detector's post-processing tail (targets/tflite/tail.py), one entry
        requested.update(tflite_ops_of(calibrated, km, job["tail_float_map"]))
        calibrated = without_ranges(calibrated, {op["tensor"] for op in requested.get(TAIL_FLOAT, [])})
    if job.get("front_float_map"):  # a signal-processing front-end (targets/tflite/tail.py), one entry, ranges kept
        requested.update(tflite_ops_of(calibrated, km, job["front_float_map"]))
    if job.get("auto_float_ops"):  # ops kept in float by the conversion itself (no int8 kernel, XNNPACK repair)
        names = _tensor_names(calibrated)
        requested[AUTO_FLOAT] = [{"op": op["op"], "tensor": _calibrated_name(t, names)} for op in job["auto_float_ops"]
                                 for t in op["outputs"]]
    if job.get("auto_float_types"):  # ... and every op of a type the quantizer left float (not only those it named)
        known = {(r["op"], r["tensor"]) for r in requested.get(AUTO_FLOAT, [])}
        requested.setdefault(AUTO_FLOAT, []).extend(
            r for r in ops_of_types(calibrated, job["auto_float_types"]) if (r["op"], r["tensor"]) not in known)
    job["float_ops_requested"] = requested
    deny = sorted({op["tensor"] for ops in requested.values() for op in ops})
    if not deny:
        return tf_convert.mlir_quantize(calibrated, converter._experimental_disable_per_channel, fully_quantize=False,
                                        input_data_type=io_type, output_data_type=io_type)
    return tf_convert.mlir_quantize(calibrated, converter._experimental_disable_per_channel, fully_quantize=False,
                                    input_data_type=io_type, output_data_type=io_type, denylisted_nodes=deny)


def without_ranges(calibrated: bytes, tensors: set[str]) -> bytes:
    """``calibrated`` with no calibration statistics on the named tensors (ops that stay float need none). The MLIR
    quantizer gives ops like CONCATENATION, RESHAPE, TRANSPOSE and STRIDED_SLICE one scale for their inputs and
    outputs and propagates it along a chain of them even when they stay float: a detector's box-regression conv
    ([1, 52, 52, 4], offsets of a few units) took the decoded output's pixel range through the float tail's layout ops
    (int8 scale 1.63 for values of ~0.05 steps) and INT8 collapsed to f1 39 on ddddocr's detector."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    dropped = 0
    for graph in model.subgraphs:
        for t in graph.tensors:
            name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)
            if name in tensors and t.quantization is not None and t.quantization.min is not None:
                t.quantization.min, t.quantization.max = None, None
                dropped += 1
    if not dropped:
        return calibrated
    builder = flatbuffers.Builder(len(calibrated) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tensor_names(model: bytes) -> set[str]:
    from ai_edge_litert.interpreter import Interpreter

    return {d["name"] for d in Interpreter(model_content=model).get_tensor_details()}


def _calibrated_name(name: str, names: set[str]) -> str:
    """The calibrated model's name of a quantized model's tensor: the quantizer makes a model output's name unique
    when its DEQUANTIZE takes it over (``PartitionedCall:0`` -> ``PartitionedCall:01``, see ``_same_op``); an op named
    by the quantized name would not be on the deny list."""
    if name in names:
        return name
    same = [n for n in names if name.startswith(n) and name[len(n):].isdigit()]
    return max(same, key=len) if same else name


def check_integer(float_ops: list[dict], job: dict) -> dict:
    """The full-integer check: every op int8, except (mixed precision) the ops of the requested float layers
    and the QUANTIZE/DEQUANTIZE at their borders. Returns what stayed float, per ONNX node."""
    requested = job.get("float_ops_requested") or {}
    wanted = [op for ops in requested.values() for op in ops]
    by_type = set(job.get("auto_float_types") or ())  # every op of these types stays float (see ``ops_of_types``)
    stray = [op for op in float_ops if op["op"] not in ("QUANTIZE", "DEQUANTIZE", *by_type)
             and not any(map(_same_op(op), wanted))]
    if stray or (float_ops and not requested):
        left = sorted({op["op"] for op in stray}) or sorted({op["op"] for op in float_ops})
        where = " outside the requested float layers" if requested else ""
        raise ConversionFailure("full-integer check", f"the INT8 model is not full-integer{where}: {len(stray or float_ops)} "
                                                      f"op(s) still run in float ({', '.join(left)})", left[0],
                                stray or float_ops)
    if not requested:
        return {}
    kept = {node: [f"{w['op']} {w['tensor']}" for w in ops if any(_same_op(op)(w) for op in float_ops)]
            for node, ops in requested.items()}
    # a requested float layer the quantizer quantized anyway is an error; the converter's own repairs (AUTO_FLOAT) that
    # come out int8 in this run (the quantizer moves an unrolled LSTM's float SPLITs around) are not
    ignored = [node for node, ops in requested.items() if node not in (AUTO_FLOAT, TRANSFORMER_FLOAT, TAIL_FLOAT, FRONT_FLOAT) and ops
               and not kept[node]]
    if ignored:
        raise ConversionFailure("float layers", f"the quantizer did not keep {', '.join(ignored)} in float")
    return {"float_layers_kept": kept, "float_layers_keras": job.get("float_layer_map") or {},
            "float_layers_border_ops": sum(op["op"] in ("QUANTIZE", "DEQUANTIZE") for op in float_ops)}


def _same_op(op: dict):
    """Does a requested op (calibrated model) match ``op`` of the quantized model? The quantizer keeps tensor
    names but makes them unique when it inserts a QUANTIZE that takes over a model output's name
    (``PartitionedCall:0`` -> ``PartitionedCall:01``)."""
    def match(wanted: dict) -> bool:
        return wanted["op"] == op["op"] and any(
            t == wanted["tensor"] or re.fullmatch(re.escape(wanted["tensor"]) + r"\d+", t) for t in op["outputs"])
    return match


def computed_int8_divisions(path: Path) -> list[dict]:
    """The int8 DIVs of the main graph whose divisor is computed, not a constant: ``{"op": "DIV", "outputs": [...]}``.
    TFLite's int8 DIV refuses a divisor that rounds to its zero point ("div.cc data[i] != zero_point ... failed to
    invoke"), and every int8 range holds zero, so any input whose divisor falls within half a step of 0 fails the
    model (Basic Pitch's normalisation: its INT8 failed on one evaluation sample); XNNPACK has no int8 DIV either."""
    from ai_edge_litert import schema_py_generated as schema

    from edgebuild.targets.tflite.describe import tensor_name

    model = schema.ModelT.InitFromPackedBuf(Path(path).read_bytes(), 0)
    graph = model.subgraphs[0]
    found = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.DIV or op.inputs is None \
                or len(op.inputs) < 2 or op.inputs[1] < 0:
            continue
        divisor = graph.tensors[int(op.inputs[1])]
        data = model.buffers[divisor.buffer].data if divisor.buffer < len(model.buffers) else None
        if divisor.type == schema.TensorType.INT8 and (data is None or not len(data)):
            found.append({"op": "DIV", "outputs": [tensor_name(graph.tensors[int(i)].name) for i in op.outputs]})
    return found
