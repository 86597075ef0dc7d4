"""ONNX graph rewrites applied before onnx2tf, each exact or with a stated bound, each recorded.

They turn graphs that onnx2tf converts into something no TFLite runtime can use (or that INT8 breaks) into
equivalent graphs it converts well. ``rewrite(model)`` returns the model and one line per rewrite applied;
node names and output tensor names are kept, so ONNX node names (the accuracy search's ``float_layers``) and
onnx2tf's tensor map still find them. Runs in the conversion child (targets/tflite/convert.py).

- **MaxPool with padding TF pooling cannot express, or ceil_mode** (MTCNN-style ``MaxPool2d(3, 2,
  ceil_mode=True)``): onnx2tf pads with the dtype's minimum (-3.4e38) in a PADV2 before a VALID pool. INT8
  calibration then records a range of ~1e38 for that pad's output, the following conv gets an input scale of
  ~1e36 (the model is garbage in int8) and XNNPACK refuses the graph ("failed to prepare"). An ``edge`` pad
  gives exactly the same maxima (every window that reaches the padding also holds the edge value it
  repeats), has an ordinary range, and quantizes cleanly.
  Where that padding is exactly TF's SAME split (``MaxPool2d(3, 2, ceil_mode=True)`` on an even size), the pool
  becomes ``auto_pad=SAME_UPPER`` instead: one MAX_POOL_2D, as XNNPACK has no MIRROR_PAD (the edge pad's op fell
  back to LiteRT's kernels and split the model into more XNNPACK partitions).
  After a non-negative op (Relu, Clip from >= 0, Sigmoid) the pad is zeros instead (exact there: every window holds
  a real value >= 0), TFLite's PAD, which XNNPACK runs; a model's own edge Pad that only MaxPools read gets the
  same (``edge_pad_before_maxpool``: yahoo-open-nsfw's stem, two MIRROR_PAD fallbacks and three partitions).
- **PRelu, for INT8 only** (``prelu_int8``): XNNPACK has no int8 PRELU kernel; each of an MTCNN's PReLUs fell back
  to LiteRT's reference-speed kernel and cut the model into one more XNNPACK partition. ``PRelu(x, a) =
  x + (1 - a) * Relu(-x)`` (exact) is made of int8 ops XNNPACK takes (MUL with a fused RELU, MUL, ADD; a lone
  int8 RELU, as in ``Relu(x) - a * Relu(-x)``, XNNPACK refused where its input and output scales differ).
- **HardSwish and HardSigmoid, for INT8 only** (``hard_activations_int8``; PP-LCNet, MobileNetV3): XNNPACK has no
  int8 HARD_SWISH or RELU_0_TO_1; the document-orientation classifier's 28 HardSwish fell back and cut it into 32
  XNNPACK partitions (INT8 at 0.38x the FP32 speed). ``HardSwish(x) = x * Clip(x + 3, 0, 6) / 6`` and
  ``HardSigmoid(x) = Clip(6a x + 6b, 0, 6) / 6`` (exact) become ADD with a fused RELU6 and MULs.
- **Scalar affine s*x + b, for INT8 only** (``scalar_affine_int8``; PP-LCNetV3's learnable affine blocks in the
  PP-OCRv4 detector): a shift far below the tensor's range gave int8 ADDs XNNPACK refuses; a 1x1 depthwise Conv
  keeps the shift in its int32 bias (exact).
- **Nearest upsampling by an integer factor, for INT8 only** (``nearest_upsample_int8``; FPNs): XNNPACK has no
  RESIZE_NEAREST_NEIGHBOR; Concats of copies + DepthToSpace move the same values (exact).
- **Erf** (GELU in BERT-style models): TFLite has no builtin Erf (``'tf.Erf' op is neither a custom op nor a
  flex op``). ``erf(x) ~ tanh(2/sqrt(pi) * (x + 0.08943 x^3))``: max abs error 3.6e-4 (GELU built on it: 3.4e-4),
  made of ops that have int8 kernels (MUL, ADD, TANH).
- **Sum** (ONNX's n-ary add, ``ADD_N`` in TFLite, which has no int8 kernel): a chain of binary ``Add``.
- **Node names TensorFlow refuses as scope names** (PaddlePaddle exports name nodes ``Softmax@0``, ``Conv@3``):
  onnx2tf passes the node name to ops such as ``tf.nn.softmax(name=...)``, which raise "'Softmax@0' is not a
  valid scope name" (the PP-OCR classifier's arm64 failure). Such names get ``_`` for each refused character
  (unique); tensor names are untouched, so float_layers (matched on the source file's node outputs) still work.
- **Model output tensors named with a ':'** (torch names some ``onnx::Shape_422``, as in a MiniLM export): onnx2tf
  turns ':' into ``__`` in its tensor map and loses such an output (the TF graph had one output fewer than the
  ONNX model). The tensor is renamed the way onnx2tf would name it; outputs are matched by position, so nothing
  downstream sees the new name.
- **Slice over several axes** (silero-vad's STFT magnitude: ``starts [0, 129, 0], ends [max, max, max], axes [0, 1, 2]``
  on an NCW tensor): onnx2tf moves the channel axis last (axes [0, 2, 1]) but keeps starts/ends in ONNX order
  (it re-orders them only for 2-D ``axes``), so it slices the wrong axis: [1, 0, 258] instead of [1, 4, 129],
  and broadcasting spreads the 0 down to the recurrent state ([2, 0, 128]). Axes that take everything are
  dropped and the rest become one single-axis Slice each (exact).
- **ScatterElements with reduction add, mul, max or min** (a colour histogram: ``hist.scatter_add_(2, bins, ones)``):
  onnx2tf 1.28.8 stops with "ScatterElements currently supports only reduction=['none']". With ``D`` the size of
  the scatter axis, a one-hot comparison ``indices == arange(D)`` (on a new axis just after the scatter axis) masks
  the updates, and a reduction over the scatter axis gathers each target's updates, duplicates included:
  ``data + ReduceSum(onehot * updates)``, ``data * ReduceProd(Where(onehot, updates, 1))``, and for max/min
  ``Where(any hit, Max(data, ReduceMax(Where(onehot, updates, min(updates)))), data)`` (the filler is the updates'
  own minimum, so INT8 ranges stay those of the data). Exact up to float summation order; the one-hot tensor has
  ``indices.size * D`` elements (not rewritten above ``SCATTER_ONEHOT_MAX``, then the error names the node).
- **Gather of one constant index from a Concat on the same axis** (``h_n[-1]`` of a stacked LSTM/GRU: torch
  concatenates each layer's ``Y_h`` ``[1, 1, H]`` into ``[layers, 1, H]`` and gathers index -1): onnx2tf gathered
  from a channels-last copy and gave ``[layers, H]`` for ``[1, H]``. The gathered index lies in one Concat input:
  a Squeeze of it when that input has size 1 on the axis, else a Gather from it (exact).
"""
from __future__ import annotations

import math
import re

import numpy as np

ERF_A = 2.0 / math.sqrt(math.pi)
ERF_B = 0.08943
ERF_MAX_ABS_ERROR = 3.6e-4


def rewrite(model, precision: str = "fp32") -> tuple[object, list[str]]:
    """All rewrites, in order (``prelu_int8`` for an INT8 conversion only); returns (model, notes)."""
    notes: list[str] = []
    steps = (tf_scope_safe_node_names, tf_safe_output_names, slice_per_axis, maxpool_edge_padding,
             edge_pad_before_maxpool, erf_to_tanh, sum_to_add_chain, scatter_elements_reduction, gather_of_concat)
    int8_only = (prelu_int8, hard_activations_int8, scalar_affine_int8, nearest_upsample_int8)
    for step in (int8_only if precision == "int8" else ()) + steps:
        model, note = step(model)
        if note:
            notes.append(note)
    return model, notes


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _shapes(model) -> dict[str, list[int]]:
    """Static tensor shapes after ONNX shape inference (unknown dims as -1)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    out = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    for i in g.initializer:
        out[i.name] = list(i.dims)
    return out


def _replace_nodes(model, replacements: dict[int, list], initializers: list) -> None:
    nodes = []
    for i, node in enumerate(model.graph.node):
        nodes.extend(replacements.get(i, [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unique(model, base: str) -> str:
    names = {n for node in model.graph.node for n in node.output} | {i.name for i in model.graph.initializer}
    name, k = base, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    return name


_SCOPE_FIRST = re.compile(r"[A-Za-z0-9.]")
_SCOPE_REST = re.compile(r"[^A-Za-z0-9_.\\/>-]")


def tf_scope_safe_node_names(model):
    """Node names TF accepts as name scopes (``^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$``), unique."""
    bad = [n for n in model.graph.node if n.name and not _scope_ok(n.name)]
    if not bad:
        return model, None
    taken = {n.name for n in model.graph.node}
    first = bad[0].name
    for n in bad:
        base = _SCOPE_REST.sub("_", n.name)
        base = base if _SCOPE_FIRST.match(base) else f"n{base}"
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        n.name = name
    return model, (f"{len(bad)} node name(s) TF refuses as scope names made safe ({first!r} -> {bad[0].name!r}; "
                   f"onnx2tf names TF ops after them)")


def tf_safe_output_names(model):
    """Model outputs whose tensor name has a ':' renamed as onnx2tf sanitizes names (':' -> '__'), unique."""
    bad = [o.name for o in model.graph.output if ":" in o.name]
    if not bad:
        return model, None
    taken = {t for n in model.graph.node for t in (*n.input, *n.output)} | {i.name for i in model.graph.input}
    renamed = {}
    for old in bad:
        new, k = old.replace(":", "__"), 0
        while new in taken:
            k += 1
            new = f"{old.replace(':', '__')}_{k}"
        taken.add(new)
        renamed[old] = new
    for n in model.graph.node:
        n.input[:] = [renamed.get(t, t) for t in n.input]
        n.output[:] = [renamed.get(t, t) for t in n.output]
    for v in (*model.graph.output, *model.graph.value_info):
        v.name = renamed.get(v.name, v.name)
    return model, f"{len(bad)} output tensor name(s) with ':' renamed as onnx2tf names them ({bad[0]!r} -> {renamed[bad[0]]!r})"


def _scope_ok(name: str) -> bool:
    return bool(_SCOPE_FIRST.match(name)) and not _SCOPE_REST.search(name)


def maxpool_edge_padding(model):
    """MaxPool(pads, ceil_mode) -> Pad(edge) + MaxPool(VALID), where TF's SAME/VALID pooling cannot do it."""
    from onnx import helper, numpy_helper

    if _opset(model) < 11:  # Pad takes its pads as an input from opset 11 on
        return model, None
    shapes, replacements, inits, done = _shapes(model), {}, [], []
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "MaxPool" or len(node.output) != 1:
            continue
        a = _attrs(node)
        x_shape, y_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
        k = list(a.get("kernel_shape", []))
        n = len(k)
        if not x_shape or len(x_shape) != n + 2 or min(x_shape[2:]) <= 0 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if any(d != 1 for d in a.get("dilations", [1] * n)) or a.get("storage_order", 0):
            continue
        s, pads, ceil = list(a.get("strides", [1] * n)), list(a.get("pads", [0] * 2 * n)), bool(a.get("ceil_mode", 0))
        size = x_shape[2:]
        out = []
        for d in range(n):
            span = size[d] + pads[d] + pads[n + d] - k[d]
            o = (-(-span // s[d]) if ceil else span // s[d]) + 1
            if ceil and (o - 1) * s[d] >= size[d] + pads[d]:  # the last window must start inside the input
                o -= 1
            out.append(o)
        if y_shape and len(y_shape) == n + 2 and any(v > 0 and v != o for v, o in zip(y_shape[2:], out)):
            continue  # our arithmetic disagrees with the model's shapes: leave the node alone
        same = [max((-(-size[d] // s[d]) - 1) * s[d] + k[d] - size[d], 0) for d in range(n)]
        tf_same = [t // 2 for t in same] + [t - t // 2 for t in same]
        if (not any(pads) and out == [(size[d] - k[d]) // s[d] + 1 for d in range(n)]) or \
                (pads == tf_same and out == [-(-size[d] // s[d]) for d in range(n)]):
            continue  # TF's VALID or SAME pooling does exactly this
        end = [max((out[d] - 1) * s[d] + k[d] - size[d] - pads[d], 0) for d in range(n)]
        if any(p >= kk for p, kk in zip(pads[:n] + end, k + k)):
            continue  # a window entirely in the padding: not a maximum of real values, keep onnx2tf's form
        if out == [-(-size[d] // s[d]) for d in range(n)] and pads[:n] + end == tf_same:
            # TF's SAME pooling pads exactly so and takes the maximum of the real values only: one MAX_POOL_2D,
            # which XNNPACK runs (it has no MIRROR_PAD, the edge pad's TFLite op: a fallback and two partitions)
            keep = {key: v for key, v in a.items() if key not in ("pads", "ceil_mode", "auto_pad")}
            replacements[idx] = [helper.make_node("MaxPool", list(node.input), list(node.output), name=node.name,
                                                  auto_pad="SAME_UPPER", **keep)]
            done.append((node.name or node.output[0]) + " (SAME)")
            continue
        pads_name = _unique(model, node.output[0] + "_edge_pads")
        padded = _unique(model, node.output[0] + "_edge_padded")
        inits.append(numpy_helper.from_array(np.array([0, 0] + pads[:n] + [0, 0] + end, np.int64), pads_name))
        if _nonnegative(node.input[0], producer, consts):
            # every window holds a real value >= 0: zeros change no maximum, and PAD (unlike MIRROR_PAD, the edge
            # pad's TFLite op) is one XNNPACK takes in int8 and float
            pad = helper.make_node("Pad", [node.input[0], pads_name], [padded], mode="constant", name=f"{node.name}/zero_pad")
            done.append((node.name or node.output[0]) + " (zero pad after a non-negative op)")
        else:
            pad = helper.make_node("Pad", [node.input[0], pads_name], [padded], mode="edge", name=f"{node.name}/edge_pad")
            done.append(node.name or node.output[0])
        keep = {key: v for key, v in a.items() if key not in ("pads", "ceil_mode", "auto_pad")}
        pool = helper.make_node("MaxPool", [padded], list(node.output), name=node.name, **keep)
        replacements[idx] = [pad, pool]
    if not done:
        return model, None
    _replace_nodes(model, replacements, inits)
    return model, (f"MaxPool padding as TF's SAME pooling where it pads so, else as a zero Pad after a non-negative "
                   f"op (Relu, Clip from >= 0, Sigmoid), else as an edge Pad (exact; onnx2tf's "
                   f"-3.4e38 pad breaks INT8 ranges and XNNPACK): "
                   f"{', '.join(done[:5])}{' ...' if len(done) > 5 else ''}")


def edge_pad_before_maxpool(model):
    """A model's own ``Pad(edge)`` that only MaxPools read, on a non-negative tensor -> ``Pad(constant 0)`` (exact).

    TF-exported ResNets (yahoo-open-nsfw) pad ``Relu -> Transpose`` with an edge Pad before a VALID MaxPool; TFLite
    makes it MIRROR_PAD, which XNNPACK does not run (2 fallbacks, 3 partitions in the real model). Zeros give the same
    maxima when every value is >= 0 and every pooling window holds a real value (each pad < the kernel)."""
    from onnx import helper, numpy_helper

    if _opset(model) < 11:
        return model, None
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    replacements, done = {}, []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or _attrs(node).get("mode") not in (b"edge", "edge"):
            continue
        if len(node.input) < 2 or node.input[1] not in consts or (len(node.input) > 3 and node.input[3]):
            continue  # pads computed at run time, or an axes input
        pools = readers.get(node.output[0], [])
        if not pools or node.output[0] in outputs or any(p.op_type != "MaxPool" for p in pools):
            continue
        pads = [int(v) for v in consts[node.input[1]].ravel()]
        rank = len(pads) // 2
        ok = rank >= 3 and not any(pads[:2] + pads[rank:rank + 2]) and min(pads) >= 0
        for p in pools:
            a = _attrs(p)
            k = list(a.get("kernel_shape", []))
            if len(k) != rank - 2 or any(a.get("pads", [0] * 2 * len(k))) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") \
                    or any(d != 1 for d in a.get("dilations", [1] * len(k))) or a.get("ceil_mode", 0):
                ok = False
            elif any(pads[2 + d] >= k[d] or pads[rank + 2 + d] >= k[d] for d in range(len(k))):
                ok = False  # a window could lie in the padding alone
        if not ok or not _nonnegative(node.input[0], producer, consts):
            continue
        replacements[idx] = [helper.make_node("Pad", [node.input[0], node.input[1]], list(node.output), name=node.name,
                                              mode="constant")]
        done.append(node.name or node.output[0])
    if not done:
        return model, None
    _replace_nodes(model, replacements, [])
    return model, (f"edge Pad before MaxPool as a zero Pad on a non-negative input (exact; XNNPACK has no MIRROR_PAD): "
                   f"{', '.join(done[:5])}{' ...' if len(done) > 5 else ''}")


def _nonnegative(tensor: str, producer: dict, consts: dict) -> bool:
    """Is every value of ``tensor`` >= 0 by the op that makes it (Relu, Sigmoid, Clip with a lower bound >= 0),
    looking through ops that move values without changing them (Transpose, Reshape, Identity)?"""
    node = producer.get(tensor)
    for _ in range(8):
        if node is None or node.op_type not in ("Transpose", "Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze"):
            break
        node = producer.get(node.input[0])
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("Relu", "Sigmoid", "HardSigmoid", "Softmax"):
        return True
    if node.op_type == "Clip":
        lo = _attrs(node).get("min") if len(node.input) == 1 else \
            (float(consts[node.input[1]].ravel()[0]) if len(node.input) > 1 and node.input[1] in consts
             and consts[node.input[1]].size == 1 else None)
        return lo is not None and lo >= 0
    return False


def erf_to_tanh(model):
    """Erf(x) -> Tanh(x * (a + a*b*x^2)): TFLite has no Erf kernel."""
    from onnx import TensorProto, helper, numpy_helper

    replacements, inits, done = {}, [], []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Erf" or node.domain not in ("", "ai.onnx"):
            continue
        base = node.name or node.output[0]
        x, y = node.input[0], node.output[0]
        a, ab = _unique(model, y + "_erf_a"), _unique(model, y + "_erf_ab")
        inits += [numpy_helper.from_array(np.array(ERF_A, np.float32), a),
                  numpy_helper.from_array(np.array(ERF_A * ERF_B, np.float32), ab)]
        t = [_unique(model, f"{y}_erf_t{i}") for i in range(4)]
        replacements[idx] = [
            helper.make_node("Mul", [x, x], [t[0]], name=f"{base}/x2"),
            helper.make_node("Mul", [t[0], ab], [t[1]], name=f"{base}/bx2"),
            helper.make_node("Add", [t[1], a], [t[2]], name=f"{base}/a_bx2"),
            helper.make_node("Mul", [x, t[2]], [t[3]], name=f"{base}/arg"),
            helper.make_node("Tanh", [t[3]], [y], name=node.name),
        ]
        done.append(base)
    if not done:
        return model, None
    _ = TensorProto  # float32 graphs only: the constants are float32 like onnx2tf's float graph
    _replace_nodes(model, replacements, inits)
    return model, (f"Erf as tanh(2/sqrt(pi) (x + {ERF_B} x^3)) (max abs error {ERF_MAX_ABS_ERROR:g}; TFLite has no Erf "
                   f"kernel): {len(done)} node(s)")


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
            out = node.output[0] if last else _unique(model, f"{node.output[0]}_sum{i}")
            chain.append(helper.make_node("Add", [acc, operand], [out], name=node.name if last else f"{base}/add{i}"))
            acc = out
        replacements[idx] = chain
        done.append(base)
    if not done:
        return model, None
    _replace_nodes(model, replacements, [])
    return model, f"Sum as a chain of Add (ADD_N has no int8 kernel): {', '.join(done[:5])}{' ...' if len(done) > 5 else ''}"


INT_END = 2**31 - 1  # an end at or past this takes the whole axis (torch exports INT64_MAX)


def _slice_params(node, consts: dict):
    """(starts, ends, axes, steps) of a Slice with constant parameters (attributes before opset 10), or None."""
    a = _attrs(node)
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
    shapes, legacy = _shapes(model), _opset(model) < 10
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
            out = node.output[0] if last else _unique(model, f"{node.output[0]}_axis{ax}")
            name = node.name if last else f"{base}/axis{ax}"
            if legacy:
                chain.append(helper.make_node("Slice", [src], [out], name=name, starts=[st], ends=[en], axes=[ax]))
            else:
                names = [_unique(model, f"{out}_{p}") for p in ("starts", "ends", "axes", "steps")]
                model.graph.initializer.extend(  # at once, so that _unique sees them
                    numpy_helper.from_array(np.array([v], np.int64), n) for v, n in zip((st, en, ax, sp), names))
                chain.append(helper.make_node("Slice", [src, *names], [out], name=name))
            src = out
        replacements[idx] = chain
        done.append(base)
    if not done:
        return model, None
    _replace_nodes(model, replacements, [])
    return model, (f"Slice over several axes as one Slice per axis (exact; onnx2tf slices the wrong axis once the channel "
                   f"axis has moved): {', '.join(done[:5])}{' ...' if len(done) > 5 else ''}")


DECOMPOSED_HARDSWISH = True  # also rewrite Paddle's decomposed hard_swish (_decomposed_hardswish)
SCATTER_ONEHOT_MAX = 1 << 24  # elements of a ScatterElements rewrite's one-hot tensors (64 MB in float32)


def _reduce(op: str, x: str, axis: int, out: str, name: str, opset: int, model, keepdims: int = 0):
    """Reduce``op`` over one axis: axes as an input (ReduceSum from opset 13, the others from 18) or an attribute."""
    from onnx import helper, numpy_helper

    if opset >= (13 if op == "ReduceSum" else 18):
        axes = _unique(model, f"{out}_axes")
        model.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
        return helper.make_node(op, [x, axes], [out], name=name, keepdims=keepdims)
    return helper.make_node(op, [x], [out], name=name, axes=[axis], keepdims=keepdims)


def scatter_elements_reduction(model):
    """ScatterElements(reduction=add|mul|max|min) -> per row, a one-hot mask and a reduction (exact), in 2-D ops."""
    from onnx import TensorProto, helper, numpy_helper

    shapes, types, opset = _shapes(model), _elem_types(model), _opset(model)
    replacements, done = {}, []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "ScatterElements" or node.domain not in ("", "ai.onnx"):
            continue
        a = _attrs(node)
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
        if any(xs[d] != ds[d] for d in range(rank) if d != axis) or rows > SCATTER_MAX_ROWS or n * depth * rows > SCATTER_ONEHOT_MAX:
            continue  # indices smaller than data on another axis, or too big to unroll: onnx2tf names the node
        replacements[idx] = _scatter_rows(model, node, red, axis, ds, n, rows, types.get(updates, TensorProto.FLOAT), opset)
        done.append(f"{node.name or node.output[0]} ({red})")
    if not done:
        return model, None
    _replace_nodes(model, replacements, [])
    return model, (f"ScatterElements with a reduction as a one-hot mask and a reduction per row (exact; onnx2tf "
                   f"supports only reduction=none): {', '.join(done[:5])}{' ...' if len(done) > 5 else ''}")


SCATTER_MAX_ROWS = 64  # rows (data elements / scatter-axis size) a ScatterElements rewrite unrolls


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
    nodes: list = []

    def const(value, key: str) -> str:
        name = _unique(model, f"{y}_scatter_{key}")
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(kind: str, ins: list[str], key: str, out: str | None = None, **attrs) -> str:
        out = out or _unique(model, f"{y}_scatter_{key}")
        nodes.append(helper.make_node(kind, ins, [out], name=f"{base}/{key}" if out != y else node.name, **attrs))
        return out

    consts = {i.name: i for i in model.graph.initializer if i.name in (data, updates)}

    def cols(x: str, key: str, length: int) -> str:  # [.., axis, ..] -> [length, rows]: one column per row
        if x in consts:  # folded here: onnx2tf cannot make a model output of a chain of constants
            return const(numpy_helper.to_array(consts[x]).transpose(perm).reshape(rows, length).T.copy(), f"{key}_cols")
        t = op("Transpose", [x], f"{key}_last", perm=perm) if perm != list(range(rank)) else x
        t = op("Reshape", [t, const(np.array([rows, length], np.int64), f"{key}_shape")], f"{key}_rows")
        return op("Transpose", [t], f"{key}_cols", perm=[1, 0])

    idx = op("Cast", [indices], "index_int64", to=TensorProto.INT64)
    idx = cols(idx, "index", n)
    negative = op("Cast", [op("Less", [idx, const(np.array(0, np.int64), "zero")], "negative")], "negative_int",
                  to=TensorProto.INT64)  # negative indices count from the end
    idx = op("Add", [idx, op("Mul", [negative, const(np.array(depth, np.int64), "depth")], "shift")], "index")
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
            results.append(_reduce("ReduceSum", masked, 0, _unique(model, f"{y}_scatter_r{r}_sum"), f"{base}/r{r}_sum",
                                   opset, model, keepdims=1))
        elif red == "mul":
            masked = op("Where", [hot, u_r, one], f"r{r}_masked")
            results.append(_reduce("ReduceProd", masked, 0, _unique(model, f"{y}_scatter_r{r}_prod"), f"{base}/r{r}_prod",
                                   opset, model, keepdims=1))
        else:  # max / min: the filler is the updates' own min (max), which never wins over a real hit
            low = red == "max"
            fill = op("ReduceMin" if low else "ReduceMax", [u_r], f"r{r}_filler", keepdims=1)
            masked = op("Where", [hot, u_r, fill], f"r{r}_masked")
            results.append(_reduce("ReduceMax" if low else "ReduceMin", masked, 0, _unique(model, f"{y}_scatter_r{r}_{red}"),
                                   f"{base}/r{r}_{red}", opset, model, keepdims=1))
            hits.append(_reduce("ReduceMax", op("Cast", [hot], f"r{r}_onehot_float", to=TensorProto.FLOAT), 0,
                                _unique(model, f"{y}_scatter_r{r}_hits"), f"{base}/r{r}_hits", opset, model, keepdims=1))
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


def _elem_types(model) -> dict[str, int]:
    """ONNX element type of every tensor whose type shape inference knows."""
    import onnx

    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        g = model.graph
    out = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    out.update({i.name: i.data_type for i in g.initializer})
    return out


def gather_of_concat(model):
    """Gather(Concat(x0, x1, ..., axis=a), constant scalar k, axis=a) -> Squeeze(x_j) / Gather(x_j, k - offset)."""
    from onnx import helper, numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shapes, opset = _shapes(model), _opset(model)
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
        axis = int(_attrs(node).get("axis", 0))
        if not rank or axis % rank != int(_attrs(cat).get("axis", 0)) % rank:
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
                axes = _unique(model, f"{node.output[0]}_axes")
                model.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
                new = helper.make_node("Squeeze", [src, axes], list(node.output), name=node.name)
            else:
                new = helper.make_node("Squeeze", [src], list(node.output), name=node.name, axes=[axis])
        else:
            at = _unique(model, f"{node.output[0]}_index")
            model.graph.initializer.append(numpy_helper.from_array(np.array(index - offsets[j], np.int64), at))
            new = helper.make_node("Gather", [src, at], list(node.output), name=node.name, axis=axis)
        replacements[idx] = [new]
        done.append(base)
    if not done:
        return model, None
    _replace_nodes(model, replacements, [])  # the Concat stays when something else reads it; onnx2tf drops it if not
    return model, (f"Gather of one index from a Concat as that Concat input (exact; onnx2tf gathered a stacked RNN's "
                   f"h_n[-1] from a channels-last copy): {', '.join(done[:5])}{' ...' if len(done) > 5 else ''}")


def prelu_int8(model):
    """PRelu(x, a) -> x + (1 - a) * Relu(-x) with a constant slope: int8 ops XNNPACK runs (it has no int8 PRELU)."""
    from onnx import helper, numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    replacements, done = {}, []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx") or node.input[1] not in consts:
            continue
        slope = consts[node.input[1]]
        x, y, base = node.input[0], node.output[0], node.name or node.output[0]
        t = {k: _unique(model, f"{y}_prelu_{k}") for k in ("minus_one", "one_minus_slope", "neg", "negrelu", "negpart")}
        model.graph.initializer.extend([numpy_helper.from_array(np.array(-1, slope.dtype), t["minus_one"]),
                                        numpy_helper.from_array((1 - slope).astype(slope.dtype), t["one_minus_slope"])])
        replacements[idx] = [  # the Relu folds into the MUL before it (a fused activation): no lone int8 RELU
            helper.make_node("Mul", [x, t["minus_one"]], [t["neg"]], name=f"{base}/negate"),
            helper.make_node("Relu", [t["neg"]], [t["negrelu"]], name=f"{base}/negative"),
            helper.make_node("Mul", [t["negrelu"], t["one_minus_slope"]], [t["negpart"]], name=f"{base}/slope"),
            helper.make_node("Add", [x, t["negpart"]], [y], name=node.name),
        ]
        done.append(base)
    if not done:
        return model, None
    _replace_nodes(model, replacements, [])
    return model, (f"PRelu as x + (1 - slope) * Relu(-x) for INT8 (exact; XNNPACK has no int8 PRELU kernel): "
                   f"{len(done)} node(s)")


def scalar_affine_int8(model):
    """``Add(Mul(x, s), b)`` with scalar constants s, b on an NCHW tensor -> a 1x1 depthwise ``Conv`` (weight s, bias b).

    PaddlePaddle's learnable affine blocks (PP-LCNetV3 in PP-OCRv4) scale and shift every activation by two learned
    scalars. In INT8 a shift far below the tensor's range (b = -8.8e-5 on a [-20, 20] tensor) gets a constant scale
    XNNPACK refuses for ADD (input/output scale ratio under 2^-10): the real PP-OCRv4 detector had 4 such ADDs on
    LiteRT's own kernels. A depthwise conv's bias is int32 at the input x weight scale, so any shift is kept, and XNNPACK
    runs it; one op instead of two. Exact in float (s * x + b)."""
    from onnx import helper, numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"})
    shapes = _shapes(model)
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    index = {id(n): i for i, n in enumerate(model.graph.node)}

    def scalar(names) -> tuple[str, float] | None:  # (the other input, the scalar) of a binary op
        a, b = names
        for x, k in ((a, b), (b, a)):
            if k in consts and consts[k].size == 1 and consts[k].dtype == np.float32 and x not in consts:
                return x, float(consts[k].ravel()[0])
        return None

    replacements, inits, done = {}, [], []
    for mul in model.graph.node:
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
            continue
        found = scalar(mul.input)
        users = readers.get(mul.output[0], [])
        if not found or len(users) != 1 or mul.output[0] in outputs or users[0].op_type != "Add" or len(users[0].input) != 2:
            continue
        add = users[0]
        shift = scalar(add.input)
        x, s = found
        shape = shapes.get(x)
        if not shift or shift[0] != mul.output[0] or not shape or len(shape) != 4 or shape[1] <= 0:
            continue
        c, b = shape[1], shift[1]
        w, bias = _unique(model, f"{add.output[0]}_affine_w"), _unique(model, f"{add.output[0]}_affine_b")
        inits += [numpy_helper.from_array(np.full((c, 1, 1, 1), s, np.float32), w),
                  numpy_helper.from_array(np.full((c,), b, np.float32), bias)]
        replacements[index[id(mul)]] = []
        replacements[index[id(add)]] = [helper.make_node("Conv", [x, w, bias], list(add.output), name=add.name,
                                                         group=c, kernel_shape=[1, 1])]
        done.append(add.name or add.output[0])
    if not done:
        return model, None
    _replace_nodes(model, replacements, inits)
    return model, (f"scalar affine s * x + b as a 1x1 depthwise Conv for INT8 (exact; XNNPACK refuses an int8 ADD of a "
                   f"shift far below the tensor's range): {len(done)} node pair(s)")


def nearest_upsample_int8(model):
    """``Resize(nearest)`` by an integer factor k in H and W on NCHW -> ``Concat``s of k*k copies + ``DepthToSpace(k)``.

    XNNPACK has no RESIZE_NEAREST_NEIGHBOR: the real PP-OCRv4 detector's FPN had 6 upsamplings on LiteRT's own kernels,
    8 XNNPACK partitions in INT8. DepthToSpace (DCR) puts channel block (i*k + j) at offset (i, j) of each k x k cell;
    with every block a copy of x, that is out[h*k + i, w*k + j] = x[h, w], what nearest upsampling with
    ``asymmetric``/``floor`` (torch's and Paddle's export) or half-pixel/round coordinates gives for an integer
    factor. CONCATENATION and DEPTH_TO_SPACE are int8 ops XNNPACK runs. Exact (values are moved, not computed)."""
    from onnx import helper

    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"})
    shapes = _shapes(model)
    exact = {(b"asymmetric", b"floor"), (b"half_pixel", b"round_prefer_floor"), (b"half_pixel", b"round_prefer_ceil"),
             (b"pytorch_half_pixel", b"round_prefer_floor"), (b"pytorch_half_pixel", b"round_prefer_ceil")}
    replacements, done = {}, []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        a = {k: (v.encode() if isinstance(v, str) else v) for k, v in _attrs(node).items()}
        opset = _opset(model)
        coords = a.get("coordinate_transformation_mode", b"half_pixel" if opset >= 11 else b"asymmetric")
        rounding = a.get("nearest_mode", b"round_prefer_floor") if opset >= 11 else b"floor"
        if a.get("mode", b"nearest") != b"nearest" or (coords, rounding) not in exact or a.get("axes") \
                or a.get("keep_aspect_ratio_policy", b"stretch") != b"stretch":
            continue
        shape = shapes.get(node.input[0])
        if not shape or len(shape) != 4 or min(shape[1:]) <= 0:
            continue
        scales_in = node.input[1] if opset < 11 else (node.input[2] if len(node.input) > 2 else "")
        sizes_in = node.input[3] if opset >= 11 and len(node.input) > 3 else ""
        if scales_in and scales_in in consts and consts[scales_in].size == 4:
            k = [float(v) for v in consts[scales_in].ravel()]
        elif sizes_in and sizes_in in consts and consts[sizes_in].size == 4:
            k = [float(o) / float(i) for o, i in zip(consts[sizes_in].ravel(), shape)]
        else:
            continue
        f = int(round(k[2]))
        if k[:2] != [1.0, 1.0] or k[2] != k[3] or k[2] != f or f not in (2, 3, 4, 5, 8, 16):
            continue
        # XNNPACK concatenates at most 5 inputs (64 copies fell back): k*k copies as k copies of k copies, and a
        # power of two as steps of 2 (nearest x2 twice is nearest x4)
        steps, x, nodes = [2] * (f.bit_length() - 1) if f & (f - 1) == 0 else [f], node.input[0], []
        for n, step in enumerate(steps):
            row, grid = (_unique(model, f"{node.output[0]}_nearest{n}_{w}") for w in ("row", "grid"))
            out = node.output[0] if n == len(steps) - 1 else _unique(model, f"{node.output[0]}_nearest{n}")
            nodes += [helper.make_node("Concat", [x] * step, [row], axis=1, name=f"{node.name}/copies{n}"),
                      helper.make_node("Concat", [row] * step, [grid], axis=1, name=f"{node.name}/grid{n}"),
                      helper.make_node("DepthToSpace", [grid], [out], blocksize=step, mode="DCR",
                                       name=node.name if n == len(steps) - 1 else f"{node.name}/up{n}")]
            x = out
        replacements[idx] = nodes
        done.append(f"{node.name or node.output[0]} (x{f})")
    if not done:
        return model, None
    _replace_nodes(model, replacements, [])
    return model, (f"nearest upsampling by an integer factor as Concat + DepthToSpace for INT8 (exact; XNNPACK has no "
                   f"RESIZE_NEAREST_NEIGHBOR): {', '.join(done[:5])}{' ...' if len(done) > 5 else ''}")


def hard_activations_int8(model):
    """HardSwish -> (x / 6) * Clip(x + 3, 0, 6); HardSigmoid(a, b) -> Clip(6a x + 6b, 0, 6) * (1/6) (exact):
    ADD/MUL with a fused RELU6, which XNNPACK runs in int8 (it has no int8 HARD_SWISH or RELU_0_TO_1)."""
    from onnx import helper, numpy_helper

    legacy = _opset(model) < 11  # Clip's bounds are attributes before opset 11
    replacements, done = {}, []

    def const(value: float, key: str) -> str:
        name = _unique(model, key)
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def clip06(x: str, out: str, name: str):
        if legacy:
            return helper.make_node("Clip", [x], [out], name=name, min=0.0, max=6.0)
        return helper.make_node("Clip", [x, const(0.0, f"{out}_lo"), const(6.0, f"{out}_hi")], [out], name=name)

    for idx, node in enumerate(model.graph.node):
        if node.op_type not in ("HardSwish", "HardSigmoid") or node.domain not in ("", "ai.onnx"):
            continue
        x, y, base = node.input[0], node.output[0], node.name or node.output[0]
        t = {k: _unique(model, f"{y}_hard_{k}") for k in ("scaled", "shifted", "clipped", "gate")}
        if node.op_type == "HardSwish":
            # (x / 6) * relu6(x + 3): TFLite's converter folds x * relu6(x + 3) / 6 back into HARD_SWISH, not this
            nodes = [helper.make_node("Add", [x, const(3.0, f"{y}_hard_three")], [t["shifted"]], name=f"{base}/shift"),
                     clip06(t["shifted"], t["clipped"], f"{base}/relu6"),
                     helper.make_node("Mul", [x, const(1 / 6, f"{y}_hard_sixth")], [t["scaled"]], name=f"{base}/scale"),
                     helper.make_node("Mul", [t["scaled"], t["clipped"]], [y], name=node.name)]
        else:
            a = _attrs(node)
            alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
            nodes = [helper.make_node("Mul", [x, const(6 * alpha, f"{y}_hard_alpha")], [t["scaled"]], name=f"{base}/scale"),
                     helper.make_node("Add", [t["scaled"], const(6 * beta, f"{y}_hard_beta")], [t["shifted"]],
                                      name=f"{base}/shift"),
                     clip06(t["shifted"], t["clipped"], f"{base}/relu6"),
                     helper.make_node("Mul", [t["clipped"], const(1 / 6, f"{y}_hard_sixth")], [y], name=node.name)]
        replacements[idx] = nodes
        done.append(f"{base} ({node.op_type})")
    done += _decomposed_hardswish(model, replacements, const) if DECOMPOSED_HARDSWISH else []
    if not done:
        return model, None
    _replace_nodes(model, replacements, [])
    return model, (f"HardSwish/HardSigmoid as ADD + RELU6 + MUL for INT8 (exact; XNNPACK has no int8 HARD_SWISH or "
                   f"RELU_0_TO_1): {len(done)} node(s)")


def _decomposed_hardswish(model, replacements: dict, const) -> list[str]:
    """``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` (PaddlePaddle's hard_swish export) -> ``Mul(Mul(x, 1/6), Clip(..))``:
    TFLite's converter folds the first form into HARD_SWISH (no int8 XNNPACK kernel), not the second."""
    from onnx import helper, numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1

    def scalar(name: str, value: float) -> bool:
        return name in consts and consts[name].size == 1 and abs(float(consts[name].ravel()[0]) - value) < 1e-6

    def relu6_of_x_plus_3(c: str) -> str | None:  # x when c = Clip(Add(x, 3), 0, 6)
        clip = producer.get(c)
        if clip is None or clip.op_type != "Clip":
            return None
        a = _attrs(clip)
        lo_hi = (a.get("min"), a.get("max")) if len(clip.input) == 1 else None
        ok = (lo_hi is not None and lo_hi == (0.0, 6.0)) or \
            (len(clip.input) == 3 and scalar(clip.input[1], 0.0) and scalar(clip.input[2], 6.0))
        add = producer.get(clip.input[0])
        if not ok or add is None or add.op_type != "Add":
            return None
        x, k = add.input
        return x if scalar(k, 3.0) else (k if scalar(x, 3.0) else None)

    done = []
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    for node in model.graph.node:
        if node.op_type not in ("Div", "Mul") or index[id(node)] in replacements:
            continue
        six = (node.op_type == "Div" and scalar(node.input[1], 6.0)) or (node.op_type == "Mul" and scalar(node.input[1], 1 / 6))
        mul = producer.get(node.input[0])
        if not six or mul is None or mul.op_type != "Mul" or readers.get(mul.output[0], 0) != 1:
            continue
        x, c = mul.input
        if relu6_of_x_plus_3(c) != x:
            x, c = c, x
            if relu6_of_x_plus_3(c) != x:
                continue
        y, base = node.output[0], node.name or node.output[0]
        scaled = _unique(model, f"{y}_hard_scaled")
        replacements[index[id(mul)]] = [helper.make_node("Mul", [x, const(1 / 6, f"{y}_hard_sixth")], [scaled],
                                                         name=f"{base}/scale")]
        replacements[index[id(node)]] = [helper.make_node("Mul", [scaled, c], [y], name=node.name)]
        done.append(f"{base} (x * relu6(x + 3) / 6)")
    return done
