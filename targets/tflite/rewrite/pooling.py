"""MaxPool padding rewrites before onnx2tf (exact).

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
- **A 3-D pool that pools each frame alone** (kernel and stride 1 on the depth axis: TransNetV2's
  ``AvgPool3d((1, 2, 2))`` on ``[1, 64, 100, 27, 48]``): onnx2tf 1.28.8 stops with "Index out of range using input
  dim 5" in its slicing. Channels and frames merge into one axis (a Reshape, no data moves), a 2-D pool of the same
  kernel, strides, pads and ceil_mode runs over it, and a Reshape splits them again (``frame_pool_as_2d``, exact).
"""
from __future__ import annotations

import numpy as np

from .graph import finish, node_attrs, nonnegative, opset_of, static_shapes, unique_name

def frame_pool_as_2d(model):
    """AveragePool/MaxPool on [N, C, D, H, W] with kernel 1 and stride 1 on D -> Reshape [N, C*D, H, W], the 2-D
    pool, Reshape [N, C, D, H', W'] (exact: each frame of each channel is pooled alone either way)."""
    from onnx import helper, numpy_helper

    shapes, replacements, inits, done = static_shapes(model), {}, [], []
    for idx, node in enumerate(model.graph.node):
        if node.op_type not in ("AveragePool", "MaxPool") or len(node.output) != 1:
            continue
        a = node_attrs(node)
        x_shape, y_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
        k, s = list(a.get("kernel_shape", [])), list(a.get("strides", [1, 1, 1]))
        pads = list(a.get("pads", [0] * 6))
        if len(k) != 3 or k[0] != 1 or s[0] != 1 or pads[0] or pads[3] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if any(d != 1 for d in a.get("dilations", [1, 1, 1])) or a.get("storage_order", 0):
            continue
        if not x_shape or not y_shape or len(x_shape) != 5 or len(y_shape) != 5 or min(x_shape + y_shape) <= 0:
            continue
        n, c, depth = x_shape[:3]
        merged = unique_name(model, node.output[0] + "_frames")
        pooled = unique_name(model, node.output[0] + "_frames_pooled")
        in_shape = unique_name(model, node.output[0] + "_frames_shape")
        out_shape = unique_name(model, node.output[0] + "_shape")
        inits += [numpy_helper.from_array(np.array([n, c * depth, *x_shape[3:]], np.int64), in_shape),
                  numpy_helper.from_array(np.array(y_shape, np.int64), out_shape)]
        keep = {key: v for key, v in a.items() if key not in ("kernel_shape", "strides", "pads", "dilations")}
        replacements[idx] = [
            helper.make_node("Reshape", [node.input[0], in_shape], [merged], name=f"{node.name}/frames"),
            helper.make_node(node.op_type, [merged], [pooled], name=node.name, kernel_shape=k[1:], strides=s[1:],
                             pads=pads[1:3] + pads[4:6], **keep),
            helper.make_node("Reshape", [pooled, out_shape], list(node.output), name=f"{node.name}/unframes")]
        done.append(node.name or node.output[0])
    return finish(model, replacements, inits, done,
                  "3-D pooling with kernel 1 over frames as a 2-D pool over channels x frames (exact; onnx2tf's "
                  "3-D pool slicing fails on 5-D tensors)")


def maxpool_edge_padding(model):
    """MaxPool(pads, ceil_mode) -> Pad(edge) + MaxPool(VALID), where TF's SAME/VALID pooling cannot do it."""
    from onnx import helper, numpy_helper

    if opset_of(model) < 11:  # Pad takes its pads as an input from opset 11 on
        return model, None
    shapes, replacements, inits, done = static_shapes(model), {}, [], []
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "MaxPool" or len(node.output) != 1:
            continue
        a = node_attrs(node)
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
        pads_name = unique_name(model, node.output[0] + "_edge_pads")
        padded = unique_name(model, node.output[0] + "_edge_padded")
        inits.append(numpy_helper.from_array(np.array([0, 0] + pads[:n] + [0, 0] + end, np.int64), pads_name))
        if nonnegative(node.input[0], producer, consts):
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
    return finish(model, replacements, inits, done,
                  "MaxPool padding as TF's SAME pooling where it pads so, else as a zero Pad after a "
                  "non-negative op (Relu, Clip from >= 0, Sigmoid), else as an edge Pad (exact; onnx2tf's "
                  "-3.4e38 pad breaks INT8 ranges and XNNPACK)")


def edge_pad_before_maxpool(model):
    """A model's own ``Pad(edge)`` that only MaxPools read, on a non-negative tensor -> ``Pad(constant 0)`` (exact).

    TF-exported ResNets (yahoo-open-nsfw) pad ``Relu -> Transpose`` with an edge Pad before a VALID MaxPool; TFLite
    makes it MIRROR_PAD, which XNNPACK does not run (2 fallbacks, 3 partitions in the real model). Zeros give the same
    maxima when every value is >= 0 and every pooling window holds a real value (each pad < the kernel)."""
    from onnx import helper, numpy_helper

    if opset_of(model) < 11:
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
        if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or node_attrs(node).get("mode") not in (b"edge", "edge"):
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
            a = node_attrs(p)
            k = list(a.get("kernel_shape", []))
            if len(k) != rank - 2 or any(a.get("pads", [0] * 2 * len(k))) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") \
                    or any(d != 1 for d in a.get("dilations", [1] * len(k))) or a.get("ceil_mode", 0):
                ok = False
            elif any(pads[2 + d] >= k[d] or pads[rank + 2 + d] >= k[d] for d in range(len(k))):
                ok = False  # a window could lie in the padding alone
        if not ok or not nonnegative(node.input[0], producer, consts):
            continue
        replacements[idx] = [helper.make_node("Pad", [node.input[0], node.input[1]], list(node.output), name=node.name,
                                              mode="constant")]
        done.append(node.name or node.output[0])
    return finish(model, replacements, [], done,
                  "edge Pad before MaxPool as a zero Pad on a non-negative input (exact; XNNPACK has no "
                  "MIRROR_PAD)")
