"""Recurrent inputs smoothed for dynamic INT8 (targets/onnx/smooth_recurrent.py): exact in float, and only where the
input channels are imbalanced."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgebuild.calibration.dataset import SampleSet  # noqa: E402
from edgebuild.targets.onnx.smooth_recurrent import SPREAD, smooth  # noqa: E402


def _model(tmp_path, scales):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 10, 2, batch_first=True)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            out, _ = self.lstm(x)
            return out[:, -1]

    path = tmp_path / "m.onnx"
    torch.onnx.export(Net().eval(), (torch.zeros(1, 7, 6),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    data = (rng.normal(0, 1, (12, 7, 6)) ** 2 * scales).astype(np.float32)
    return path, SampleSet("calib", {"x": data}, shapes={"x": (1, 7, 6)})


def _run(path, calib, i):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, calib.feed(i))[0]


def test_imbalanced_input_channels_move_into_the_weights_and_the_float_model_is_unchanged(tmp_path):
    scales = (10.0 ** np.linspace(-3, 0.5, 6)).astype(np.float32)  # 3000x apart: above SPREAD
    path, calib = _model(tmp_path, scales)
    done = smooth(path, tmp_path / "s.onnx", calib)
    assert done == ["/lstm/LSTM"]  # the first layer only: the second reads the first's bounded hidden state
    smoothed = onnx.load(str(tmp_path / "s.onnx"))
    mul = next(n for n in smoothed.graph.node if n.op_type == "Mul")
    assert next(n for n in smoothed.graph.node if n.op_type == "LSTM").input[0] == mul.output[0]
    for i in range(4):
        np.testing.assert_allclose(_run(tmp_path / "s.onnx", calib, i), _run(path, calib, i), rtol=1e-4, atol=1e-5)


def test_balanced_input_channels_are_left_as_they_are(tmp_path):
    path, calib = _model(tmp_path, np.ones(6, np.float32))
    assert SPREAD > 10 and smooth(path, tmp_path / "s.onnx", calib) == []
    assert [n.op_type for n in onnx.load(str(tmp_path / "s.onnx")).graph.node] == \
        [n.op_type for n in onnx.load(str(path)).graph.node]
