"""Convolutions TFLite cannot take as they are, rewritten before onnx2tf.

- **A 3-D convolution dilated over frames** (TransNetV2's ``Conv3d(kernel (3, 1, 1), dilation (d, 1, 1))``, d = 2, 4,
  8): TensorFlow lowers a dilated ``conv3d`` through ``SpaceToBatchND`` on a 5-D tensor, which TFLite has no kernel
  for (``'tf.SpaceToBatchND' op is neither a custom op nor a flex op``), so neither FP32 nor INT8 converts. The
  frames' padding becomes a zero Pad, each of the kernel's ``kt`` taps a Slice of the padded input shifted by
  ``tap * d`` frames, the taps a Concat over channels, and the convolution one undilated Conv with kernel 1 over
  frames whose weights are the taps' weights side by side (``W'[o, tap * C + c] = W[o, c, tap]``). Exact up to float
  summation order; the node keeps its name (the accuracy search's ``float_layers`` still find it).
"""
from __future__ import annotations

import numpy as np

from .graph import finish, node_attrs, static_shapes, unique_name


def frame_dilation_as_taps(model):
    """Conv over [N, C, T, H, W] dilated (d > 1) over T only, stride 1 over T, group 1, constant weights -> Pad,
    kt shifted Slices, Concat over channels, Conv with kernel 1 over T."""
    from onnx import helper, numpy_helper

    shapes, replacements, inits, done = static_shapes(model), {}, [], []
    consts = {i.name: i for i in model.graph.initializer}
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        a = node_attrs(node)
        w = numpy_helper.to_array(consts[node.input[1]])
        x_shape, y_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
        dil, strides = list(a.get("dilations", [1] * 3)), list(a.get("strides", [1] * 3))
        pads = list(a.get("pads", [0] * 6))
        if w.ndim != 5 or a.get("group", 1) != 1 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if dil[0] <= 1 or dil[1:] != [1, 1] or strides[0] != 1 or not x_shape or len(x_shape) != 5 or min(x_shape) <= 0:
            continue
        out_c, in_c, kt = w.shape[:3]
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
                                      dilations=[1, 1, 1], pads=[0, pads[1], pads[2], 0, pads[4], pads[5]],
                                      kernel_shape=[1, *w.shape[3:]], **keep))
        replacements[idx] = nodes
        done.append(f"{base} (dilation {dil[0]})")
    return finish(model, replacements, inits, done,
                  "3-D convolutions dilated over frames as shifted taps and an undilated convolution (exact; TFLite "
                  "has no 5-D SpaceToBatchND, TensorFlow's form of a dilated conv3d)")
