"""Inputs and outputs of every rank on arm64 (issue 22, item 1): 1-D, 3-D (audio ``[1, samples, 1]``, sequences)
and 5-D (video) tensors convert, pass the FP32 graph check, calibrate and run in LiteRT in the layout onnx2tf
actually gave each tensor (read from the converted model, compared with the ONNX shape), per tensor.

Before: an audio model with input ``[1, N, 1]`` failed with "FP32 graph check failed: Input 0 of layer ... is
incompatible with the layer: expected shape=(None, 1, N), found shape=(1, N, 1)"."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx2tf")
pytest.importorskip("ai_edge_litert")
nn = torch.nn

from tests.targets.test_tflite_conformance import calibration, convert, export, fidelity, model_input  # noqa: E402


class Audio(nn.Module):
    """Raw audio [1, samples, 1] (batch, samples, channel) -> notes per frame [1, frames, 8] and a clip vector."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(1, 8, 9, stride=4), nn.Conv1d(8, 8, 5, stride=2)
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x.transpose(1, 2)))))   # [1, 8, frames]
        return self.head(h.transpose(1, 2)), h.mean(dim=2)


class Sequence(nn.Module):
    """A 1-D feature vector and a 3-D sequence [1, T, F] in, a 3-D [1, T, F] and a 1-D output out."""

    def __init__(self):
        super().__init__()
        self.proj, self.mix = nn.Linear(6, 6), nn.Linear(4, 6)

    def forward(self, seq, vec):
        y = torch.tanh(self.proj(seq) + self.mix(vec))
        return y, y.sum(dim=(0, 1))


class Video(nn.Module):
    """A clip [1, 3, T, H, W] -> a 5-D feature map and class scores."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv3d(3, 8, 3, padding=1), nn.Conv3d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        f = torch.relu(self.c2(torch.relu(self.c1(x))))
        return f, self.fc(f.mean(dim=(2, 3, 4)))


def build(module, args, names, outs, tmp_path, precision="int8"):
    torch.manual_seed(0)
    mi = model_input(export(module, args, names, outs, tmp_path / "m.onnx"))
    calib = calibration(mi, lambda t, shape, rng: rng.normal(0, 1, shape).astype(np.float32))
    art = convert(mi, calib, tmp_path, precision=precision)
    return mi, calib, art


@pytest.mark.slow
def test_sequence_1d_and_3d(tmp_path):
    torch.manual_seed(0)
    mi, calib, art = build(Sequence(), (torch.zeros(1, 7, 6), torch.zeros(4)), ["seq", "vec"], ["y", "total"], tmp_path)
    assert fidelity(art, mi, calib) > 0.98


@pytest.mark.slow
def test_video_5d_input_and_output(tmp_path):
    torch.manual_seed(0)
    mi, calib, art = build(Video(), (torch.zeros(1, 3, 4, 8, 8),), ["clip"], ["features", "scores"], tmp_path)
    assert fidelity(art, mi, calib) > 0.98


@pytest.mark.slow
def test_audio_input_named_like_tf2onnx(tmp_path):
    """A Keras model through tf2onnx names its input ``serving_default_input_2:0``: onnx2tf renames ':' and then
    no longer finds it among the inputs to keep in shape, and made [1, N, 1] channels-last [1, 1, N]."""
    torch.manual_seed(0)
    mi, calib, art = build(Audio(), (torch.zeros(1, 400, 1),), ["serving_default_input_2:0"], ["notes", "clip"], tmp_path)
    assert fidelity(art, mi, calib) > 0.98
    assert art.io["inputs"][0]["source_shape"] == [1, 400, 1]


def test_adopt_input_layouts_reads_what_onnx2tf_built():
    """Per input: the planned permutation when the built shape agrees, else channels-last, else any that fits."""
    from types import SimpleNamespace as NS

    from edgebuild.targets.tflite.onnx2tf_run import adopt_input_layouts

    km = NS(inputs=[NS(shape=(None, 1, 400)), NS(shape=(1, 8, 8, 3)), NS(shape=(1, 4, 8, 8, 3)), NS(shape=(7,)),
                    NS(shape=(1, 400, 1)), NS(shape=(1,))])
    job = {"inputs": [{"name": "audio", "shape": [1, 400, 1]}, {"name": "img", "shape": [1, 3, 8, 8], "perm": [0, 2, 3, 1]},
                      {"name": "clip", "shape": [1, 3, 4, 8, 8]}, {"name": "vec", "shape": [7]},
                      {"name": "kept", "shape": [1, 400, 1]}, {"name": "sr", "shape": []}]}
    assert adopt_input_layouts(km, job) == [[0, 2, 1], [0, 2, 3, 1], [0, 2, 3, 4, 1], None, None, None]
    assert job["inputs"][0]["perm"] == [0, 2, 1]  # the graph check, calibration and runners feed this
    bad = {"inputs": [{"name": "x", "shape": [1, 5, 6]}]}
    with pytest.raises(Exception, match="no permutation"):
        adopt_input_layouts(NS(inputs=[NS(shape=(1, 5, 7))]), bad)
