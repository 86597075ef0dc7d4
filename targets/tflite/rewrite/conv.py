"""Convolutions TFLite cannot take as they are, rewritten before onnx2tf.

- **A 3-D convolution over several frames** (TransNetV2's ``Conv3d(kernel (3, 1, 1), dilation (d, 1, 1))``, d = 1,
  2, 4, 8): TensorFlow lowers a dilated ``conv3d`` through ``SpaceToBatchND`` on a 5-D tensor, which TFLite has no
  kernel for (``'tf.SpaceToBatchND' op is neither a custom op nor a flex op``), so neither FP32 nor INT8 converted;
  undilated, it is a CONV_3D, which has no int8 and no XNNPACK kernel (below). The
  frames' padding becomes a zero Pad, each of the kernel's ``kt`` taps a Slice of the padded input shifted by
  ``tap * d`` frames, the taps a Concat over channels, and the convolution one undilated Conv with kernel 1 over
  frames whose weights are the taps' weights side by side (``W'[o, tap * C + c] = W[o, c, tap]``). Exact up to float
  summation order; the node keeps its name (the accuracy search's ``float_layers`` still find it).
- **A 3-D convolution with kernel 1 over frames** (TransNetV2's ``(1, 3, 3)`` convs and the taps' convs above):
  TFLite's CONV_3D has no int8 kernel and XNNPACK none at all (TransNetV2's INT8 kept all 48 float on LiteRT's
  reference kernels: 67 % of the weights INT8, 1.01x FP32). Frames move next to the batch (a Transpose), merge into it
  (a Reshape), each frame is convolved by the same 2-D conv (CONV_2D: int8, XNNPACK), and the frames are split out and
  moved back (``frames_conv_as_2d``; exact up to summation order).
"""
from __future__ import annotations

import numpy as np

from .graph import finish, node_attrs, static_shapes, unique_name


def _convs_3d(model):
    """Each 3-D Conv with constant weights and explicit pads: (index, node, attributes, weights, input shape, output
    shape, dilations, strides, pads); shapes where static shape inference knows them."""
    from onnx import numpy_helper

    shapes = static_shapes(model)
    consts = {i.name: i for i in model.graph.initializer}
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        a = node_attrs(node)
        w = numpy_helper.to_array(consts[node.input[1]])
        if w.ndim != 5 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        yield (idx, node, a, w, shapes.get(node.input[0]), shapes.get(node.output[0]),
               list(a.get("dilations", [1] * 3)), list(a.get("strides", [1] * 3)), list(a.get("pads", [0] * 6)))


def frame_taps(model):
    """Conv over [N, C, T, H, W] with kernel kt > 1 over T (any dilation d), stride 1 over T, group 1, constant
    weights -> Pad, kt Slices shifted by d, Concat over channels, Conv with kernel 1 over T."""
    from onnx import helper, numpy_helper

    replacements, inits, done = {}, [], []
    for idx, node, a, w, x_shape, y_shape, dil, strides, pads in _convs_3d(model):
        if a.get("group", 1) != 1:
            continue
        out_c, in_c, kt = w.shape[:3]
        if kt <= 1 or strides[0] != 1 or not x_shape or len(x_shape) != 5 or min(x_shape) <= 0:
            continue
        frames = x_shape[2] + pads[0] + pads[3] - (kt - 1) * dil[0]
        if frames <= 0 or (y_shape and len(y_shape) == 5 and y_shape[2] > 0 and y_shape[2] != frames):
            continue
        base, y = node.name or node.output[0], node.output[0]
        nodes, src = [], node.input[0]

        def const(value, key: str) -> str:
            name = unique_name(model, f"{y}_taps_{key}")
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            return name

        if pads[0] or pads[3]:
            padded = unique_name(model, f"{y}_taps_padded")
            nodes.append(helper.make_node("Pad", [src, const(np.array([0, 0, pads[0], 0, 0, 0, 0, pads[3], 0, 0],
                                                                      np.int64), "pads")],
                                          [padded], mode="constant", name=f"{base}/frame_pad"))
            src = padded
        axis = const(np.array([2], np.int64), "axis")
        taps = []
        for k in range(kt):
            taps.append(unique_name(model, f"{y}_tap{k}"))
            nodes.append(helper.make_node("Slice", [src, const(np.array([k * dil[0]], np.int64), f"start{k}"),
                                                    const(np.array([k * dil[0] + frames], np.int64), f"end{k}"), axis],
                                          [taps[-1]], name=f"{base}/tap{k}"))
        stacked = unique_name(model, f"{y}_taps")
        nodes.append(helper.make_node("Concat", taps, [stacked], axis=1, name=f"{base}/taps"))
        weights = const(w.transpose(0, 2, 1, 3, 4).reshape(out_c, kt * in_c, 1, *w.shape[3:]).copy(), "weights")
        keep = {key: v for key, v in a.items() if key not in ("dilations", "pads", "kernel_shape")}
        nodes.append(helper.make_node("Conv", [stacked, weights, *node.input[2:]], [y], name=node.name,
                                      dilations=[1, *dil[1:]], pads=[0, pads[1], pads[2], 0, pads[4], pads[5]],
                                      kernel_shape=[1, *w.shape[3:]], **keep))
        replacements[idx] = nodes
        done.append(f"{base} (dilation {dil[0]})")
    return finish(model, replacements, inits, done,
                  "3-D convolutions over several frames as shifted taps and a convolution with kernel 1 over frames "
                  "(exact; TFLite has no 5-D SpaceToBatchND, TensorFlow's form of a dilated conv3d)")


def frames_conv_as_2d(model):
    """Conv over [N, C, D, H, W] with kernel, stride and dilation 1 and no padding over D, constant weights ->
    Transpose [N, D, C, H, W], Reshape [N*D, C, H, W], the 2-D Conv, Reshape [N, D, O, H', W'], Transpose back."""
    from onnx import helper, numpy_helper

    replacements, inits, done = {}, [], []
    for idx, node, a, w, x_shape, y_shape, dil, strides, pads in _convs_3d(model):
        if w.shape[2] != 1 or dil[0] != 1 or strides[0] != 1 or pads[0] or pads[3] or not x_shape or not y_shape \
                or len(x_shape) != 5 or len(y_shape) != 5 or min(x_shape + y_shape) <= 0:
            continue
        base, y = node.name or node.output[0], node.output[0]
        n, c, frames = x_shape[:3]

        def const(value, key: str) -> str:
            name = unique_name(model, f"{y}_frames_{key}")
            inits.append(numpy_helper.from_array(np.asarray(value), name))
            return name

        names = [unique_name(model, f"{y}_frames_{k}") for k in ("first", "merged", "conv", "split")]
        keep = {key: v for key, v in a.items() if key not in ("dilations", "pads", "kernel_shape", "strides")}
        replacements[idx] = [
            helper.make_node("Transpose", [node.input[0]], [names[0]], perm=[0, 2, 1, 3, 4], name=f"{base}/frames_first"),
            helper.make_node("Reshape", [names[0], const(np.array([n * frames, c, *x_shape[3:]], np.int64), "in_shape")],
                             [names[1]], name=f"{base}/frames_merged"),
            helper.make_node("Conv", [names[1], const(w[:, :, 0].copy(), "weights"), *node.input[2:]], [names[2]],
                             name=node.name, kernel_shape=list(w.shape[3:]), strides=strides[1:], dilations=dil[1:],
                             pads=[pads[1], pads[2], pads[4], pads[5]], **keep),
            helper.make_node("Reshape", [names[2], const(np.array([n, frames, y_shape[1], *y_shape[3:]], np.int64),
                                                          "out_shape")], [names[3]], name=f"{base}/frames_split"),
            helper.make_node("Transpose", [names[3]], [y], perm=[0, 2, 1, 3, 4], name=f"{base}/frames_back")]
        done.append(base)
    return finish(model, replacements, inits, done,
                  "3-D convolutions with kernel 1 over frames as one 2-D convolution of every frame (exact; TFLite's "
                  "CONV_3D has no int8 kernel and no XNNPACK one)", count="node(s)")
