"""ONNX graph rewrites applied before onnx2tf, each exact or with a stated bound, each recorded.

They turn graphs that onnx2tf converts into something no TFLite runtime can use (or that INT8 breaks) into
equivalent graphs it converts well. ``rewrite(model)`` returns the model and one line per rewrite applied;
node names and output tensor names are kept, so ONNX node names (the accuracy search's ``float_layers``) and
onnx2tf's tensor map still find them. Runs in the conversion child (targets/tflite/convert.py).

One module per family, each documenting its rewrites: ``names`` (node and output names TF or onnx2tf refuse),
``conv`` (3-D convolutions over frames as taps and per-frame 2-D convolutions), ``pooling`` (MaxPool padding and
ceil_mode, edge pads before MaxPool, 3-D pools over single frames), ``ops`` (Erf, Sum, multi-axis Slice, Gather
of a Concat), ``scatter`` (ScatterElements with a reduction), ``xnnpack`` (INT8 only: PRelu, HardSwish/HardSigmoid,
scalar affine, nearest upsampling, which XNNPACK has no int8 kernel for); ``graph`` holds the shared helpers.
"""
from __future__ import annotations

from .conv import frame_taps, frames_conv_as_2d
from .names import tf_safe_output_names, tf_scope_safe_node_names
from .ops import erf_to_tanh, gather_of_concat, slice_per_axis, sum_to_add_chain
from .pooling import edge_pad_before_maxpool, frame_pool_as_2d, maxpool_edge_padding
from .scatter import scatter_elements_reduction
from .xnnpack import hard_activations_int8, nearest_upsample_int8, prelu_int8, scalar_affine_int8


def rewrite(model, precision: str = "fp32") -> tuple[object, list[str]]:
    """All rewrites, in order (the ``xnnpack`` ones for an INT8 conversion only); returns (model, notes)."""
    notes: list[str] = []
    steps = (tf_scope_safe_node_names, tf_safe_output_names, slice_per_axis, frame_pool_as_2d, frame_taps,
             frames_conv_as_2d, maxpool_edge_padding, edge_pad_before_maxpool, erf_to_tanh, sum_to_add_chain,
             scatter_elements_reduction, gather_of_concat)
    int8_only = (prelu_int8, hard_activations_int8, scalar_affine_int8, nearest_upsample_int8)
    for step in (int8_only if precision == "int8" else ()) + steps:
        model, note = step(model)
        if note:
            notes.append(note)
    return model, notes
