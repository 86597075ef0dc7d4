"""Weight-only INT8 for the layers an INT8 artifact keeps in float.

A layer left float — by the accuracy search (``float_layers``), a float region (a signal-processing front-end, the
post-processing tail), a first LSTM whose input cannot be quantized — keeps float *activations* because 8-bit
activations lose the task there. Its weights need not be float: stored int8 per output channel with a
DequantizeLinear in front (Cast + Mul before opset 13), the layer still computes in float, and the file holds int8
weights (a 3-layer LSTM encoder with its first LSTM float: 76 % -> 100 % of the weights stored in 8 bits, output
cosine unchanged). These weights are not INT8 compute: the INT8 share counts them apart (their names carry
targets/weight_only.py ``MARK``), so ``_int8`` still means that 90 % of the weights run in int8 layers.

Taken only where it costs nothing measurable (targets/weight_only.py ``Check``, on up to ``CHECK_SAMPLES``
calibration samples); else a part of the weights (``choose``). The build's gate then judges the artifact as always.
Setting ``quant.weight_only`` (default on; TensorRT, which builds from Q/DQ pairs, off).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.targets.weight_only import (
    MARK, MAX_LOSS_DB, MIN_ELEMENTS, Check, choose, quantized, rounding_error, weight_only_note)

# op type -> (weight input index, the output-channel axis of that weight); MatMul's B is [K, N]: channels are N
_WEIGHTS = {"Conv": ((1, 0),), "ConvTranspose": ((1, 1),), "MatMul": ((1, -1),), "LSTM": ((1, 1), (2, 1)),
            "GRU": ((1, 1), (2, 1)), "RNN": ((1, 1), (2, 1))}


def float_weights(graph) -> list[tuple[object, int, int]]:
    """(node, weight input index, channel axis) for each weight of ``graph`` that is a float initializer read by a
    layer directly (not through a DequantizeLinear: the quantized layers' weights); a shared one once, by its first
    reader (the DequantizeLinear that replaces it keeps its name, so every reader reads it)."""
    inits = {i.name: i for i in graph.initializer if i.name not in {x.name for x in graph.input}}
    seen: set[str] = set()  # a weight shared by several layers (Basic Pitch's constant-Q kernels, one per octave) once
    out = []
    for n in graph.node:
        spec = _WEIGHTS.get(n.op_type, ())
        if n.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            spec = ((1, 0 if trans_b else 1),)
        for i, axis in spec:
            t = inits.get(n.input[i]) if i < len(n.input) else None
            if t is None or t.data_type != 1 or int(np.prod(t.dims)) < MIN_ELEMENTS or t.name in seen:
                continue
            seen.add(t.name)
            out.append((n, i, axis % len(t.dims)))
    return out


def int8_weights(path: Path, out: Path, calib: SampleSet, workdir: Path, source: Path | None = None,
                 max_loss_db: float = MAX_LOSS_DB) -> list[str]:
    """``path`` with its float layers' weights int8 (DequantizeLinear in front) into ``out`` where that costs nothing
    measurable (``costless``); the notes. ``out`` is not written when no weight is taken. ``source``: the FP32 model
    the artifact was made from (the loss is measured against it)."""
    import onnx

    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    found = float_weights(model.graph)
    if not found:
        return []
    found.sort(key=lambda c: _error(model.graph, *c))
    index = {id(n): k for k, n in enumerate(model.graph.node)}
    feeds = _feeds(calib)
    check = Check(_run(model, feeds, workdir), _run(onnx.load(str(source)), feeds, workdir) if source else None,
                  max_loss_db)

    def trial(chosen):
        m = onnx.load(str(path))
        _replace(m.graph, [(index[id(n)], i, axis) for n, i, axis in chosen], opset)
        return m, check.judge(_run(m, feeds, workdir))

    taken = choose(found, lambda chosen: trial(chosen)[1])
    if not taken:
        return [f"weight-only INT8 not taken: the float layers' weights in int8 cost more than {max_loss_db:g} dB of "
                "the artifact's output SQNR"]
    m, verdict = trial(taken)
    onnx.save(m, str(out))
    total = sum(int(np.prod(_init(model.graph, n.input[i]).dims)) for n, i, _ in taken)
    return [weight_only_note(len(taken), len(found), total, verdict)]


def _init(graph, name: str):
    return next(i for i in graph.initializer if i.name == name)


def _error(graph, node, i: int, axis: int) -> float:
    from onnx import numpy_helper

    return rounding_error(numpy_helper.to_array(_init(graph, node.input[i])).astype(np.float32), axis)


def _replace(graph, weights: list[tuple[int, int, int]], opset: int) -> None:
    """Each (node index, weight input, axis)'s float initializer as int8 + scale behind a DequantizeLinear (opset 13
    on; before it, Cast + Mul) whose output keeps its name, inserted before that node."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    readers = [(graph.node[at], i, axis) for at, i, axis in weights]  # the nodes first: an insertion moves indices
    for node, i, axis in readers:
        old = inits[node.input[i]]
        q, scale = quantized(numpy_helper.to_array(old).astype(np.float32), axis)
        base = f"{old.name}.{MARK}"
        graph.initializer.remove(old)
        graph.initializer.append(numpy_helper.from_array(q, base))
        if opset >= 13:
            graph.initializer.extend([numpy_helper.from_array(scale, base + ".scale"),
                                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + ".zero")])
        at = list(graph.node).index(node)
        if opset >= 13:
            graph.node.insert(at, helper.make_node("DequantizeLinear", [base, base + ".scale", base + ".zero"],
                                                   [old.name], name=f"{base}.dq", axis=axis))
            continue
        # before opset 13 DequantizeLinear has no axis: Cast + a per-channel Mul (folded by ONNX Runtime at load)
        shape = [1] * len(old.dims)
        shape[axis] = -1
        graph.initializer.append(numpy_helper.from_array(scale.reshape(shape), base + ".scale"))
        graph.node.insert(at, helper.make_node("Cast", [base], [base + ".float"], name=f"{base}.cast", to=1))
        graph.node.insert(at + 1, helper.make_node("Mul", [base + ".float", base + ".scale"], [old.name],
                                                   name=f"{base}.dq"))


def _feeds(calib: SampleSet) -> list[dict]:
    from edgebuild.calibration.adapters import ort_reader
    from edgebuild.calibration.budget import at_most

    from edgebuild.targets.weight_only import CHECK_SAMPLES

    reader = ort_reader(at_most(calib, CHECK_SAMPLES))
    out = []
    while (f := reader.get_next()) is not None:
        out.append(f)
    return out


def _run(model, feeds: list[dict], workdir: Path) -> list[list[np.ndarray]]:
    import onnx
    import onnxruntime as ort

    path = workdir / "_weight_only_check.onnx"
    onnx.save(model, str(path))
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return [session.run(None, f) for f in feeds]
    finally:
        path.unlink(missing_ok=True)
