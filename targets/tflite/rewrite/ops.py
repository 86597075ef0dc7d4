"""Ops onnx2tf or TFLite cannot take as they are, rewritten into equivalent ops before onnx2tf.

- **Erf** (GELU in BERT-style models): TFLite has no builtin Erf (``'tf.Erf' op is neither a custom op nor a
  flex op``). ``erf(x) ~ tanh(2/sqrt(pi) * (x + 0.08943 x^3))``: max abs error 3.6e-4 (GELU built on it: 3.4e-4),
  made of ops that have int8 kernels (MUL, ADD, TANH).
- **Sum** (ONNX's n-ary add, ``ADD_N`` in TFLite, which has no int8 kernel): a chain of binary ``Add``.
- **Slice over several axes** (silero-vad's STFT magnitude: ``starts [0, 129, 0], ends [max, max, max], axes [0, 1, 2]``
  on an NCW tensor): onnx2tf moves the channel axis last (axes [0, 2, 1]) but keeps starts/ends in ONNX order
  (it re-orders them only for 2-D ``axes``), so it slices the wrong axis: [1, 0, 258] instead of [1, 4, 129],
  and broadcasting spreads the 0 down to the recurrent state ([2, 0, 128]). Axes that take everything are
  dropped and the rest become one single-axis Slice each (exact).
- **Gather of one constant index from a Concat on the same axis** (``h_n[-1]`` of a stacked LSTM/GRU: torch
  concatenates each layer's ``Y_h`` ``[1, 1, H]`` into ``[layers, 1, H]`` and gathers index -1): onnx2tf gathered
  from a channels-last copy and gave ``[layers, H]`` for ``[1, H]``. The gathered index lies in one Concat input:
  a Squeeze of it when that input has size 1 on the axis, else a Gather from it (exact).
"""
from __future__ import annotations

import math

import numpy as np

from .graph import finish, node_attrs, opset_of, static_shapes, unique_name

ERF_A = 2.0 / math.sqrt(math.pi)
ERF_B = 0.08943
ERF_MAX_ABS_ERROR = 3.6e-4


def erf_to_tanh(model):
    """Erf(x) -> Tanh(x * (a + a*b*x^2)): TFLite has no Erf kernel."""
    from onnx import TensorProto, helper, numpy_helper

    replacements, inits, done = {}, [], []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Erf" or node.domain not in ("", "ai.onnx"):
            continue
        base = node.name or node.output[0]
        x, y = node.input[0], node.output[0]
        a, ab = unique_name(model, y + "_erf_a"), unique_name(model, y + "_erf_ab")
        inits += [numpy_helper.from_array(np.array(ERF_A, np.float32), a),
                  numpy_helper.from_array(np.array(ERF_A * ERF_B, np.float32), ab)]
        t = [unique_name(model, f"{y}_erf_t{i}") for i in range(4)]
        replacements[idx] = [
            helper.make_node("Mul", [x, x], [t[0]], name=f"{base}/x2"),
            helper.make_node("Mul", [t[0], ab], [t[1]], name=f"{base}/bx2"),
            helper.make_node("Add", [t[1], a], [t[2]], name=f"{base}/a_bx2"),
            helper.make_node("Mul", [x, t[2]], [t[3]], name=f"{base}/arg"),
            helper.make_node("Tanh", [t[3]], [y], name=node.name),
        ]
        done.append(base)
    _ = TensorProto  # float32 graphs only: the constants are float32 like onnx2tf's float graph
    return finish(model, replacements, inits, done,
                  f"Erf as tanh(2/sqrt(pi) (x + {ERF_B} x^3)) (max abs error {ERF_MAX_ABS_ERROR:g}; TFLite has "
                  "no Erf kernel)",
                  count="node(s)")


def sum_to_add_chain(model):
    """Sum(a, b, c, ...) -> Add(Add(a, b), c) ...: TFLite's ADD_N has no int8 kernel, ADD has."""
    from onnx import helper

    replacements, done = {}, []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        base = node.name or node.output[0]
        acc, chain = node.input[0], []
        for i, operand in enumerate(node.input[1:], 1):
            last = i == len(node.input) - 1
            out = node.output[0] if last else unique_name(model, f"{node.output[0]}_sum{i}")
            chain.append(helper.make_node("Add", [acc, operand], [out], name=node.name if last else f"{base}/add{i}"))
            acc = out
        replacements[idx] = chain
        done.append(base)
    return finish(model, replacements, [], done,
                  "Sum as a chain of Add (ADD_N has no int8 kernel)")


INT_END = 2**31 - 1  # an end at or past this takes the whole axis (torch exports INT64_MAX)


def _slice_params(node, consts: dict):
    """(starts, ends, axes, steps) of a Slice with constant parameters (attributes before opset 10), or None."""
    a = node_attrs(node)
    if "starts" in a:
        starts, ends = list(a["starts"]), list(a["ends"])
        return starts, ends, list(a.get("axes", range(len(starts)))), [1] * len(starts)
    ins = list(node.input) + [""] * (5 - len(node.input))
    if any(name and name not in consts for name in ins[1:]):
        return None
    starts, ends = [int(v) for v in consts[ins[1]].ravel()], [int(v) for v in consts[ins[2]].ravel()]
    axes = [int(v) for v in consts[ins[3]].ravel()] if ins[3] else list(range(len(starts)))
    steps = [int(v) for v in consts[ins[4]].ravel()] if ins[4] else [1] * len(starts)
    return starts, ends, axes, steps


def slice_per_axis(model):
    """Slice over several axes -> one Slice per axis that does not take everything (onnx2tf mixes up the
    starts/ends of multi-axis slices once it has moved the channel axis)."""
    from onnx import helper, numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shapes, legacy = static_shapes(model), opset_of(model) < 10
    replacements, done = {}, []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Slice" or node.domain not in ("", "ai.onnx"):
            continue
        params = _slice_params(node, consts)
        if params is None or len(params[0]) < 2:
            continue
        rank = len(shapes.get(node.input[0]) or [])
        if not rank:
            continue
        dims = shapes[node.input[0]]
        cuts = [(ax % rank, st, en, sp) for st, en, ax, sp in zip(*params)
                if not (sp == 1 and st in (0, -2**63) and (en >= INT_END or (dims[ax % rank] > 0 and en >= dims[ax % rank])))]
        base, chain, src = node.name or node.output[0], [], node.input[0]
        for k, (ax, st, en, sp) in enumerate(cuts or [(0, 0, INT_END, 1)]):
            last = k == max(len(cuts), 1) - 1
            out = node.output[0] if last else unique_name(model, f"{node.output[0]}_axis{ax}")
            name = node.name if last else f"{base}/axis{ax}"
            if legacy:
                chain.append(helper.make_node("Slice", [src], [out], name=name, starts=[st], ends=[en], axes=[ax]))
            else:
                names = [unique_name(model, f"{out}_{p}") for p in ("starts", "ends", "axes", "steps")]
                model.graph.initializer.extend(  # at once, so that unique_name sees them
                    numpy_helper.from_array(np.array([v], np.int64), n) for v, n in zip((st, en, ax, sp), names))
                chain.append(helper.make_node("Slice", [src, *names], [out], name=name))
            src = out
        replacements[idx] = chain
        done.append(base)
    return finish(model, replacements, [], done,
                  "Slice over several axes as one Slice per axis (exact; onnx2tf slices the wrong axis once "
                  "the channel axis has moved)")


def gather_of_concat(model):
    """Gather(Concat(x0, x1, ..., axis=a), constant scalar k, axis=a) -> Squeeze(x_j) / Gather(x_j, k - offset)."""
    from onnx import helper, numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shapes, opset = static_shapes(model), opset_of(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    replacements, done = {}, []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[1] not in consts:
            continue
        k = consts[node.input[1]]
        cat = producer.get(node.input[0])
        if k.ndim != 0 or cat is None or cat.op_type != "Concat":
            continue
        rank = len(shapes.get(node.input[0]) or [])
        axis = int(node_attrs(node).get("axis", 0))
        if not rank or axis % rank != int(node_attrs(cat).get("axis", 0)) % rank:
            continue
        axis %= rank
        sizes = [(shapes.get(x) or [None] * rank)[axis] if len(shapes.get(x) or []) == rank else None for x in cat.input]
        if any(s is None or s <= 0 for s in sizes):
            continue
        index = int(k) % sum(sizes)
        offsets = np.cumsum([0] + sizes)
        j = int(np.searchsorted(offsets, index, side="right") - 1)
        src, base = cat.input[j], node.name or node.output[0]
        if sizes[j] == 1:
            if opset >= 13:
                axes = unique_name(model, f"{node.output[0]}_axes")
                model.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
                new = helper.make_node("Squeeze", [src, axes], list(node.output), name=node.name)
            else:
                new = helper.make_node("Squeeze", [src], list(node.output), name=node.name, axes=[axis])
        else:
            at = unique_name(model, f"{node.output[0]}_index")
            model.graph.initializer.append(numpy_helper.from_array(np.array(index - offsets[j], np.int64), at))
            new = helper.make_node("Gather", [src, at], list(node.output), name=node.name, axis=axis)
        replacements[idx] = [new]
        done.append(base)
    # the Concat stays when something else reads it; onnx2tf drops it if not
    return finish(model, replacements, [], done,
                  "Gather of one index from a Concat as that Concat input (exact; onnx2tf gathered a stacked "
                  "RNN's h_n[-1] from a channels-last copy)")
