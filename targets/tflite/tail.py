"""TFLite INT8 of a detector: its float post-processing tail stays float (the ``float_tail`` setting).

A detector exported with its box decoding in the graph ends in ops that mix quantities of unrelated scales: ddddocr's
YOLOX-style captcha detector slices its head's output, decodes boxes to pixels (``(xy + grid) * stride``,
``exp(wh) * stride``) and concatenates them with the [0, 1] objectness and class scores into one output. TFLite gives
that Concat one per-tensor int8 scale: boxes up to 412 px give a step of 1.62, so every score (at most 0.74 on
the model's outputs) rounds to 0: arm64 INT8 scored f1 44-46 vs FP32 whatever layers the accuracy search made float,
where ONNX Runtime and OpenVINO, which keep that tail float (targets/onnx/static.py ``float_into_tail``,
targets/openvino.py), passed at 97-98.

Measured on that model (arm64, per output channel against ONNX Runtime on held-out images): with the tail int8 the
class and objectness scores had cosines of 0.27-0.37 and 0.93-0.95 (every score a multiple of 1.63); with it float,
0.98 and 0.99. The model still failed its f1 budget on arm64 (39-54): its box-regression conv's int8 output got the
decoded output's range ([0, 415], scale 1.63), which the MLIR quantizer propagated back from the output Concat along
the tail's same-scale layout ops (STRIDED_SLICE, TRANSPOSE, RESHAPE, CONCATENATION), float as they were. The tail's
tensors now carry no calibration statistics (mixed.py ``without_ranges``): f1 97.5, all weights INT8.

The tail is ``targets/regions.py``'s post-processing region (everything after the last weighted layer, when it is
long or holds NMS/TopK or an output Sigmoid/Softmax), kept here only when it holds more than output activations and
layout ops (``TRIVIAL``): a classifier's lone output Softmax stays int8, as before. Its nodes are found through their
tensors, not their names (an appended decode often has unnamed nodes), and their TFLite ops join the MLIR quantizer's
deny list like the accuracy search's float layers (targets/tflite/mixed.py). The tail holds no weights: the artifact's
INT8 weight share does not change.
"""
from __future__ import annotations

from pathlib import Path

TRIVIAL = ("Softmax", "LogSoftmax", "Sigmoid", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def frontend_nodes(onnx_path: Path | str) -> list:
    """The ONNX nodes of a signal-processing front-end built from ops to keep float (``float_frontend``): regions.py's
    front-end region (a constant-Q transform, an STFT, a mel filterbank before the first learned layer), [] when none.

    Spotify Basic Pitch on arm64: its 193 constant-Q ops in int8 gave an output cosine of 0.89 to FP32 (SQNR 9.6 dB),
    as in ONNX Runtime, which keeps that region float. Its fixed CQT kernels are float then, which the artifact's INT8
    weight share says (``_int8_mixed``). Unlike the tail's, the region's tensors keep their calibration statistics: its
    last one is the int8 input of the first learned layer."""
    from edgebuild.targets.regions import float_region_nodes

    return float_region_nodes(onnx_path)["frontend"]


def tail_nodes(onnx_path: Path | str) -> list:
    """The ONNX nodes (NodeProtos) of the post-processing tail to keep float; [] when there is none worth it."""
    from edgebuild.targets.regions import float_region_nodes

    tail = float_region_nodes(onnx_path)["postprocess"]
    return [] if all(n.op_type in TRIVIAL for n in tail) else tail
