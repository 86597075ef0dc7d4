"""Issue 28, transformer and recurrent graphs on onnx-cpu: a dynamic INT8 candidate (onnxruntime quantize_dynamic:
MatMulInteger, quantized embedding Gather, DynamicQuantizeLSTM) offered where those layers hold the weights, named and
counted truthfully; recurrent weights INT8 with the state path float; the search trying each kind of INT8 recipe
before leaving INT8 after a static collapse. Every model is built here."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from edgebuild.pipeline.results import SearchRecord, SearchTry
from edgebuild.pipeline.stages import mixed_precision as M
from edgebuild.pipeline.stages import search as R
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.pipeline.stages.search_state import Search
from edgebuild.pipeline.stages.sensitivity import Sensitivity
from edgebuild.targets.settings import OnnxSettings

VOCAB, DIM, SEQ = 2000, 64, 16


def _encoder(tmp_path):
    """A 2-layer transformer encoder over a 2000 x 64 embedding table (62 % of its weights), mean-pooled: int64 ids in,
    a sentence embedding out."""
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.pos = nn.Embedding(VOCAB, DIM), nn.Parameter(torch.randn(1, SEQ, DIM) * 0.1)
            layer = nn.TransformerEncoderLayer(DIM, 4, 128, dropout=0.0, batch_first=True)
            self.enc, self.out = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(DIM, 32)

        def forward(self, ids):
            return self.out(self.enc(self.emb(ids) + self.pos).mean(1))

    path = tmp_path / "encoder.onnx"
    torch.onnx.export(Encoder().eval(), (torch.zeros(1, SEQ, dtype=torch.long),), str(path), dynamo=False,
                      opset_version=17, input_names=["ids"], output_names=["emb"])
    return path


def _stateful_lstm(tmp_path):
    """A streaming 2-layer LSTM that takes its state in and gives it back (h, c), as a voice-activity model does."""
    import torch
    from torch import nn

    class Stream(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.lstm, self.out = nn.Linear(16, 48), nn.LSTM(48, 96, num_layers=2, batch_first=True), nn.Linear(96, 4)

        def forward(self, x, h, c):
            y, (h2, c2) = self.lstm(torch.relu(self.inp(x)), (h, c))
            return self.out(y[:, -1]), h2, c2

    path = tmp_path / "stream.onnx"
    z = torch.zeros(2, 1, 96)
    torch.onnx.export(Stream().eval(), (torch.zeros(1, 8, 16), z, z), str(path), dynamo=False, opset_version=17,
                      input_names=["x", "h", "c"], output_names=["y", "hn", "cn"])
    return path


def _exported(path, inputs: dict[str, tuple], dtypes: dict[str, str]):
    from edgebuild.pipeline.stages.export import file_hash
    from edgebuild.targets.base import ExportedModel, TensorInfo

    return ExportedModel(path, tuple(TensorInfo(k, s, dtypes[k]) for k, s in inputs.items()), (), 17, file_hash(path))


def _ids(rng, n):
    from edgebuild.calibration.dataset import SampleSet

    return SampleSet("ids", {"ids": rng.integers(0, VOCAB, (n, SEQ)).astype(np.int64)}, None, {}, {"ids": (1, SEQ)})


@pytest.mark.slow
def test_a_transformer_encoder_gets_a_dynamic_int8_candidate_all_int8_with_its_embedding_table(tmp_path):
    """The candidate is offered from the graph (MatMul + embedding table = the weights), converts without calibration
    to MatMulInteger + an int8 table, counts >= 90 % INT8 weights (so it is named _int8), and keeps the embedding."""
    import onnx

    from edgebuild.pipeline.stages.weights import weight_share
    from edgebuild.similarity import cosine
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.onnx import OrtRunner, dynamic_share
    from edgebuild.targets.profiles import catalogue

    path = _encoder(tmp_path)
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    assert dynamic_share(path) > 0.95
    offered = backend.graph_candidates(profile, backend.requested_settings(profile), path)
    assert [s.activations for _, s in offered] == ["dynamic"] and "dynamic INT8" in offered[0][0]
    calib = _ids(np.random.default_rng(0), 16)
    art = backend.convert(_exported(path, {"ids": (1, SEQ)}, {"ids": "int64"}), profile, "int8", calib,
                          tmp_path / "q", offered[0][1])
    assert art.main == "model_int8_dynamic.onnx" and art.settings["activations"] == "dynamic"
    assert any("dynamic INT8" in n and "embedding Gather" in n for n in art.notes)
    graph = onnx.load(str(art.path)).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    table = next(i for i in graph.initializer if tuple(i.dims) == (VOCAB, DIM))
    assert table.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)  # the table itself 8-bit (DQ after it)
    share = weight_share(art.path, "onnx")
    fp32 = weight_share(path, "onnx")
    assert share["int8_weight_share"] >= 0.9, share
    assert share["int8_weights"] + share["float_weights"] == fp32["float_weights"]  # every weight counted, once
    ids = _ids(np.random.default_rng(1), 12).inputs["ids"]
    with OrtRunner(path, 1) as ref, backend.runner(art, 1) as q:
        assert min(cosine(ref.run({"ids": ids[i:i + 1]})[0], q.run({"ids": ids[i:i + 1]})[0]) for i in range(12)) > 0.98
    # static QDQ (the transformer recipe) quantizes the embedding table too: the file is INT8 by its weights as well
    static = backend.convert(_exported(path, {"ids": (1, SEQ)}, {"ids": "int64"}), profile, "int8", calib, tmp_path / "s")
    assert static.main == "model_int8_qdq.onnx" and weight_share(static.path, "onnx")["int8_weight_share"] >= 0.9


@pytest.mark.slow
def test_a_stateful_lstm_gets_int8_weights_and_a_float_state_path(tmp_path):
    """Static INT8 of a model that carries its LSTM state in and out: the LSTM weights int8 (DynamicQuantizeLSTM), no
    Q/DQ between the state inputs/outputs and the LSTM, the state output faithful; the dynamic candidate too."""
    import onnx

    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.stages.weights import weight_share
    from edgebuild.similarity import cosine
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.onnx import OrtRunner, state_path
    from edgebuild.targets.profiles import catalogue

    path = _stateful_lstm(tmp_path)
    assert state_path(path)  # found from the graph: h/c inputs -> LSTM initial state, Y_h/Y_c -> hn/cn
    rng = np.random.default_rng(0)
    n = 48
    data = {"x": rng.normal(0, 1, (n, 8, 16)).astype(np.float32),
            "h": rng.normal(0, 0.3, (n, 2, 96)).astype(np.float32), "c": rng.normal(0, 1, (n, 2, 96)).astype(np.float32)}
    shapes = {"x": (1, 8, 16), "h": (2, 1, 96), "c": (2, 1, 96)}
    calib = SampleSet("calib", {k: v[:32] for k, v in data.items()}, None, {}, shapes)
    exported = _exported(path, shapes, {k: "float32" for k in shapes})
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    art = backend.convert(exported, profile, "int8", calib, tmp_path / "q")
    graph = onnx.load(str(art.path)).graph
    assert [n.op_type for n in graph.node].count("DynamicQuantizeLSTM") == 2
    assert any("recurrent state path in float" in x for x in art.notes)
    producer = {o: n for n in graph.node for o in n.output}
    for lstm in (n for n in graph.node if n.op_type == "DynamicQuantizeLSTM"):
        for t in lstm.input[5:7]:  # initial_h / initial_c: read float, never through a DequantizeLinear
            assert producer.get(t) is None or producer[t].op_type != "DequantizeLinear"
    for o in ("hn", "cn"):
        assert producer[o].op_type != "DequantizeLinear"
    assert weight_share(art.path, "onnx")["int8_weight_share"] >= 0.9
    feed = lambda i: {k: v[i].reshape(shapes[k]) for k, v in data.items()}  # noqa: E731
    with OrtRunner(path, 1) as ref, backend.runner(art, 1) as q:
        for i in range(32, n):
            r, a = ref.run(feed(i)), q.run(feed(i))
            assert cosine(r[1], a[1]) > 0.99 and cosine(r[2], a[2]) > 0.99
    dyn = backend.convert(exported, profile, "int8", calib, tmp_path / "d", {"activations": "dynamic"})
    assert dyn.main == "model_int8_dynamic.onnx" and weight_share(dyn.path, "onnx")["int8_weight_share"] >= 0.9


def test_weights_computed_from_constants_are_folded_so_the_quantizer_sees_them(tmp_path):
    """An LSTM whose W/R come from Unsqueeze(Constant) (PyTorch's export of a cell): folded into initializers, so
    DynamicQuantizeLSTM takes them and the weight counter counts them INT8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgebuild.pipeline.stages.weights import weight_share
    from edgebuild.targets.onnx import dynamic_share, fold_constant_weights

    rng = np.random.default_rng(0)
    H, X = 32, 8
    nodes, inits = [], []
    for name, shape in (("W", (4 * H, X)), ("R", (4 * H, H))):
        nodes.append(helper.make_node("Constant", [], [f"{name}c"], value=numpy_helper.from_array(
            rng.normal(0, 0.2, shape).astype(np.float32), f"{name}v")))
        nodes.append(helper.make_node("Unsqueeze", [f"{name}c", "axes0"], [name], name=f"unsq_{name}"))
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
    nodes.append(helper.make_node("LSTM", ["x", "W", "R"], ["y", "yh"], name="lstm", hidden_size=H))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, X])],
                              [helper.make_tensor_value_info("yh", TensorProto.FLOAT, [1, 1, H])], inits)
    path = tmp_path / "cell.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert dynamic_share(path) == 1.0  # counted through Unsqueeze(Constant) before folding
    assert fold_constant_weights(path) == 4
    folded = onnx.load(str(path)).graph
    assert [n.op_type for n in folded.node] == ["LSTM"] and {"W", "R"} <= {i.name for i in folded.initializer}
    assert weight_share(path, "onnx")["float_weights"] == 4 * H * (X + H)


def test_an_if_whose_condition_reads_only_shapes_is_inlined(tmp_path):
    """A decoder's If on Shape(state) (Silero VAD's, inside the branch a fixed sr selects): the data's fixed sizes fix
    it, so it is inlined in a second pass and its LSTM reaches the quantizers as a plain node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.stages.specialize import specialize_constant_ifs

    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["s"], [f"{name}_out"], name=f"{name}_node")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])

    inner = helper.make_node("If", ["cond"], ["y"], name="inner", then_branch=branch("a", "Relu"),
                             else_branch=branch("b", "Neg"))
    nodes = [helper.make_node("Shape", ["s"], ["shp"], name="shape"),
             helper.make_node("Gather", ["shp", "zero"], ["d0"], name="g"),
             helper.make_node("Equal", ["d0", "two"], ["cond"], name="eq"), inner]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                               numpy_helper.from_array(np.array(2, np.int64), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = SampleSet("d", {"s": np.random.default_rng(0).normal(0, 1, (4, 2, 3)).astype(np.float32)}, None, {},
                     {"s": (2, 3)})
    out, frozen, notes = specialize_constant_ifs(model, [data])
    assert frozen == {} and [n.op_type for n in out.graph.node if n.op_type != "Identity"] == ["Relu"], notes
    assert "the inputs' sizes" in notes[0]


# ---- the search: each kind of INT8 recipe before leaving INT8 -------------------------------------------------


PROFILE = SimpleNamespace(name="onnx-cpu", allow_float_layers=True, precisions=("int8", "fp16", "fp32"))
DYNAMIC = OnnxSettings(activations="dynamic")


class Backend:
    supports_float_layers = True

    def requested_settings(self, profile):
        return OnnxSettings()

    def graph_candidates(self, profile, settings, onnx_path):
        return [("dynamic INT8", DYNAMIC)]

    def recovery_candidates(self, profile, settings):
        return [("weighted layers only", OnnxSettings(op_types="weighted")),
                ("percentile calibration", OnnxSettings(calibrate_method="percentile"))]


def _stand_in():
    ctx = BuildContext(SimpleNamespace(spec=SimpleNamespace(auto_max_tries=12), evalset=[0] * 100,
                                       model=SimpleNamespace(onnx_path="m.onnx")),
                       SimpleNamespace(deadline=float("inf")))
    s = Search.__new__(Search)
    s.ctx, s.record, s.reserve = ctx, SearchRecord(tries=[SearchTry("profile settings")]), 1
    s.sensitivity = Sensitivity({}, 0.0)
    s.tries = [SimpleNamespace(artifact=SimpleNamespace(precision="int8", settings={}, files=[]),
                               label="profile settings", quality_ok=False, loss=40.0)]
    s.deadline, s.durations, s.started = time.monotonic() + 1000, [5.0], time.monotonic()
    s.profile = PROFILE
    return ctx, s


def test_a_static_collapse_does_not_stop_the_search_before_dynamic_int8_is_tried(monkeypatch):
    """Static QDQ collapsed (loss 40): before the sensitivity, FP16 and the one static variant, the dynamic candidate
    (another kind) is tried, and ships when it meets the budget."""
    ctx, s = _stand_in()
    asked = []

    def attempt(label, precision, settings, fallback=False):
        asked.append(label)
        a = SimpleNamespace(artifact=SimpleNamespace(precision=precision, settings={}, files=[]), label=label,
                            quality_ok=label == "dynamic INT8", loss=0.0)
        s.tries.append(a)
        s.record.tries.append(SearchTry(label))
        return a

    s.attempt = attempt
    monkeypatch.setattr(R, "_diffuse", lambda *a: pytest.fail("sensitivity before the other kind of INT8"))
    found = R._search(ctx, Backend(), PROFILE, s, collapsed=True)
    assert asked == ["dynamic INT8"] and found.label == "dynamic INT8"
    assert s.record.extra["other_kinds"] == ["dynamic INT8"]


def test_when_dynamic_int8_fails_too_the_search_goes_on_as_before_without_trying_it_twice(monkeypatch):
    ctx, s = _stand_in()
    asked = []

    def attempt(label, precision, settings, fallback=False):
        asked.append(label)
        a = SimpleNamespace(artifact=SimpleNamespace(precision=precision, settings={}, files=[]), label=label,
                            quality_ok=False, loss=20.0)
        s.tries.append(a)
        s.record.tries.append(SearchTry(label))
        return a

    s.attempt = attempt
    monkeypatch.setattr(R, "_diffuse", lambda *a: False)
    monkeypatch.setattr(R, "mixed", lambda *a: None)
    R._search(ctx, Backend(), PROFILE, s, collapsed=True)
    assert asked[:2] == ["dynamic INT8", "weighted layers only"] and asked.count("dynamic INT8") == 1, asked
    assert "percentile calibration" in asked  # the rest of the static variants after the float fallbacks


def test_candidates_put_the_graphs_own_first_and_kinds_are_told_apart():
    ctx, _ = _stand_in()
    labels = [label for label, _ in R.candidates(ctx, Backend(), PROFILE, OnnxSettings())]
    assert labels == ["dynamic INT8", "weighted layers only", "percentile calibration"]
    assert OnnxSettings().kind() == "static" and DYNAMIC.kind() == "dynamic"
    assert [label for label, _ in R.other_kinds(R.candidates(ctx, Backend(), PROFILE, OnnxSettings()), OnnxSettings())] \
        == ["dynamic INT8"]
    assert R.other_kinds([("weighted layers only", OnnxSettings(op_types="weighted"))], OnnxSettings()) == []


def test_mixed_precision_counts_weights_held_by_constant_nodes(tmp_path):
    """A layer whose weight is a Constant node (an inlined If branch, tf2onnx) weighs its weight: the "at most half of
    the weights float" guard of mixed precision is not blind to it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "wv")
    graph = helper.make_graph([helper.make_node("Constant", [], ["w"], name="c", value=w),
                               helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "c.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert M._layer_weights(path)["mm"] == 32


def test_nncf_transformer_scheme_is_another_kind_tried_after_an_x86_collapse():
    from edgebuild.targets.settings import OpenVinoSettings

    s = OpenVinoSettings()
    variants = [("full bias correction", s.replace(fast_bias_correction=False)),
                ("asymmetric activations (preset=mixed)", s.replace(preset="mixed")),
                ("NNCF model_type=transformer (SmoothQuant)", s.replace(model_type="transformer"))]
    assert [label for label, _ in R.other_kinds(variants, s)] == ["NNCF model_type=transformer (SmoothQuant)"]


def test_no_dynamic_candidate_for_a_cnn_with_a_big_dense_head_nor_on_an_integer_only_profile(tmp_path, monkeypatch):
    """Dynamic INT8 leaves Conv float: a CNN whose dense layers hold 59 % of its weights gets no such candidate (it
    would be no INT8 model of it), and an integer-only profile never gets one."""
    import dataclasses

    import torch

    from edgebuild.pipeline.demo_model import load_demo
    from edgebuild.targets import onnx as O
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue

    path = tmp_path / "demo.onnx"
    torch.onnx.export(load_demo().eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17)
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    assert 0.5 < O.dynamic_share(path) < O.DYNAMIC_SHARE
    assert backend.graph_candidates(profile, backend.requested_settings(profile), path) == []
    monkeypatch.setattr(O, "DYNAMIC_SHARE", 0.5)
    assert len(backend.graph_candidates(profile, backend.requested_settings(profile), path)) == 1
    npu = dataclasses.replace(profile, allow_float_layers=False)
    assert backend.graph_candidates(npu, backend.requested_settings(npu), path) == []
