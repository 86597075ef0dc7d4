"""Recurrent layers as loops for ExecuTorch (targets/executorch_scan.py).

The rewrite keeps the recurrent op's numbers (float: to 1e-5; int8 weights with per-run activation scales: close),
for LSTM (stacked, bidirectional), GRU with initial states, and RNN; a float layer named by the search keeps that
layer's weights float and no other's. The slow test converts an LSTM encoder and a bidirectional GRU at two sequence
lengths through the backend and checks that the lowered program does not grow with the number of steps (the
unrolled form added partitions and minutes per step), that every gate and Linear is XNNPACK's, that the weights are
int8, and that the runtime agrees with PyTorch.
"""
import numpy as np
import pytest

from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
from edgebuild.targets.profiles import catalogue

pytest.importorskip("executorch")
torch = pytest.importorskip("torch")


class Recurrent(torch.nn.Module):
    def __init__(self, kind: str, steps_first: bool, bidirectional: bool, **options):
        super().__init__()
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
        self.batch_first = not steps_first
        self.rnn = cls(6, 16, num_layers=2, batch_first=not steps_first, bidirectional=bidirectional, **options)
        self.head = torch.nn.Linear(32 if bidirectional else 16, 3)

    def forward(self, x, *state):
        out, final = self.rnn(x, (state if len(state) > 1 else state[0]) if state else None)
        last = out[:, -1] if self.batch_first else out[-1]
        return (self.head(last), *(final if isinstance(final, tuple) else (final,)))


CASES = {  # name: (kind, steps first, bidirectional, given states, options, the op)
    "lstm-bidirectional": ("lstm", False, True, 0, {}, "lstm.input"),
    "lstm-states": ("lstm", False, False, 2, {}, "lstm.input"),
    "gru-states-bidirectional": ("gru", False, True, 1, {}, "gru.input"),
    "rnn-relu-steps-first-no-bias": ("rnn", True, False, 0, {"nonlinearity": "relu", "bias": False}, "rnn_relu.input"),
}


def _case(name):
    kind, steps_first, bidirectional, states, options, _ = CASES[name]
    torch.manual_seed(0)
    module = Recurrent(kind, steps_first, bidirectional, **options).eval()
    x = torch.randn(7, 2, 6) if steps_first else torch.randn(2, 7, 6)
    layers = 4 if bidirectional else 2
    return module, (x, *(0.5 * torch.randn(layers, 2, 16) for _ in range(states)))


@pytest.mark.parametrize("name", list(CASES))
def test_the_loop_form_keeps_the_recurrent_ops_numbers(name):
    """Every output: the head on the last step, h_n (and c_n), with given initial states where the case has them."""
    import torchao.quantization.pt2e  # noqa: F401 — the quantized_decomposed ops

    from edgebuild.targets.executorch_graph import recurrent_ops
    from edgebuild.targets.executorch_scan import to_scan

    module, args = _case(name)
    with torch.no_grad():
        want = [t.numpy() for t in module(*args)]
    for quantized in (False, True):
        gm = torch.export.export(module, args).module()
        assert to_scan(gm, quantized) == [CASES[name][-1]]
        program = torch.export.export(gm, args, strict=False)
        assert any(n.target is torch.ops.higher_order.scan for n in program.graph.nodes)
        assert recurrent_ops(program.graph) == []
        with torch.no_grad():
            got = [t.numpy() for t in program.module()(*args)]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            if quantized:
                cosine = (g * w).sum() / (np.linalg.norm(g) * np.linalg.norm(w))
                assert cosine > 0.995, (name, cosine)
            else:
                np.testing.assert_allclose(g, w, atol=1e-5)


def test_a_recurrent_op_with_projections_keeps_the_unrolled_form():
    from edgebuild.targets.executorch_scan import supported

    module = torch.nn.LSTM(6, 16, proj_size=8, batch_first=True).eval()
    gm = torch.export.export(module, (torch.randn(1, 5, 6),)).module()
    assert supported(gm) == []


def _speaker_model(tmp_path, kind, steps):
    """An LSTM speaker-style encoder (2 layers, final state) or a bidirectional GRU tagger (last step's output)."""
    class Speaker(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(12, 32, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(32, 8)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.head(h[-1])

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(12, 24, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(48, 8)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.stages.export import file_hash

    torch.manual_seed(0)
    module = (Speaker if kind == "lstm" else Tagger)().eval()
    shape = (1, steps, 12)
    example = (torch.zeros(shape),)
    onnx_path, program = tmp_path / f"{kind}{steps}.onnx", tmp_path / f"{kind}{steps}.pt2"
    torch.onnx.export(module, example, str(onnx_path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"])
    torch.export.save(torch.export.export(module, example), str(program))
    model = ExportedModel(onnx_path, (TensorInfo("x", shape, "float32"),), (TensorInfo("y", (1, 8), "float32"),), 17,
                          file_hash(onnx_path), program=program)
    rng = np.random.default_rng(0)
    calib = SampleSet("calib", {"x": rng.standard_normal((8, *shape[1:])).astype("float32")})
    return module, model, calib, [rng.standard_normal(shape).astype("float32") for _ in range(12)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_a_long_recurrent_model_lowers_as_loops_that_do_not_grow_with_its_steps(kind, tmp_path):
    from edgebuild.targets.served import IsolatedRunner

    backend, profile = get_backend("executorch"), catalogue()["arm64-executorch"]
    partitions = {}
    for steps in (6, 96):
        module, model, calib, feeds = _speaker_model(tmp_path, kind, steps)
        for precision in ("fp32", "int8"):
            art = backend.convert(model, profile, precision, calib, tmp_path / f"{precision}{steps}")
            assert art.settings["recurrent_scan"] == [f"{kind}.input"], art.settings
            # the loop, its state set-up and per-step output copy are ExecuTorch's; every gate and Linear is XNNPACK's
            outside = set(art.settings["delegation"]["ops_outside_xnnpack"])
            assert outside <= {"scan", "full.default", "select_copy.int", "_clone_dim_order.default", "flip.default",
                               "_to_dim_order_copy.default"}, outside
            partitions[steps, precision] = art.settings["delegation"]["xnnpack_partitions"]
            if precision == "int8":
                assert art.main == "model_int8.pte" and art.settings["int8_weight_share"] >= 0.9, art.settings
            with IsolatedRunner("executorch", art, 2) as runner:
                got = np.stack([runner.run({"x": f})[0].reshape(-1) for f in feeds])
            with torch.no_grad():
                want = np.stack([module(torch.from_numpy(f)).numpy().reshape(-1) for f in feeds])
            if precision == "fp32":
                np.testing.assert_allclose(got, want, atol=1e-4)
            else:
                cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
                assert np.median(cosine) > 0.99, cosine
    assert partitions[6, "fp32"] == partitions[96, "fp32"] and partitions[6, "int8"] == partitions[96, "int8"]


def test_a_float_layer_keeps_that_layers_weights_float_and_only_it():
    from edgebuild.targets.executorch_graph import float_nodes
    from edgebuild.targets.executorch_scan import to_scan

    module, args = _case("lstm-bidirectional")  # 2 layers: the ONNX exporter writes /rnn/LSTM and /rnn/LSTM_1
    gm = torch.export.export(module, args).module()
    kept, floats = float_nodes(gm, ["/rnn/LSTM_1"], {"target": "t"})
    node, layer = next(iter(floats)).split("@")
    assert kept == {"/rnn/LSTM_1": [f"{node}@1"]}
    to_scan(gm, True, {node: {int(layer)}})
    loop = gm.get_submodule("edgebuild_scan_0")
    assert loop.quantized == {0, 1}  # layer 0, both directions, int8; layer 1 float
    assert hasattr(loop, "ih0_q") and hasattr(loop, "hh1_3_q") and hasattr(loop, "ih2") and not hasattr(loop, "ih2_q")
    with pytest.raises(ValueError, match="no recurrent op"):
        to_scan(torch.export.export(module, args).module(), True, {"nothing": {0}})
    with pytest.raises(ValueError, match="beyond"):
        to_scan(torch.export.export(module, args).module(), True, {node: {2}})
    from edgebuild.errors import ConversionError

    with pytest.raises(ConversionError, match="past the 2 recurrent layers"):
        fresh = torch.export.export(module, args).module()
        float_nodes(fresh, ["/rnn/LSTM_2"], {"target": "t"})  # numbered on past the op's layers: not silently int8
