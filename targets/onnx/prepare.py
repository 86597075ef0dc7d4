"""Graph preparation before quantizing: onnxruntime's pre-processing, constant weights folded into initializers,
the weighted layers of a graph, and the recurrent state path of a stateful model."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def prepared(src: Path, workdir: Path, keep_names: bool = False) -> Path:
    """onnxruntime's quantization pre-processing (shape inference + graph optimization).

    With ``keep_names`` the optimization (which fuses and renames nodes, e.g. MatMul+Add) is skipped, so
    node names given by the user or the accuracy search still name the FP32 graph's nodes.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgebuild.targets.onnx_islands import quantizer_safe

    pre = workdir / "prepared.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, skip_optimization=keep_names)
    fold_constant_weights(pre)
    quantizer_safe(pre)  # names onnxruntime's quantizer would define twice (a shared bias's copies; targets/onnx_islands.py)
    return pre


FOLD_MAX_ELEMENTS = 1 << 24  # a folded tensor larger than this stays computed (a ConstantOfShape of a huge shape)


def on_folded_copy(onnx_path: Path | str, out: Path, transform):
    """``transform(copy, out)`` on a copy of ``onnx_path`` (beside ``out``) whose constant weights are initializers (an
    exporter's Constant nodes folded, names kept): for a graph rewrite before a converter that takes the source ONNX
    model (onnx2tf, OpenVINO). The copy is removed; returns what ``transform`` returns."""
    import onnx

    copy = out.with_name(f"_{out.stem}_source.onnx")
    onnx.save(onnx.load(str(onnx_path)), str(copy))
    try:
        fold_constant_weights(copy)
        return transform(copy, out)
    finally:
        copy.unlink()


def fold_constant_weights(path: Path) -> int:
    """Weights computed from constants (Constant nodes, Unsqueeze/Slice/Concat of them: PyTorch's LSTM export reaches
    the LSTM's W and R that way) become initializers, so the quantizers see them as weights: onnxruntime quantizes
    initializers only, and a Silero VAD's LSTM stayed float. Only nodes whose every input is constant are folded (the
    ONNX reference evaluator), never a node with a subgraph; the other nodes and their names are unchanged."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    graph = model.graph
    by_name = {i.name: i for i in graph.initializer}
    known = set(by_name)
    values: dict = {}
    keep, folded, alias = [], 0, {}
    outputs = {o.name for o in graph.output} | _subgraph_reads(graph)
    for n in graph.node:
        if n.op_type == "Identity" and n.input and n.input[0] in known and n.output[0] not in outputs:
            alias[n.output[0]] = n.input[0]  # a weight shared by two layers (an exporter's dedup) stays one tensor
            folded += 1
            continue
        has_graph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
        inputs = [t for t in n.input if t]
        if has_graph or n.domain not in ("", "ai.onnx") or not n.output or any(o in outputs for o in n.output) or \
                (n.op_type != "Constant" and (not inputs or not all(t in known or t in values for t in inputs))):
            keep.append(n)
            continue
        try:
            feeds = {t: values[t] if t in values else numpy_helper.to_array(by_name[t]) for t in inputs}
            outs = ReferenceEvaluator(_single_node_model(model, n, feeds)).run(None, feeds)
        except Exception:  # noqa: BLE001 — an op the reference evaluator does not run stays as it is
            keep.append(n)
            continue
        if any(np.asarray(o).size > FOLD_MAX_ELEMENTS for o in outs):
            keep.append(n)
            continue
        for name, v in zip(n.output, outs):
            values[name] = np.asarray(v)
        folded += 1
    if not folded:
        return 0
    for n in keep:
        for i, t in enumerate(n.input):
            if t in alias:
                n.input[i] = alias[t]
    used = {t for n in keep for t in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in values.items() if k in used)
    onnx.save(model, str(path))
    return folded


def _subgraph_reads(graph) -> set[str]:
    """Names the subgraphs of ``graph``'s nodes (If/Loop bodies) read."""
    out: set[str] = set()
    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out |= {t for m in sub.node for t in m.input} | _subgraph_reads(sub)
    return out


def _single_node_model(model, node, feeds: dict):
    from onnx import helper

    inputs = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.asarray(v).shape)
              for t, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(o, 0, None) for o in node.output]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def weights_by_op(graph) -> list[tuple[str, int, object]]:
    """(op type, weight elements, node) for each layer of ``graph`` with a constant weight: Conv/ConvTranspose, MatMul
    and Gemm (a constant B; a Gemm with transA counts as a non-MatMul layer), LSTM/GRU/RNN (W and R), and an
    embedding Gather (a constant table)."""
    sizes = {i.name: int(np.prod(i.dims)) if len(i.dims) else 1 for i in graph.initializer if i.data_type == 1}
    for n in graph.node:  # Constant weights, and what Unsqueeze/Reshape/Transpose... make of them (not yet folded)
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" and n.attribute[0].t.data_type == 1:
            sizes[n.output[0]] = int(np.prod(n.attribute[0].t.dims)) if len(n.attribute[0].t.dims) else 1
        elif n.op_type in ("Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Cast") and n.input \
                and n.input[0] in sizes:
            sizes[n.output[0]] = sizes[n.input[0]]
    weight_inputs = {"Conv": (1,), "ConvTranspose": (1,), "MatMul": (1,), "Gemm": (1,), "LSTM": (1, 2),
                     "GRU": (1, 2), "RNN": (1, 2), "Gather": (0,)}
    out = []
    for n in graph.node:
        size = sum(sizes.get(n.input[i], 0) for i in weight_inputs.get(n.op_type, ()) if i < len(n.input))
        if size >= 16:
            op = n.op_type
            if op == "Gemm" and any(a.name == "transA" and a.i for a in n.attribute):
                op = "Gemm(transA)"
            out.append((op, size, n))
    return out


RECURRENT = ("LSTM", "GRU", "RNN")


def state_path(onnx_path: Path | str) -> list[str]:
    """The nodes carrying a recurrent layer's state between the model's interface and the layer: from a graph input to
    an LSTM/GRU/RNN's initial_h/initial_c, and from its Y_h/Y_c to a graph output (a stateful model that takes its
    state in and gives it back, as a streaming VAD does). Empty when the model has no such path. Q/DQ there rounds
    the state to 8 bits on every call and the error compounds over a stream (Silero VAD: state output cosine 0.82)."""
    import onnx

    from edgebuild.targets.regions import graph_index

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer, consumers = graph_index(graph)
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    found: dict[str, object] = {}

    def walk(start: str, step, stop) -> list | None:
        seen, todo, path, reached = set(), [start], [], False
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in stop:
                reached = True
            for n in step(t):
                if n.op_type in RECURRENT or n.op_type in ("Conv", "MatMul", "Gemm") or len(path) > 64:
                    continue
                path.append(n)
                todo += list(n.input) if step is back else list(n.output)
        return path if reached else None

    back = lambda t: [producer[t]] if t in producer else []  # noqa: E731
    fwd = lambda t: consumers.get(t, [])  # noqa: E731
    for n in graph.node:
        if n.op_type not in RECURRENT:
            continue
        ins = [walk(t, back, inputs) for t in n.input[5:7] if t]
        outs = [walk(t, fwd, outputs) for t in n.output[1:3] if t]
        if any(p is not None for p in ins) and any(p is not None for p in outs):
            for p in ins + outs:
                for m in p or []:
                    found[m.name] = m
    return [k for k in found if k]


def preprocess(src: Path, workdir: Path) -> Path:
    """onnxruntime's pre-processing without the node-renaming optimization, for repeated ``quantize_static``."""
    return prepared(src, workdir, keep_names=True)
