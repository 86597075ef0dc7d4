"""ONNX LSTM as TFLite's fused sequence op, UNIDIRECTIONAL_SEQUENCE_LSTM (issue 22, item 2).

onnx2tf builds every ONNX LSTM as a Keras ``RNN`` over its own ``CustomLSTMCell``: TF's converter keeps that as a
WHILE loop whose body is a dozen small ops per time step (FULLY_CONNECTED, SPLIT, LOGISTIC, TANH, MUL, ADD, ...),
each run by the interpreter once per step, outside XNNPACK. A Keras ``LSTM`` layer is what TF's converter fuses into
one UNIDIRECTIONAL_SEQUENCE_LSTM (its ``api_implements`` signature): one kernel for the whole sequence, float16 weights
dequantized once under FP16.

**The fused op is stateful, so it is opt-in** (``quant: {lstm_fused: true}``, FP32 and FP16). TFLite gives the op its
initial state as variable tensors and writes the final state back into them: the next ``invoke()`` starts where the
last one ended (measured: the same input twice, outputs 0.37 apart; tensorflow/tensorflow#47813). A zero state made
in the graph is still a variable, and a computed one does not convert ("Failed to duplicate values for the stateful
op"). The source model starts every call from zero, so a device app must call ``reset_all_variables()`` (Android:
``resetVariableTensors()``) before each independent sequence: the artifact's note and manifest say so, and
edgebuild's runner does it before every run. Streaming apps that want the state carried over get it for free. It
is not faster (scripts/benchmark_lstm_fused.py: the loop body's FULLY_CONNECTED run in XNNPACK, the fused op does
not) but holds about 0.6x the runtime memory. Dynamic-range INT8 keeps the loop: TF's hybrid fused kernel has one
weight scale per gate matrix, not per output channel, and on Resemblyzer's trained weights it collapsed (worst
embedding cosine 0.35, and 0.46x the loop's speed) where the loop's per-channel FULLY_CONNECTED kept the task.

``FUSED_LSTM`` builds that layer where it computes exactly what onnx2tf's cell computes: the default activations
(sigmoid, tanh, tanh), no peepholes, no clip, no coupled input and forget gates, constant weights, a zero initial
state (what a reset gives back), and no final cell state ``Y_c`` read (the fused op outputs the sequence only: TF
does not fuse a layer with ``return_state``; ``Y_h`` is the sequence's last step, in processing order for a reverse
direction as well). onnx2tf has already put the gates in Keras's order (i, f, c, o), transposed the weights to
``[input, 4*hidden]`` and split the bias; a reverse direction is ``go_backwards`` in both. Any other LSTM keeps
onnx2tf's cell. GRU and RNN have no fused TFLite builtin and keep the loop.

A PyTorch export names ``Y_c`` even when nothing reads it: ``without_unread_cell_state`` drops that output from the
ONNX graph first (exact: an optional output no node and no graph output reads)."""
from __future__ import annotations

import numpy as np

from edgebuild.procs import Patch, patched

DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")  # f, g, h of the ONNX LSTM
FUSED_PRECISIONS = ("fp32", "fp16")  # dynamic range keeps the loop's per-channel int8 weights
# TFLite ops that keep a state in variable tensors from one invocation to the next
STATEFUL_OPS = frozenset({"UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM", "UNIDIRECTIONAL_SEQUENCE_RNN",
                          "BIDIRECTIONAL_SEQUENCE_RNN", "LSTM", "SVDF"})


def _default_activations(activations, backwards_half: bool) -> bool:
    """Are the f, g, h activations of this direction onnx2tf's Sigmoid/Tanh/Tanh with alpha 1 and beta 0?"""
    start = 3 if backwards_half and len(activations) == 6 else 0
    chosen = list(activations[start:start + 3])
    return len(chosen) == 3 and all(type(a).__name__ == name and getattr(a, "alpha", 1.0) == 1.0
                                    and getattr(a, "beta", 0.0) == 0.0 for a, name in zip(chosen, DEFAULT_ACTIVATIONS))


def fusable(kw: dict) -> bool:
    """Does the Keras LSTM compute what onnx2tf's CustomLSTM with these arguments computes?"""
    return (not kw.get("enable_rnn_unroll") and not kw.get("clip") and not kw.get("input_forget")
            and all(kw.get(p) is None for p in ("peephole_i", "peephole_f", "peephole_o"))
            and _default_activations(kw["activations"], kw.get("is_bidirectional") and kw.get("go_backwards"))
            and all(_constant(kw[k]) is not None for k in ("kernel", "recurrent_kernel", "bias_i", "bias_f",
                                                            "bias_c", "bias_o")))


def _constant(t):
    """The value of a constant (a NumPy array or an eager tensor); None for a graph tensor."""
    if isinstance(t, np.ndarray):
        return t
    try:
        return np.asarray(t.numpy())
    except (AttributeError, TypeError, ValueError):  # a symbolic tensor has no value
        return None


def fused_layer_class():
    import tf_keras

    class FusedLSTM(tf_keras.layers.Layer):
        """onnx2tf's CustomLSTM interface (``call(inputs, initial_state) -> (outputs, h, c)``) on a Keras LSTM."""

        def __init__(self, *, hidden_size, kernel, recurrent_kernel, bias_i, bias_f, bias_c, bias_o, go_backwards,
                     **_checked_by_fusable):
            super().__init__()
            bias = np.concatenate([_constant(b).reshape(-1) for b in (bias_i, bias_f, bias_c, bias_o)])
            const = tf_keras.initializers.Constant
            self.lstm = tf_keras.layers.LSTM(
                int(hidden_size), return_sequences=True, go_backwards=go_backwards,
                unroll=False, unit_forget_bias=False, kernel_initializer=const(_constant(kernel)),
                recurrent_initializer=const(_constant(recurrent_kernel)), bias_initializer=const(bias))

        def call(self, inputs, initial_state=None):  # zeros or none (_state_resets_to_zero): the layer's own
            sequence = self.lstm(inputs)
            last = sequence[:, -1, :]  # Y_h: the state after the last step processed
            # (outputs, Y_h, Y_c): onnx2tf stacks a Y_c tensor even when the node has none (without_unread_cell_state),
            # then drops it; the Y_h tensor stands there, in no graph output
            return sequence, last, last

    return FusedLSTM


def _fused_or_custom(custom):
    fused = fused_layer_class()

    def make(*args, **kw):
        return fused(**kw) if not args and fusable(kw) else custom(*args, **kw)

    return make


def _zeros(t, depth: int = 0) -> bool:
    """Is graph-surgeon tensor ``t`` all zeros: a zero constant, or a broadcast of one (PyTorch's export of an LSTM's
    default state: ``Expand`` of a zero constant to the batch's shape; ``ConstantOfShape`` of 0)?"""
    values = getattr(t, "values", None)  # a gs.Constant
    if values is not None:
        return not np.any(np.asarray(values))
    made_by = getattr(t, "inputs", None) or []
    if len(made_by) != 1 or depth > 4:
        return False
    node = made_by[0]
    if node.op in ("Expand", "Tile") and node.inputs:
        return _zeros(node.inputs[0], depth + 1)
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        return value is None or not np.any(np.asarray(getattr(value, "values", value)))
    return False


def _state_resets_to_zero(graph_node, tf_layers_dict: dict) -> bool:
    """Is each initial state (``initial_h``, ``initial_c``) absent or all zeros (in the ONNX graph, or as onnx2tf
    computed it eagerly)? The fused layer then starts from its own zero state.

    What ``reset_all_variables()`` gives back is zeros: a non-zero constant state would be lost at the first reset,
    and a state fed or computed in the graph reaches the op through a slice, which TF's converter cannot make the
    op's variable ("cannot duplicate the value since it's not constant")."""
    for t in graph_node.inputs[5:7]:
        if not t.name or _zeros(t):
            continue
        value = _constant(tf_layers_dict.get(t.name, {}).get("tf_node"))
        if value is None or np.any(value):
            return False
    return True


def _make_node(real):
    def make_node(*, graph_node, **kwargs):
        if len(graph_node.outputs) >= 3 and graph_node.outputs[2].name \
                or not _state_resets_to_zero(graph_node, kwargs.get("tf_layers_dict") or {}):
            return real(graph_node=graph_node, **kwargs)  # Y_c read, or a state the fused op cannot hold: the loop
        with patched([Patch("onnx2tf.ops.LSTM", "CustomLSTM", wrap=_fused_or_custom, why="this LSTM node's layer")]):
            return real(graph_node=graph_node, **kwargs)

    return make_node


FUSED_LSTM = (Patch("onnx2tf.ops.LSTM", "make_node", wrap=_make_node,
                    why="an ONNX LSTM without a read Y_c as a Keras LSTM, which TF's converter fuses into "
                        "UNIDIRECTIONAL_SEQUENCE_LSTM"),)


def without_unread_cell_state(model):
    """``model`` with the final cell state ``Y_c`` removed from every LSTM node that has it and nothing reads it."""
    graph = model.graph
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "LSTM" and len(node.output) == 3 and node.output[2] not in read:
            del node.output[2]
    return model
