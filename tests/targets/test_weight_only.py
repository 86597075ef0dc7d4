"""Issue 28, names and numbers that tell the truth: the layers an INT8 artifact keeps in float keep their activations
float and store their weights int8 (weight-only), where that costs nothing measurable — on ONNX Runtime
(targets/onnx/weight_only.py) and OpenVINO (targets/openvino_weight_only.py). Every model is built here."""
from __future__ import annotations

import numpy as np
import pytest

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline.stages.weights import weight_share
from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
from edgebuild.targets.profiles import resolve

STEPS, MELS = 50, 40


@pytest.fixture(scope="module")
def speaker(tmp_path_factory):
    """A 3-layer LSTM speaker encoder (embedding = L2-normalised projection of h_n[-1]) over linear mel power: values
    spread over ~9 decades, so 8-bit activations of the first LSTM's input round nearly all of them to 0 — the layer
    the search keeps in float (a real Resemblyzer: 21 % of its weights)."""
    import torch
    from torch import nn

    from edgebuild.pipeline.stages.export import file_hash

    class Speaker(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lstm, self.proj = nn.LSTM(MELS, 128, num_layers=3, batch_first=True), nn.Linear(128, 64)

        def forward(self, mel):
            _, (h, _) = self.lstm(mel)
            e = torch.relu(self.proj(h[-1]))
            return e / e.norm(dim=1, keepdim=True)

    path = tmp_path_factory.mktemp("speaker") / "speaker.onnx"
    torch.onnx.export(Speaker().eval(), (torch.zeros(1, STEPS, MELS),), str(path), dynamo=False, opset_version=17,
                      input_names=["mel"], output_names=["emb"])
    rng = np.random.default_rng(0)
    mel = np.exp(rng.normal(-10, 3, (48, STEPS, MELS))).astype(np.float32)
    calib = SampleSet("mel", {"mel": mel[:32]}, None, {}, {"mel": (1, STEPS, MELS)})
    model = ExportedModel(path, (TensorInfo("mel", (1, STEPS, MELS), "float32"),), (TensorInfo("emb", (1, 64), "float32"),),
                          17, file_hash(path))
    return model, calib, mel[32:]


def _first_lstm(path) -> str:
    import onnx

    return next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "LSTM")


def _worst_cosine(runner, source: str, x: np.ndarray) -> float:
    import onnxruntime as ort

    ref = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    worst = 1.0
    for i in range(len(x)):
        got = np.ravel(runner.run({"mel": x[i:i + 1]})[0])
        want = np.ravel(ref.run(None, {"mel": x[i:i + 1]})[0])
        worst = min(worst, float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)))
    return worst


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_onnx_float_lstm_keeps_float_activations_and_int8_weights(speaker, tmp_path, activations):
    import onnx

    model, calib, held = speaker
    backend, profile = get_backend("onnx"), resolve(("onnx-cpu",))[0]
    first = _first_lstm(model.onnx_path)
    built = {}
    for wo in (False, True):
        art = backend.convert(model, profile, "int8", calib, tmp_path / f"{activations}-{wo}",
                              {"activations": activations, "float_layers": [first], "weight_only": wo})
        built[wo] = (art, weight_share(art.path, "onnx"),
                     _worst_cosine(backend.runner(art, 1), str(model.onnx_path), held))
    (plain, plain_share, plain_cos), (wo, wo_share, wo_cos) = built[False], built[True]
    # the float LSTM held 24 % of the weights: stored int8 now, but it still computes in float, and the INT8 share
    # (the weights run by int8 layers) says so
    assert plain_share["int8_weight_share"] < 0.8 and plain_share["weight_only_weights"] == 0
    assert wo_share["stored_int8_share"] == 1.0 and wo_share["int8_weight_share"] == plain_share["int8_weight_share"]
    assert wo_share["weight_only_weights"] == plain_share["float_weights"]
    assert wo_cos > plain_cos - 1e-3 and wo_cos > 0.999  # the activations stayed float: nothing lost
    assert any("weight-only INT8" in n for n in wo.notes)
    graph = onnx.load(str(wo.path)).graph
    lstm = next(n for n in graph.node if n.name == first)
    assert lstm.op_type == "LSTM"  # still the float kernel ...
    producers = {o: n for n in graph.node for o in n.output}
    assert producers[lstm.input[1]].op_type == "DequantizeLinear"  # ... reading int8 weights
    assert wo.path.stat().st_size < 0.8 * plain.path.stat().st_size


def test_weight_only_is_refused_where_int8_weights_cost_the_output(tmp_path):
    """A float layer whose every output channel is dominated in range by one weight that reads a feature which is
    always 0: per-channel int8 rounds the weights that matter to 0. The artifact keeps them float, and says why."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgebuild.targets.onnx.weight_only import int8_weights

    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.01, (64, 32)).astype(np.float32)
    w[0, :] = 1000.0  # feature 0 is always 0: these weights set the scale and contribute nothing
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [numpy_helper.from_array(w, "w")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.normal(0, 1, (16, 64)).astype(np.float32)
    x[:, 0] = 0
    calib = SampleSet("x", {"x": x}, None, {}, {"x": (1, 64)})
    out = tmp_path / "out.onnx"
    notes = int8_weights(path, out, calib, tmp_path, source=path)
    assert not out.exists() and "not taken" in notes[0]
    w[0, :] = 0.02  # the same layer without the outlier: taken
    onnx.save(helper.make_model(helper.make_graph(graph.node, "g", graph.input, graph.output, [numpy_helper.from_array(w, "w")]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert "weight-only INT8: 1 weight(s)" in int8_weights(path, out, calib, tmp_path, source=path)[0] and out.exists()


def test_openvino_float_lstm_is_found_and_keeps_int8_weights(speaker, tmp_path):
    """x86: the ONNX LSTM named as a float layer is the LSTMSequence behind OpenVINO's Reshape of the same name (the
    name alone ignored the Reshape and left the LSTM quantized), and its weights are int8 behind a decompression the
    CPU plugin accepts for a float LSTMSequence (the IR loads and runs)."""
    pytest.importorskip("nncf")
    model, calib, held = speaker
    backend, profile = get_backend("openvino"), resolve(("x86",))[0]
    first = _first_lstm(model.onnx_path)
    plain = backend.convert(model, profile, "int8", calib, tmp_path / "plain", {"float_layers": [first], "weight_only": False})
    wo = backend.convert(model, profile, "int8", calib, tmp_path / "wo", {"float_layers": [first]})
    assert any(n.startswith("LSTMSequence") for n in plain.settings["applied"]["ignored_scope"]["names"])
    plain_share, wo_share = weight_share(plain.path, "openvino"), weight_share(wo.path, "openvino")
    assert plain_share["int8_weight_share"] < 0.8 and wo_share["int8_weight_share"] == plain_share["int8_weight_share"]
    assert wo_share["stored_int8_share"] == 1.0 and wo_share["weight_only_weights"] == plain_share["float_weights"]
    assert any("weight-only INT8" in n for n in wo.notes)
    assert _worst_cosine(backend.runner(wo, 1), str(model.onnx_path), held) > \
        _worst_cosine(backend.runner(plain, 1), str(model.onnx_path), held) - 2e-3


def test_a_weight_shared_by_several_float_layers_is_stored_int8_once(tmp_path):
    """Basic Pitch applies one constant-Q kernel per octave: one initializer read by several convolutions. It becomes
    one int8 tensor behind one DequantizeLinear that keeps its name, and every reader reads it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgebuild.targets.onnx.weight_only import int8_weights

    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.1, (16, 1, 1, 32)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "k"], ["a"], name="octave0"),
             helper.make_node("AveragePool", ["x"], ["x2"], kernel_shape=[1, 2], strides=[1, 2]),
             helper.make_node("Conv", ["x2", "k"], ["b"], name="octave1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 256])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "k")])
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    calib = SampleSet("x", {"x": rng.normal(0, 1, (8, 1, 1, 256)).astype(np.float32)}, None, {}, {"x": (1, 1, 1, 256)})
    assert "weight-only INT8: 1 weight(s)" in int8_weights(path, out, calib, tmp_path, source=path)[0]
    g = onnx.load(str(out)).graph
    assert [n.op_type for n in g.node].count("DequantizeLinear") == 1
    assert all(n.input[1] == "k" for n in g.node if n.op_type == "Conv") and "k" not in {i.name for i in g.initializer}
    share = weight_share(out, "onnx")
    assert share["stored_int8_share"] == 1.0 and share["int8_weight_share"] == 0.0  # the convs compute in float
    # OpenVINO: one int8 constant, both convolutions read it (the f32 one is gone from the IR)
    pytest.importorskip("openvino")
    from edgebuild.targets.openvino import compile_config
    from edgebuild.targets.openvino_nncf import import_without_telemetry
    from edgebuild.targets.openvino_weight_only import SUFFIX, float_weights
    from edgebuild.targets.openvino_weight_only import int8_weights as ov_int8_weights

    ov = import_without_telemetry("openvino")
    ir = ov.convert_model(str(path))
    assert len(float_weights(ir)) == 1
    assert "weight-only INT8: 1 weight(s)" in ov_int8_weights(ov, ir, calib, compile_config("fp32"), str(path))[0]
    convs = [op for op in ir.get_ops() if op.get_type_name() == "Convolution"]
    assert len(convs) == 2 and all(c.input_value(1).get_node().get_type_name() == "Multiply" for c in convs)
    assert not [op for op in ir.get_ops() if op.get_type_name() == "Constant" and op.get_output_size()
                and op.get_element_type().get_type_name() == "f32" and op.get_data().size >= 512]
    assert sum(op.get_friendly_name().endswith(SUFFIX) for op in ir.get_ops()) == 1
