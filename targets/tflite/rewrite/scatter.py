"""ScatterElements with a reduction, which onnx2tf cannot convert, rewritten before onnx2tf.

- **ScatterElements with reduction add, mul, max or min** (a colour histogram: ``hist.scatter_add_(2, bins, ones)``):
  onnx2tf 1.28.8 stops with "ScatterElements currently supports only reduction=['none']". With ``D`` the size of
  the scatter axis, a one-hot comparison ``indices == arange(D)`` (on a new axis just after the scatter axis) masks
  the updates, and a reduction over the scatter axis gathers each target's updates, duplicates included:
  ``data + ReduceSum(onehot * updates)``, ``data * ReduceProd(Where(onehot, updates, 1))``, and for max/min
  ``Where(any hit, Max(data, ReduceMax(Where(onehot, updates, min(updates)))), data)`` (the filler is the updates'
  own minimum, so INT8 ranges stay those of the data). Exact up to float summation order; the one-hot tensor has
  ``indices.size * D`` elements (not rewritten above ``SCATTER_ONEHOT_MAX``, then the error names the node).
- **A scatter-add too big for the one-hot** (a video model's colour histogram: 129,600 updates into 51,200 bins, a
  6.6e9-element one-hot) is one flat scatter: each update's flat position in the data (``index * stride`` plus the
  position of its other coordinates, a constant), and one 1-D ``MaxUnpool`` of all updates onto those positions.
  onnx2tf converts MaxUnpool to ``tf.scatter_nd`` (TFLite ``SCATTER_ND``), which *sums* updates that land on the same
  position — a scatter-add, exact up to summation order (ONNX leaves MaxUnpool's duplicates undefined, so this form is
  for onnx2tf only; tests/targets/test_tflite_scatter.py checks the TFLite result against ONNX Runtime's).
  mul/max/min have no such form: too big for the one-hot, the error names the node.
"""
from __future__ import annotations

import numpy as np

from .graph import elem_types, finish, node_attrs, opset_of, static_shapes, unique_name

SCATTER_ONEHOT_MAX = 1 << 24  # elements of a ScatterElements rewrite's one-hot tensors (64 MB in float32)
SCATTER_MAX_ROWS = 64  # rows (data elements / scatter-axis size) a ScatterElements rewrite unrolls


def _reduce(op: str, x: str, axis: int, out: str, name: str, opset: int, model, keepdims: int = 0):
    """Reduce``op`` over one axis: axes as an input (ReduceSum from opset 13, the others from 18) or an attribute."""
    from onnx import helper, numpy_helper

    if opset >= (13 if op == "ReduceSum" else 18):
        axes = unique_name(model, f"{out}_axes")
        model.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
        return helper.make_node(op, [x, axes], [out], name=name, keepdims=keepdims)
    return helper.make_node(op, [x], [out], name=name, axes=[axis], keepdims=keepdims)


def scatter_elements_reduction(model):
    """ScatterElements(reduction=add|mul|max|min) -> per row, a one-hot mask and a reduction (exact), in 2-D ops."""
    from onnx import TensorProto

    shapes, types, opset = static_shapes(model), elem_types(model), opset_of(model)
    replacements, done = {}, []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "ScatterElements" or node.domain not in ("", "ai.onnx"):
            continue
        a = node_attrs(node)
        red = a.get("reduction", b"none")
        red = red.decode() if isinstance(red, bytes) else red
        data, indices, updates = node.input[:3]
        ds, xs = shapes.get(data) or [], shapes.get(indices) or []
        rank = len(ds)
        if red not in ("add", "mul", "max", "min") or not rank or xs != shapes.get(updates) or len(xs) != rank or \
                min(ds + xs) <= 0:
            continue  # onnx2tf then names the node (onnx2tf_run.explain)
        axis = int(a.get("axis", 0)) % rank
        rows, n, depth = int(np.prod(ds)) // ds[axis], xs[axis], ds[axis]
        dtype = types.get(updates, TensorProto.FLOAT)
        if any(xs[d] > ds[d] for d in range(rank) if d != axis):
            continue  # not a valid scatter: onnx2tf names the node
        if any(xs[d] != ds[d] for d in range(rank) if d != axis) or rows > SCATTER_MAX_ROWS or n * depth * rows > SCATTER_ONEHOT_MAX:
            if red != "add":
                continue  # indices smaller than data on another axis, or too big to unroll: onnx2tf names the node
            replacements[idx] = _scatter_add_flat(model, node, axis, ds, xs, dtype)
            done.append(f"{node.name or node.output[0]} (add, flat)")
            continue
        replacements[idx] = _scatter_rows(model, node, red, axis, ds, n, rows, dtype, opset)
        done.append(f"{node.name or node.output[0]} ({red})")
    return finish(model, replacements, [], done,
                  "ScatterElements with a reduction as a one-hot mask and a reduction per row (exact; onnx2tf "
                  "supports only reduction=none)")


class _Nodes:
    """The nodes of one ScatterElements rewrite: constants (initializers) and ops named after the node, the last one
    writing the node's own output under its own name."""

    def __init__(self, model, node):
        self.model, self.node, self.nodes = model, node, []
        self.y, self.base = node.output[0], node.name or node.output[0]

    def const(self, value, key: str) -> str:
        from onnx import numpy_helper

        name = unique_name(self.model, f"{self.y}_scatter_{key}")
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, kind: str, ins: list[str], key: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or unique_name(self.model, f"{self.y}_scatter_{key}")
        name = f"{self.base}/{key}" if out != self.y else self.node.name
        self.nodes.append(helper.make_node(kind, ins, [out], name=name, **attrs))
        return out

    def index(self, indices: str, depth: int) -> str:
        """``indices`` as int64 in [0, depth): negative indices count from the end."""
        from onnx import TensorProto

        idx = self.op("Cast", [indices], "index_int64", to=TensorProto.INT64)
        negative = self.op("Cast", [self.op("Less", [idx, self.const(np.array(0, np.int64), "zero")], "negative")],
                           "negative_int", to=TensorProto.INT64)
        shift = self.op("Mul", [negative, self.const(np.array(depth, np.int64), "depth")], "shift")
        return self.op("Add", [idx, shift], "index")


def _scatter_add_flat(model, node, axis: int, ds: list[int], xs: list[int], dtype: int) -> list:
    """The nodes of a scatter-add as one flat scatter (module docstring): ``positions = index * stride[axis] +
    offsets`` (the other coordinates' part, a constant), ``MaxUnpool`` of the updates onto ``positions`` in a 1-D
    tensor at least as long as the data (zero updates at position 0 pad it), then ``data + reshape(...)``."""
    from onnx import TensorProto

    data, indices, updates = node.input[:3]
    y, rank = node.output[0], len(ds)
    total, count = int(np.prod(ds)), int(np.prod(xs))
    length = max(total, count)
    strides = [int(np.prod(ds[d + 1:])) for d in range(rank)]
    coords = np.indices(xs, dtype=np.int64)
    offsets = sum((coords[d] * strides[d] for d in range(rank) if d != axis), np.zeros(xs, np.int64))
    b = _Nodes(model, node)
    const, op = b.const, b.op
    idx = b.index(indices, ds[axis])
    pos = op("Mul", [idx, const(np.array(strides[axis], np.int64), "stride")], "position")
    if offsets.any():
        pos = op("Add", [pos, const(offsets, "offsets")], "flat_position")
    row = const(np.array([1, 1, count], np.int64), "row_shape")
    pos = op("Reshape", [pos, row], "position_row")
    upd = updates if dtype == TensorProto.FLOAT else op("Cast", [updates], "updates_float", to=TensorProto.FLOAT)
    upd = op("Reshape", [upd, row], "updates_row")
    if length > count:  # MaxUnpool's output is as long as its input: zero updates at position 0 make it the data's
        upd = op("Concat", [upd, const(np.zeros((1, 1, length - count), np.float32), "pad")], "updates_padded", axis=2)
        pos = op("Concat", [pos, const(np.zeros((1, 1, length - count), np.int64), "pad_position")], "position_padded",
                 axis=2)
    flat = op("Reshape", [op("MaxUnpool", [upd, pos], "scatter", kernel_shape=[1], strides=[1]),
                          const(np.array([length], np.int64), "flat_shape")], "flat")
    if length > total:
        flat = op("Slice", [flat, const(np.array([0], np.int64), "start"), const(np.array([total], np.int64), "end"),
                            const(np.array([0], np.int64), "axis")], "data_part")
    flat = op("Reshape", [flat, const(np.array(ds, np.int64), "out_shape")], "sums")
    if dtype != TensorProto.FLOAT:
        flat = op("Cast", [flat], "sums_typed", to=dtype)
    op("Add", [data, flat], "out", out=y)
    return b.nodes


def _scatter_rows(model, node, red: str, axis: int, ds: list[int], n: int, rows: int, dtype: int, opset: int) -> list:
    """The nodes of one ScatterElements rewrite. Every tensor is 2-D (onnx2tf guesses channels-last layouts for 3-D
    and 4-D tensors, and reduces the wrong axis of a 4-D one-hot): the scatter axis goes last, everything else into
    ``rows``; per row, ``onehot[N, D] = (indices[:, None] == arange(D))`` masks the updates and a reduction over N
    gives that row's D results, combined with the data as the reduction says."""
    from onnx import TensorProto, helper, numpy_helper

    data, indices, updates = node.input[:3]
    y, base, rank, depth = node.output[0], node.name or node.output[0], len(ds), ds[axis]
    perm = [d for d in range(rank) if d != axis] + [axis]  # scatter axis last
    inverse = [int(v) for v in np.argsort(perm)]
    b = _Nodes(model, node)
    const, op, nodes = b.const, b.op, b.nodes

    consts = {i.name: i for i in model.graph.initializer if i.name in (data, updates)}

    def cols(x: str, key: str, length: int) -> str:  # [.., axis, ..] -> [length, rows]: one column per row
        if x in consts:  # folded here: onnx2tf cannot make a model output of a chain of constants
            return const(numpy_helper.to_array(consts[x]).transpose(perm).reshape(rows, length).T.copy(), f"{key}_cols")
        t = op("Transpose", [x], f"{key}_last", perm=perm) if perm != list(range(rank)) else x
        t = op("Reshape", [t, const(np.array([rows, length], np.int64), f"{key}_shape")], f"{key}_rows")
        return op("Transpose", [t], f"{key}_cols", perm=[1, 0])

    idx = b.index(cols(indices, "index", n), depth)
    upd = cols(updates, "updates", n)
    if data in consts:
        data_rows = const(numpy_helper.to_array(consts[data]).transpose(perm).reshape(rows, depth).copy(), "data_rows")
    else:
        data_rows = op("Reshape", [op("Transpose", [data], "data_last", perm=perm) if perm != list(range(rank)) else data,
                                   const(np.array([rows, depth], np.int64), "data_shape")], "data_rows")
    k = const(np.arange(depth, dtype=np.int64).reshape(1, depth), "k")
    one = const(np.array(1, helper.tensor_dtype_to_np_dtype(dtype)), "one")
    results, hits = [], []
    for r in range(rows):
        sl = [const(np.array([v], np.int64), f"r{r}_{p}") for p, v in (("start", r), ("end", r + 1), ("axis", 1))]
        i_r = op("Slice", [idx, *sl], f"r{r}_index")                                  # [N, 1]
        u_r = op("Slice", [upd, *sl], f"r{r}_updates")                                # [N, 1]
        hot = op("Equal", [i_r, k], f"r{r}_onehot")                                   # [N, D]
        if red == "add":
            masked = op("Mul", [op("Cast", [hot], f"r{r}_onehot_float", to=dtype), u_r], f"r{r}_masked")
            results.append(_reduce("ReduceSum", masked, 0, unique_name(model, f"{y}_scatter_r{r}_sum"), f"{base}/r{r}_sum",
                                   opset, model, keepdims=1))
        elif red == "mul":
            masked = op("Where", [hot, u_r, one], f"r{r}_masked")
            results.append(_reduce("ReduceProd", masked, 0, unique_name(model, f"{y}_scatter_r{r}_prod"), f"{base}/r{r}_prod",
                                   opset, model, keepdims=1))
        else:  # max / min: the filler is the updates' own min (max), which never wins over a real hit
            low = red == "max"
            fill = op("ReduceMin" if low else "ReduceMax", [u_r], f"r{r}_filler", keepdims=1)
            masked = op("Where", [hot, u_r, fill], f"r{r}_masked")
            results.append(_reduce("ReduceMax" if low else "ReduceMin", masked, 0, unique_name(model, f"{y}_scatter_r{r}_{red}"),
                                   f"{base}/r{r}_{red}", opset, model, keepdims=1))
            hits.append(_reduce("ReduceMax", op("Cast", [hot], f"r{r}_onehot_float", to=TensorProto.FLOAT), 0,
                                unique_name(model, f"{y}_scatter_r{r}_hits"), f"{base}/r{r}_hits", opset, model, keepdims=1))
        nodes.append(results[-1])
        if hits and hits[-1] is not nodes[-1]:
            nodes.append(hits[-1])
    gathered = [r.output[0] for r in results]
    merged = op("Concat", gathered, "merged", axis=0) if rows > 1 else gathered[0]         # [rows, D]
    if red == "add":
        out = op("Add", [data_rows, merged], "combined")
    elif red == "mul":
        out = op("Mul", [data_rows, merged], "combined")
    else:
        hit = [h.output[0] for h in hits]
        hit = op("Concat", hit, "hits", axis=0) if rows > 1 else hit[0]
        best = op("Max" if red == "max" else "Min", [data_rows, merged], "best")
        out = op("Where", [op("Cast", [hit], "hit", to=TensorProto.BOOL), best, data_rows], "combined")
    shaped = [ds[d] for d in perm]
    if perm == list(range(rank)):
        op("Reshape", [out, const(np.array(shaped, np.int64), "out_shape")], "out", out=y)
    else:
        t = op("Reshape", [out, const(np.array(shaped, np.int64), "out_shape")], "out_last")
        op("Transpose", [t], "out", out=y, perm=inverse)
    return nodes
