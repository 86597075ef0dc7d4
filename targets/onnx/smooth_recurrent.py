"""Recurrent inputs smoothed for dynamic INT8: each input channel's range moved into the layer's input weights.

Dynamic INT8 quantizes a recurrent layer's input at every time step with one scale for the step's vector. A model
that feeds raw features straight into an LSTM has input channels of very different sizes: Resemblyzer's speaker
encoder reads the mel power spectrogram, whose 40 channels peak between 0.007 and 4.5 over the calibration set
(620x), and its trained input weights are large where the channels are small. In 8 bits per step the small channels
round to zero: TFLite dynamic-range INT8 of it scored an embedding cosine of 0.88 with the FP32 model (nearest
neighbour agreement 31 %), a build failure.

SmoothQuant's migration (Xiao et al. 2023) fixes the input side: channel ``j`` of the input is divided by ``s_j``
(one Mul in front of the layer, in float) and column ``j`` of the input weights ``W`` multiplied by it, which the
float model computes exactly as before. ``s_j = a_j ** ALPHA / w_j ** (1 - ALPHA)``, ``a_j`` the channel's largest
|value| over the calibration samples, ``w_j`` the largest |weight| in column ``j``. Measured on Resemblyzer with
TFLite dynamic range: embedding cosine 0.88 -> 0.995 (mean), the same weights in int8 (ALPHA 0.5: 0.983; 1.0:
0.994 with a worse worst case in fake quant). Only layers whose input channels differ by more than ``SPREAD`` are
touched; a stacked layer's input (the previous layer's bounded hidden state) is left as it is.

This is for dynamic INT8 (a per-step scale): where a whole sequence shares one input scale (onnxruntime's
DynamicQuantizeLSTM), fake quant of the same model reached only 0.978, so the onnx backend does not use it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet

RECURRENT = ("LSTM", "GRU", "RNN")
ALPHA = 0.75  # how much of each channel's range moves into the weights
SPREAD = 32.0  # smooth a layer whose input channels' ranges differ by more than this factor
FLOOR = 1e-8  # a dead channel or weight column is not divided by zero


def recurrent_inputs(model) -> list[tuple]:
    """(node, its input tensor X, its input weights W's initializer) of each LSTM/GRU/RNN with constant W."""
    inits = {i.name: i for i in model.graph.initializer}
    return [(n, n.input[0], inits[n.input[1]]) for n in model.graph.node
            if n.op_type in RECURRENT and len(n.input) > 1 and n.input[1] in inits]


def smooth(src: Path, out: Path, calib: SampleSet) -> list[str]:
    """Write ``src`` with the imbalanced recurrent inputs smoothed to ``out``; the names of the layers smoothed. The
    input ranges are measured as equalization measures its channels (``equalize.channel_ranges``, the last axis)."""
    import onnx
    from onnx import helper, numpy_helper

    from edgebuild.targets.onnx.equalize import channel_ranges

    model = onnx.load(str(src))
    found = recurrent_inputs(model)
    ranges = channel_ranges(src, sorted({x for _, x, _ in found}), calib, axis=-1) if found else {}
    done: list[str] = []
    for k, (node, x, w_init) in enumerate(found):
        a = np.maximum(ranges[x].astype(np.float64), FLOOR)
        if a.max() / a.min() <= SPREAD:
            continue
        w = numpy_helper.to_array(w_init)  # [directions, gates x hidden, C]
        s = a ** ALPHA / np.maximum(np.abs(w).max(axis=(0, 1)), FLOOR) ** (1 - ALPHA)
        w_init.CopyFrom(numpy_helper.from_array((w * s).astype(w.dtype), w_init.name))
        inv = f"{node.name or node.op_type}_smooth{k}_inv"
        model.graph.initializer.append(numpy_helper.from_array((1 / s).astype(np.float32), inv))
        mul = helper.make_node("Mul", [x, inv], [f"{inv}_out"], name=f"{node.name or node.op_type}_smooth{k}")
        node.input[0] = mul.output[0]
        model.graph.node.insert(list(model.graph.node).index(node), mul)
        done.append(node.name or f"{node.op_type} #{k}")
    onnx.save(model, str(out))
    return done


def smoothed_source(onnx_path: Path | str, calib: SampleSet, workdir: Path) -> tuple[Path, str]:
    """For a converter that takes the source ONNX model (onnx2tf): ``workdir/smoothed.onnx``, the model with its constant
    weights as initializers (an exporter's Constant nodes folded, names kept) and smoothed; the note that says so."""
    from edgebuild.targets.onnx.prepare import on_folded_copy

    out = workdir / "smoothed.onnx"
    done = on_folded_copy(onnx_path, out, lambda src, dst: smooth(src, dst, calib))
    return out, (f"recurrent input smoothing: {', '.join(done)} read input channels whose ranges differ by more than "
                 f"{SPREAD:g}x; each channel's range moved into the input weights (SmoothQuant, alpha {ALPHA}, exact "
                 "in float)" if done else "recurrent input smoothing: no recurrent layer reads imbalanced channels")
