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
