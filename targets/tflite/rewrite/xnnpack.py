"""INT8-only rewrites: ops XNNPACK has no int8 kernel for, rewritten into exact equivalents it runs, so an
INT8 graph stays in one XNNPACK partition instead of falling back to LiteRT's reference kernels.

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
"""
from __future__ import annotations

import numpy as np

from .graph import finish, node_attrs, opset_of, static_shapes, unique_name

DECOMPOSED_HARDSWISH = True  # also rewrite Paddle's decomposed hard_swish (_decomposed_hardswish)


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
        t = {k: unique_name(model, f"{y}_prelu_{k}") for k in ("minus_one", "one_minus_slope", "neg", "negrelu", "negpart")}
        model.graph.initializer.extend([numpy_helper.from_array(np.array(-1, slope.dtype), t["minus_one"]),
                                        numpy_helper.from_array((1 - slope).astype(slope.dtype), t["one_minus_slope"])])
        replacements[idx] = [  # the Relu folds into the MUL before it (a fused activation): no lone int8 RELU
            helper.make_node("Mul", [x, t["minus_one"]], [t["neg"]], name=f"{base}/negate"),
            helper.make_node("Relu", [t["neg"]], [t["negrelu"]], name=f"{base}/negative"),
            helper.make_node("Mul", [t["negrelu"], t["one_minus_slope"]], [t["negpart"]], name=f"{base}/slope"),
            helper.make_node("Add", [x, t["negpart"]], [y], name=node.name),
        ]
        done.append(base)
    return finish(model, replacements, [], done,
                  "PRelu as x + (1 - slope) * Relu(-x) for INT8 (exact; XNNPACK has no int8 PRELU kernel)",
                  count="node(s)")


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
    shapes = static_shapes(model)
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
        w, bias = unique_name(model, f"{add.output[0]}_affine_w"), unique_name(model, f"{add.output[0]}_affine_b")
        inits += [numpy_helper.from_array(np.full((c, 1, 1, 1), s, np.float32), w),
                  numpy_helper.from_array(np.full((c,), b, np.float32), bias)]
        replacements[index[id(mul)]] = []
        replacements[index[id(add)]] = [helper.make_node("Conv", [x, w, bias], list(add.output), name=add.name,
                                                         group=c, kernel_shape=[1, 1])]
        done.append(add.name or add.output[0])
    return finish(model, replacements, inits, done,
                  "scalar affine s * x + b as a 1x1 depthwise Conv for INT8 (exact; XNNPACK refuses an int8 "
                  "ADD of a shift far below the tensor's range)",
                  count="node pair(s)")


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
    shapes = static_shapes(model)
    exact = {(b"asymmetric", b"floor"), (b"half_pixel", b"round_prefer_floor"), (b"half_pixel", b"round_prefer_ceil"),
             (b"pytorch_half_pixel", b"round_prefer_floor"), (b"pytorch_half_pixel", b"round_prefer_ceil")}
    replacements, done = {}, []
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        a = {k: (v.encode() if isinstance(v, str) else v) for k, v in node_attrs(node).items()}
        opset = opset_of(model)
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
            row, grid = (unique_name(model, f"{node.output[0]}_nearest{n}_{w}") for w in ("row", "grid"))
            out = node.output[0] if n == len(steps) - 1 else unique_name(model, f"{node.output[0]}_nearest{n}")
            nodes += [helper.make_node("Concat", [x] * step, [row], axis=1, name=f"{node.name}/copies{n}"),
                      helper.make_node("Concat", [row] * step, [grid], axis=1, name=f"{node.name}/grid{n}"),
                      helper.make_node("DepthToSpace", [grid], [out], blocksize=step, mode="DCR",
                                       name=node.name if n == len(steps) - 1 else f"{node.name}/up{n}")]
            x = out
        replacements[idx] = nodes
        done.append(f"{node.name or node.output[0]} (x{f})")
    return finish(model, replacements, [], done,
                  "nearest upsampling by an integer factor as Concat + DepthToSpace for INT8 (exact; XNNPACK "
                  "has no RESIZE_NEAREST_NEIGHBOR)")


def hard_activations_int8(model):
    """HardSwish -> (x / 6) * Clip(x + 3, 0, 6); HardSigmoid(a, b) -> Clip(6a x + 6b, 0, 6) * (1/6) (exact):
    ADD/MUL with a fused RELU6, which XNNPACK runs in int8 (it has no int8 HARD_SWISH or RELU_0_TO_1)."""
    from onnx import helper, numpy_helper

    legacy = opset_of(model) < 11  # Clip's bounds are attributes before opset 11
    replacements, done = {}, []

    def const(value: float, key: str) -> str:
        name = unique_name(model, key)
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
        t = {k: unique_name(model, f"{y}_hard_{k}") for k in ("scaled", "shifted", "clipped", "gate")}
        if node.op_type == "HardSwish":
            # (x / 6) * relu6(x + 3): TFLite's converter folds x * relu6(x + 3) / 6 back into HARD_SWISH, not this
            nodes = [helper.make_node("Add", [x, const(3.0, f"{y}_hard_three")], [t["shifted"]], name=f"{base}/shift"),
                     clip06(t["shifted"], t["clipped"], f"{base}/relu6"),
                     helper.make_node("Mul", [x, const(1 / 6, f"{y}_hard_sixth")], [t["scaled"]], name=f"{base}/scale"),
                     helper.make_node("Mul", [t["scaled"], t["clipped"]], [y], name=node.name)]
        else:
            a = node_attrs(node)
            alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
            nodes = [helper.make_node("Mul", [x, const(6 * alpha, f"{y}_hard_alpha")], [t["scaled"]], name=f"{base}/scale"),
                     helper.make_node("Add", [t["scaled"], const(6 * beta, f"{y}_hard_beta")], [t["shifted"]],
                                      name=f"{base}/shift"),
                     clip06(t["shifted"], t["clipped"], f"{base}/relu6"),
                     helper.make_node("Mul", [t["clipped"], const(1 / 6, f"{y}_hard_sixth")], [y], name=node.name)]
        replacements[idx] = nodes
        done.append(f"{base} ({node.op_type})")
    done += _decomposed_hardswish(model, replacements, const) if DECOMPOSED_HARDSWISH else []
    return finish(model, replacements, [], done,
                  "HardSwish/HardSigmoid as ADD + RELU6 + MUL for INT8 (exact; XNNPACK has no int8 HARD_SWISH "
                  "or RELU_0_TO_1)",
                  count="node(s)")


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
        a = node_attrs(clip)
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
        scaled = unique_name(model, f"{y}_hard_scaled")
        replacements[index[id(mul)]] = [helper.make_node("Mul", [x, const(1 / 6, f"{y}_hard_sixth")], [scaled],
                                                         name=f"{base}/scale")]
        replacements[index[id(node)]] = [helper.make_node("Mul", [scaled, c], [y], name=node.name)]
        done.append(f"{base} (x * relu6(x + 3) / 6)")
    return done
