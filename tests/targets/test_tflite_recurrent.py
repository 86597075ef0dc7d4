"""Recurrent models on arm64 (issue 22, item 2): multi-layer LSTM/GRU hidden-state outputs (``h_n``, ``h_n[-1]`` as a
Gather on ``[layers, 1, H]``, ``c_n``) come out with the ONNX shape, INT8.

Before: a 3-layer LSTM speaker encoder whose output is ``h_n[-1]`` failed with "output embedding: TF shape [3, 256]
does not match ONNX [1, 256]"."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx2tf")
pytest.importorskip("ai_edge_litert")
nn = torch.nn

from tests.targets.test_tflite_conformance import calibration, convert, export, fidelity, model_input  # noqa: E402


class SpeakerEncoder(nn.Module):
    """Mel frames [1, T, 8] -> 3-layer LSTM -> the last layer's final hidden state, L2-normalised (as GE2E)."""

    def __init__(self, hidden=16, layers=3):
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, layers, batch_first=True)
        self.proj = nn.Linear(hidden, 12)

    def forward(self, mels):
        _, (h, _) = self.lstm(mels)
        e = torch.relu(self.proj(h[-1]))
        return e / (e.norm(dim=1, keepdim=True) + 1e-5)


class StatesOut(nn.Module):
    """A 2-layer GRU and a 2-layer LSTM returning every state: h_n [2, 1, H], c_n [2, 1, H], GRU h_n [2, 1, H]."""

    def __init__(self):
        super().__init__()
        self.gru, self.lstm = nn.GRU(6, 10, 2, batch_first=True), nn.LSTM(6, 10, 2, batch_first=True)

    def forward(self, x):
        _, g = self.gru(x)
        _, (h, c) = self.lstm(x)
        return g, h, c, h[-1]


def build(module, args, names, outs, tmp_path):
    torch.manual_seed(0)
    mi = model_input(export(module, args, names, outs, tmp_path / "m.onnx"))
    calib = calibration(mi, lambda t, shape, rng: rng.normal(0, 1, shape).astype(np.float32))
    return mi, calib, convert(mi, calib, tmp_path)


@pytest.mark.slow
def test_stacked_lstm_last_hidden_state(tmp_path):
    torch.manual_seed(0)
    mi, calib, art = build(SpeakerEncoder(), (torch.zeros(1, 10, 8),), ["mels"], ["embedding"], tmp_path)
    assert art.io["outputs"][0]["source_shape"] == [1, 12]
    assert fidelity(art, mi, calib) > 0.98
    assert "WHILE" not in {op.split()[0] for op in art.settings["device_requires"]["builtin_ops"]}  # INT8: unrolled


@pytest.mark.slow
def test_float_keeps_the_recurrence_a_loop(tmp_path):
    """FP32/FP16 keep LSTM a WHILE loop: unrolled, XNNPACK packs the weights once per time step (a 4 MB CNN+BiLSTM:
    212 MB resident unrolled, 12.5 MB as a loop)."""
    torch.manual_seed(0)
    mi = model_input(export(SpeakerEncoder(), (torch.zeros(1, 10, 8),), ["mels"], ["embedding"], tmp_path / "m.onnx"))
    calib = calibration(mi, lambda t, shape, rng: rng.normal(0, 1, shape).astype(np.float32))
    art = convert(mi, calib, tmp_path, precision="fp32")
    assert "WHILE" in {op.split()[0] for op in art.settings["device_requires"]["builtin_ops"]}
    assert any("WHILE loop" in n for n in art.notes)
    assert fidelity(art, mi, calib) > 0.9999


@pytest.mark.slow
def test_all_states_have_the_onnx_shape(tmp_path):
    torch.manual_seed(0)
    mi, calib, art = build(StatesOut(), (torch.zeros(1, 6, 6),), ["x"], ["gru_h", "h_n", "c_n", "h_last"], tmp_path)
    assert [p["source_shape"] for p in art.io["outputs"]] == [[2, 1, 10], [2, 1, 10], [2, 1, 10], [1, 10]]
    assert fidelity(art, mi, calib) > 0.98


RAW_SCALES = (10.0 ** np.linspace(-3, 0.7, 12)).astype(np.float32)  # raw features' channel sizes: 0.001 .. 5


class RawFeatureLstm(nn.Module):
    """An LSTM reading raw features whose channels differ 5000x in size (a power spectrum), with the input weights
    trained to match (large where a channel is small), as Resemblyzer's encoder reads its mel power frames."""

    def __init__(self):
        super().__init__()
        self.lstm, self.proj = nn.LSTM(12, 24, 2, batch_first=True), nn.Linear(24, 8)
        with torch.no_grad():
            self.lstm.weight_ih_l0.mul_(torch.from_numpy(1 / RAW_SCALES))

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.proj(h[-1])


def raw_features(t, shape, rng):
    return (rng.normal(0, 1, shape) ** 2 * RAW_SCALES).astype(np.float32)


@pytest.mark.slow
def test_dynamic_range_int8_smooths_raw_recurrent_inputs_and_keeps_the_loop(tmp_path):
    """The search's recurrent recipe (``activations: dynamic``): dynamic-range INT8 with the first LSTM's input
    channels smoothed into its weights. Plain dynamic range rounds the small channels away at every step."""
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue

    torch.manual_seed(0)
    mi = model_input(export(RawFeatureLstm(), (torch.zeros(1, 16, 12),), ["feats"], ["y"], tmp_path / "m.onnx"))
    calib = calibration(mi, raw_features)
    candidates = dict(get_backend("tflite").graph_candidates(catalogue()["arm64"], None, mi.onnx_path))
    label = next(k for k in candidates if k.startswith("dynamic-range INT8"))
    art = convert(mi, calib, tmp_path / "smoothed", **candidates[label].to_dict())
    assert art.main == "model_int8_dynamic.tflite" and art.precision == "int8"
    assert any("recurrent input smoothing: /lstm/LSTM read" in n for n in art.notes), art.notes
    assert "WHILE" in {op.split()[0] for op in art.settings["device_requires"]["builtin_ops"]}  # a loop, not unrolled
    plain = convert(mi, calib, tmp_path / "plain", precision="dynamic")  # TFLite's dynamic range as it comes
    assert fidelity(plain, mi, calib, n=16) < 0.98 < 0.99 < fidelity(art, mi, calib, n=16)


class BiLstmHead(nn.Module):
    """A forward 2-layer LSTM and a bidirectional one, read as a CTC recogniser and a speaker encoder read theirs."""

    def __init__(self):
        super().__init__()
        self.uni, self.bi = nn.LSTM(8, 16, 2, batch_first=True), nn.LSTM(16, 12, 1, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        y, (h, _) = self.uni(x)
        z, (hb, _) = self.bi(y)
        return self.head(z), h[-1], hb


@pytest.mark.slow
def test_fused_lstm_is_one_sequence_op_per_direction_and_each_run_starts_from_zero(tmp_path):
    """``lstm_fused``: every LSTM whose ``Y_c`` nothing reads becomes one UNIDIRECTIONAL_SEQUENCE_LSTM, exact to the
    source over samples run one after another (the op keeps its state between invocations: the runner resets it,
    and the note tells a device app to); one that outputs ``c_n`` keeps the loop."""
    from edgebuild.targets.tflite.backend import TFLiteRunner

    torch.manual_seed(0)
    mi = model_input(export(BiLstmHead(), (torch.zeros(1, 10, 8),), ["x"], ["y", "h", "hb"], tmp_path / "m.onnx"))
    calib = calibration(mi, lambda t, shape, rng: rng.normal(0, 1, shape).astype(np.float32))
    art = convert(mi, calib, tmp_path / "fused", precision="fp32", lstm_fused=True)
    ops = [op.split()[0] for op in art.settings["device_requires"]["builtin_ops"]]
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in ops and "WHILE" not in ops
    assert any(n.startswith("stateful: UNIDIRECTIONAL_SEQUENCE_LSTM") for n in art.notes), art.notes
    assert art.settings["device_requires"]["reset_variables_per_sequence"] is True
    assert fidelity(art, mi, calib) > 0.99999  # every sample from the zero state
    runner = TFLiteRunner(art.path, art.io, 2, "xnnpack")
    first = runner.run(calib.feed(0))[0]
    runner.interpreter.invoke()  # an app that does not reset: the second call starts from the first one's state
    carried = runner.outputs[0].from_tensor(runner.interpreter.get_tensor(runner.outputs[0].index))
    assert np.abs(carried - first).max() > 1e-3 and np.allclose(runner.run(calib.feed(0))[0], first, atol=1e-6)

    states = model_input(export(StatesOut(), (torch.zeros(1, 6, 6),), ["x"], ["gru_h", "h_n", "c_n", "h_last"],
                                tmp_path / "s.onnx"))
    looped = convert(states, calibration(states), tmp_path / "states", precision="fp32", lstm_fused=True)
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" not in {op.split()[0] for op in looped.settings["device_requires"]["builtin_ops"]}
    assert looped.settings["device_requires"]["reset_variables_per_sequence"] is False
