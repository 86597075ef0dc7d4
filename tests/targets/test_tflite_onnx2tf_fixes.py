"""onnx2tf dead ends found on real models (issue 15), each on a tiny model of that shape built here.

    model (built here)                               what broke on arm64                      fixed by
    STFT magnitude (Conv1d, Slice over all axes,     state out [2, 0, 128] (onnx2tf sliced     Slice per axis
    Sqrt) -> LSTM, state [2, 1, H], 0-d int64 sr     the wrong axis); legacy quantizer: SQRT   (tflite/rewrite); MLIR
                                                                                              quantizer on refusal
    opset-11 CNN with a grouped (not depthwise) Conv "SignatureDef signature_key is None and   Keras model owns
                                                     model has 0 Signatures" in calibration    onnx2tf's variables
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.targets.test_tflite_conformance import calibration, convert, export, fidelity, model_input

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
nn = torch.nn
from onnx import numpy_helper  # noqa: E402

INT64_MAX = np.iinfo(np.int64).max


def slices_over_all_axes(path) -> int:
    """Rewrite every single-axis Slice of a 3-D tensor into the form silero-vad ships: starts/ends/axes/steps
    over all three axes, INT64_MAX ends on the axes it keeps whole. Returns how many were rewritten."""
    model = onnx.load(str(path))
    init = {i.name: i for i in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model).graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in list(inferred.value_info) + list(inferred.input)}
    done = 0
    for node in model.graph.node:
        if node.op_type != "Slice" or rank.get(node.input[0]) != 3 or len(node.input) < 4:
            continue
        st, en, ax = (int(numpy_helper.to_array(init[n])[0]) for n in node.input[1:4])
        starts, ends = [0, 0, 0], [INT64_MAX] * 3
        starts[ax % 3], ends[ax % 3] = st, en
        names = [f"{node.output[0]}_{p}" for p in ("starts", "ends", "axes", "steps")]  # constants are shared
        model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), n)
                                       for v, n in zip((starts, ends, [0, 1, 2], [1, 1, 1]), names))
        del node.input[1:]
        node.input.extend(names)
        done += 1
    onnx.save(model, str(path))
    return done


class StftVad(nn.Module):
    """silero-vad's shape: conv STFT, magnitude from the two halves of the channels, LSTM with state in and out."""

    def __init__(self, frame=64, bins=9, hidden=16):
        super().__init__()
        self.bins = bins
        self.stft = nn.Conv1d(1, 2 * bins, 16, stride=8, bias=False)
        self.enc, self.rnn, self.out = nn.Conv1d(bins, hidden, 3, padding=1), nn.LSTM(hidden, hidden), nn.Linear(hidden, 1)

    def forward(self, x, state, sr):
        spec = self.stft(x.unsqueeze(1))
        mag = torch.sqrt(spec[:, :self.bins] ** 2 + spec[:, self.bins:] ** 2)
        feats = torch.relu(self.enc(mag)).mean(dim=2) * (sr.float() / 16000.0)
        y, (h, c) = self.rnn(feats.unsqueeze(0), (state[:1], state[1:]))
        return torch.sigmoid(self.out(y[0])), torch.cat([h, c])


@pytest.mark.slow
def test_stft_lstm_vad_slices_over_all_axes(tmp_path):
    args = (torch.zeros(1, 64), torch.zeros(2, 1, 16), torch.tensor(16000))
    path = export(StftVad(), args, ["input", "state", "sr"], ["prob", "stateN"], tmp_path / "vad.onnx")
    assert slices_over_all_axes(path) >= 2  # the two STFT halves (and the state halves)
    mi = model_input(path)

    def data(t, shape, rng):
        return np.full(shape, 16000, np.int64) if t.name == "sr" else rng.normal(0, 0.5, shape).astype(np.float32)

    calib = calibration(mi, data)
    art = convert(mi, calib, tmp_path)  # before: "output stateN: TF shape [2, 0, 16] does not match ONNX [2, 1, 16]"
    assert any("Slice over several axes" in r for r in art.settings["onnx_rewrites"])
    assert art.settings["quantizer_used"] == "mlir"  # the legacy quantizer refuses SQRT
    assert art.settings["fp32_graph_check"]["cosine_min"] > 0.999
    outs = {p["name"]: p for p in art.io["outputs"]}
    assert outs["stateN"]["source_shape"] == [2, 1, 16]
    assert fidelity(art, mi, calib) > 0.9  # INT8 on random data; loads and runs with XNNPACK (raises otherwise)


class GroupedConvNet(nn.Module):
    """A PP-OCR-like classifier: a grouped conv (groups=2, not depthwise) between plain convs, softmax head."""

    def __init__(self):
        super().__init__()
        self.a, self.g = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.nn.functional.hardswish(self.g(torch.relu(self.a(x))))
        return torch.softmax(self.head(x.mean(dim=(2, 3))), dim=1)


@pytest.mark.slow
def test_grouped_conv_keeps_its_signature(tmp_path):
    path = export(GroupedConvNet(), (torch.zeros(1, 3, 16, 32),), ["x"], ["prob"], tmp_path / "cls.onnx", opset=11)
    mi = model_input(path)
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)  # before: "SignatureDef signature_key is None and model has 0 Signatures"
    assert art.main == "model_int8.tflite" and ("CONV_2D" in {op.split()[0] for op in art.settings["device_requires"]["builtin_ops"]})
    assert fidelity(art, mi, calib) > 0.99


# ---- the rewrite alone (onnxruntime only: fast) ---------------------------------------------------------------
def test_slice_per_axis_is_exact(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgebuild.targets.tflite.rewrite.ops import slice_per_axis

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 5])
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in [
        ("s", [0, 3, 0]), ("e", [INT64_MAX, INT64_MAX, INT64_MAX]), ("a", [0, 1, 2]), ("t", [1, 1, 1]),
        ("s2", [1, -1]), ("e2", [5, 0]), ("a2", [2, 1]), ("t2", [1, -2])]]
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"], name="half"),
             helper.make_node("Slice", ["x", "s2", "e2", "a2", "t2"], ["z"], name="two_axes")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * 3) for n in ("y", "z")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits), opset_imports=[helper.make_opsetid("", 13)])
    feed = {"x": np.random.default_rng(0).normal(size=(1, 6, 5)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    new, note = slice_per_axis(onnx.load_from_string(model.SerializeToString()))
    onnx.checker.check_model(new)
    slices = [n for n in new.graph.node if n.op_type == "Slice"]
    assert len(slices) == 3 and note and "half" in note and "two_axes" in note  # 1 axis cut + 2 axes cut
    assert all(numpy_helper.to_array(next(i for i in new.graph.initializer if i.name == n.input[3])).size == 1 for n in slices)
    got = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert got[0].shape == (1, 3, 5)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
