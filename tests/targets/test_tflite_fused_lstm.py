"""Which ONNX LSTMs become TFLite's fused sequence op (targets/tflite/fused_lstm.py): only those the Keras LSTM
computes exactly, and only once their unread final cell state is dropped from the graph."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from edgebuild.targets.tflite.fused_lstm import fusable, without_unread_cell_state  # noqa: E402


class Sigmoid:
    alpha, beta = 1.0, 0.0


class Tanh:
    alpha, beta = 1.0, 0.0


class ScaledTanh(Tanh):
    pass


def args(**changes):
    w = np.ones((4, 8), np.float32)
    kw = dict(hidden_size=2, kernel=w, recurrent_kernel=np.ones((2, 8), np.float32), activations=[Sigmoid(), Tanh(), Tanh()],
              bias_i=np.zeros((1, 2)), bias_f=np.zeros((1, 2)), bias_c=np.zeros((1, 2)), bias_o=np.zeros((1, 2)),
              peephole_i=None, peephole_f=None, peephole_o=None, clip=None, input_forget=False,
              is_bidirectional=False, go_backwards=False, enable_rnn_unroll=False)
    return {**kw, **changes}


def test_only_the_lstm_a_keras_lstm_computes_exactly_is_fused():
    assert fusable(args())
    assert fusable(args(is_bidirectional=True, go_backwards=True, activations=[Sigmoid(), Tanh(), Tanh()] * 2))
    assert not fusable(args(enable_rnn_unroll=True))  # full-integer INT8 unrolls
    assert not fusable(args(clip=3.0))
    assert not fusable(args(input_forget=True))
    assert not fusable(args(peephole_i=np.ones((1, 2))))
    assert not fusable(args(activations=[Sigmoid(), ScaledTanh(), Tanh()]))
    odd = Tanh()
    odd.alpha = 2.0
    assert not fusable(args(activations=[Sigmoid(), odd, Tanh()]))
    backwards_odd = [Sigmoid(), Tanh(), Tanh(), Sigmoid(), ScaledTanh(), Tanh()]
    assert fusable(args(is_bidirectional=True, activations=backwards_odd))  # the forward half reads the first three
    assert not fusable(args(is_bidirectional=True, go_backwards=True, activations=backwards_odd))
    assert not fusable(args(kernel=object()))  # a weight computed in the graph, not a constant


def lstm_graph(outputs_read):
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y", "y_h", "y_c"], hidden_size=2)
    reads = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in outputs_read]
    w = helper.make_tensor("W", TensorProto.FLOAT, [1, 8, 3], np.zeros(24))
    r = helper.make_tensor("R", TensorProto.FLOAT, [1, 8, 2], np.zeros(16))
    graph = helper.make_graph([node, *reads], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1, 3])],
                              [helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, None) for n in outputs_read],
                              [w, r])
    return helper.make_model(graph)


def test_an_unread_final_cell_state_is_dropped_and_a_read_one_kept():
    assert list(without_unread_cell_state(lstm_graph(["y", "y_h"])).graph.node[0].output) == ["y", "y_h"]
    assert list(without_unread_cell_state(lstm_graph(["y_c"])).graph.node[0].output) == ["y", "y_h", "y_c"]
    as_output = lstm_graph(["y"])
    as_output.graph.output.append(helper.make_tensor_value_info("y_c", TensorProto.FLOAT, None))
    assert list(without_unread_cell_state(as_output).graph.node[0].output) == ["y", "y_h", "y_c"]


class Tensor:
    """onnx_graphsurgeon's view of a tensor: a name, a constant's ``values``, or the node that makes it."""

    def __init__(self, name="", values=None, made_by=None):
        self.name, self.inputs = name, [made_by] if made_by else []
        if values is not None:
            self.values = values


class Op:
    def __init__(self, op, *inputs, **attrs):
        self.op, self.inputs, self.attrs = op, list(inputs), attrs


class Node:
    def __init__(self, *states):
        self.inputs = [Tensor("x"), Tensor("W", np.ones(2)), Tensor("R", np.ones(2)), Tensor(), Tensor(), *states]


def test_only_a_zero_initial_state_is_fused_as_a_reset_restores_zeros():
    from edgebuild.targets.tflite.fused_lstm import _state_resets_to_zero

    class Eager:  # a tensor onnx2tf computed eagerly
        def __init__(self, value):
            self.value = value

        def numpy(self):
            return self.value

    def fits(*states, made=None):
        return _state_resets_to_zero(Node(*states), made or {})

    zeros, shape = np.zeros((1, 1, 2)), Tensor("shape", made_by=Op("Shape", Tensor("x")))
    assert fits()  # no initial state
    assert fits(Tensor("h0", zeros), Tensor("c0", zeros))
    assert fits(Tensor(), Tensor("c0", zeros))  # initial_h omitted
    # PyTorch's export of the default state: Expand of a zero constant to the batch's shape; ConstantOfShape of 0
    assert fits(Tensor("h0", made_by=Op("Expand", Tensor("z", np.zeros(1)), shape)),
                Tensor("c0", made_by=Op("ConstantOfShape", shape)))
    assert fits(Tensor("h0", made_by=Op("Mul", Tensor("x"), Tensor("k"))), made={"h0": {"tf_node": Eager(zeros)}})
    assert not fits(Tensor("h0", np.full((1, 1, 2), 0.5)))  # lost at the first reset
    assert not fits(Tensor("h0", made_by=Op("Expand", Tensor("z", np.ones(1)), shape)))
    assert not fits(Tensor("c0", made_by=Op("ConstantOfShape", shape, value=np.ones(1))))
    assert not fits(Tensor("state"), made={"state": {"tf_node": object()}})  # a graph input: symbolic in TF
    assert not fits(Tensor("h0", made_by=Op("Gather", Tensor("state"))))  # computed


def test_fused_only_when_asked_and_only_in_float():
    """Opt-in (the op is stateful); dynamic range keeps the loop's per-channel int8 weights (the hybrid fused kernel's
    per-gate scale collapsed Resemblyzer), full-integer INT8 unrolls."""
    pytest.importorskip("onnx2tf")
    from edgebuild.targets.tflite.onnx2tf_run import lstm_fused

    def job(precision, **settings):
        return {"precision": precision, "settings": settings}

    assert not lstm_fused(job("fp32"))
    assert lstm_fused(job("fp32", lstm_fused=True)) and lstm_fused(job("fp16", lstm_fused=True))
    assert not lstm_fused(job("dynamic", lstm_fused=True)) and not lstm_fused(job("int8", lstm_fused=True))
