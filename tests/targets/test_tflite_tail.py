"""Issue 22: TFLite INT8 of a detector keeps its float post-processing tail float (``float_tail``,
targets/tflite/tail.py). ddddocr's captcha detector concatenates decoded pixel boxes and [0, 1] scores into one output:
one int8 scale for both rounded every score to 0 (arm64 INT8 f1 44-46 vs FP32); ONNX Runtime and OpenVINO keep that
tail float and passed."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2tf")

from torch import nn  # noqa: E402

from tests.targets.test_tflite_conformance import calibration, convert, export, fidelity, model_input  # noqa: E402


class TinyDetector(nn.Module):
    """A conv head on an 8x8 grid, then YOLOX-style decoding in the graph: (xy + grid) * stride, exp(wh) * stride
    (pixels, up to a few hundred) concatenated with sigmoid objectness and class scores (mostly small, as a detector's)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(16, 6, 1)
        with torch.no_grad():
            self.head.bias[4:] -= 3.0  # objectness / class logits around -3: scores about 0.05
        ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys], -1).reshape(1, 64, 2))

    def forward(self, x):
        p = self.head(self.body(x)).flatten(2).transpose(1, 2)  # (1, 64, 6)
        xy = (p[..., :2] + self.grid) * 4.0
        wh = torch.exp(p[..., 2:4]) * 4.0
        return torch.cat([xy * 8.0, wh * 8.0, torch.sigmoid(p[..., 4:])], -1)  # stride 32: boxes in pixels


class YoloxStyle(TinyDetector):
    """As YOLOX (ddddocr's detector): sigmoid scores concatenated beside the raw box outputs before decoding, so a
    chain of layout ops (CONCATENATION, RESHAPE, TRANSPOSE, STRIDED_SLICE) joins the head conv to the output Concat."""

    def forward(self, x):
        h = self.head(self.body(x))
        p = torch.cat([h[:, :4], torch.sigmoid(h[:, 4:])], 1).flatten(2).transpose(1, 2)  # (1, 64, 6)
        xy = (p[..., :2] + self.grid) * 4.0
        wh = torch.exp(p[..., 2:4]) * 4.0
        return torch.cat([xy * 8.0, wh * 8.0, p[..., 4:]], -1)


def _detector(tmp_path):
    torch.manual_seed(0)
    return export(TinyDetector(), (torch.zeros(1, 3, 32, 32),), ["images"], ["detections"], tmp_path / "det.onnx")


def test_the_tail_of_a_detector_is_its_decode_and_a_classifier_has_none(tmp_path):
    from edgebuild.targets.tflite.tail import tail_nodes

    kinds = {n.op_type for n in tail_nodes(_detector(tmp_path))}
    assert {"Exp", "Sigmoid", "Concat", "Add", "Mul"} <= kinds and "Conv" not in kinds, kinds
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 5), nn.Softmax(-1))
    path = export(net, (torch.zeros(1, 3, 32, 32),), ["x"], ["y"], tmp_path / "cls.onnx")
    assert tail_nodes(path) == []  # a lone output Softmax stays int8, as before


def _score_cosine(art, mi, calib, n=8) -> float:
    """Worst cosine over n samples of the score channels (4:) between the artifact on LiteRT + XNNPACK and ONNX."""
    import onnxruntime as ort

    from edgebuild.targets.tflite.backend import TFLiteRunner

    sess = ort.InferenceSession(str(mi.onnx_path), providers=["CPUExecutionProvider"])
    runner = TFLiteRunner(art.path, art.io, 2, "xnnpack")
    worst = 1.0
    for i in range(n):
        feed = calib.feed(i)
        got = np.ravel(np.asarray(runner.run(feed)[0])[..., 4:]).astype(np.float64)
        ref = np.ravel(sess.run(None, feed)[0][..., 4:]).astype(np.float64)
        worst = min(worst, float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref) + 1e-12)))
    return worst


@pytest.mark.slow
def test_a_detector_ships_int8_with_its_decode_tail_float(tmp_path):
    mi = model_input(_detector(tmp_path))
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path / "on")
    assert art.main == "model_int8_mixed.tflite" and art.settings["tail_float_ops"]
    kinds = {op.split()[0] for op in art.settings["tail_float_ops"]}
    assert {"CONCATENATION", "EXP", "LOGISTIC"} <= kinds and "CONV_2D" not in kinds, kinds  # the convs stay int8
    assert any("post-processing tail" in n for n in art.notes)
    on = _score_cosine(art, mi, calib)
    off = convert(mi, calib, tmp_path / "off", float_tail=False)
    assert "tail_float_ops" not in off.settings
    collapsed = _score_cosine(off, mi, calib)
    assert on > 0.99 and collapsed < 0.9, (on, collapsed)  # one int8 scale for pixels and scores: the scores round away


def _head_output_scale(path) -> float:
    """The int8 scale of the last CONV_2D's output in a .tflite."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(open(path, "rb").read()), 0)
    g = m.subgraphs[0]
    conv = [op for op in g.operators if m.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.CONV_2D]
    return float(g.tensors[conv[-1].outputs[0]].quantization.scale[0])


def _head(mi, feed) -> np.ndarray:
    """The head conv's raw output (before decoding) of the ONNX model on one feed."""
    import onnxruntime as ort

    model = onnx.load(str(mi.onnx_path))
    conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(conv.output[0]))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([conv.output[0]], feed)[0]


@pytest.mark.slow
def test_the_head_conv_keeps_its_own_int8_range_when_layout_ops_join_it_to_the_output(tmp_path):
    """The MLIR quantizer gives CONCATENATION, RESHAPE, TRANSPOSE and STRIDED_SLICE one scale for inputs and outputs and
    propagates it along a chain of them, float or not: ddddocr's box-regression conv took the decoded pixel range
    (scale 1.63) and INT8 collapsed (f1 39). The float tail's tensors carry no statistics now (mixed.without_ranges):
    there f1 97.5, and here the head conv's scale is that of its own raw outputs."""
    torch.manual_seed(0)
    mi = model_input(export(YoloxStyle(), (torch.zeros(1, 3, 32, 32),), ["images"], ["detections"], tmp_path / "y.onnx"))
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path / "on")
    assert art.settings["tail_float_ops"]
    raw = np.concatenate([_head(mi, calib.feed(i)).ravel() for i in range(8)])
    scale = _head_output_scale(art.path)
    assert scale * 255 < 3 * (raw.max() - raw.min()), (scale, raw.min(), raw.max())



class Normalised(nn.Module):
    """Features divided by a computed scale (a normalisation, as Basic Pitch's): the scale is near 0 on some inputs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, 2, 1)
        self.scale = nn.Conv2d(3, 1, 4, 4)

    def forward(self, x):
        return self.features(x).flatten(1) / (self.scale(x).flatten(1).mean(1, keepdim=True) + 1e-3)


def test_a_division_by_a_computed_divisor_stays_float_on_arm64(tmp_path):
    """TFLite's int8 DIV fails to invoke when the divisor rounds to its zero point (``div.cc data[i] != zero_point``),
    and every int8 range holds zero: Basic Pitch's INT8 failed on one evaluation sample, and the build on the FP16
    fallback. The converter keeps such a DIV float (the artifact is then ``_int8_mixed``)."""
    from edgebuild.targets.tflite.mixed import computed_int8_divisions

    torch.manual_seed(0)
    path = export(Normalised(), (torch.zeros(1, 3, 16, 16),), ["x"], ["y"], tmp_path / "norm.onnx")
    mi = model_input(path)
    calib = calibration(mi, lambda t, shape, rng: rng.normal(0, 1, shape).astype(np.float32))
    art = convert(mi, calib, tmp_path)
    assert computed_int8_divisions(art.path) == [], "an int8 DIV by a computed divisor is left in the artifact"
    assert any("DIV" in r for r in art.settings["repairs"]), art.settings.get("repairs")
    assert "DIV" in " ".join(art.settings["float_ops_kept"])


@pytest.mark.slow
def test_a_spectrogram_front_end_stays_float_and_the_learned_layers_int8(tmp_path):
    """``float_frontend``: a front-end of fixed-kernel convolutions, squares, Sqrt and Log (a constant-Q transform as
    Basic Pitch has it, whose 193 ops in int8 gave an output cosine of 0.89 on arm64) stays float; the learned conv
    after it is int8."""
    from tests.pipeline.test_error_island import _spectral_model

    mi = model_input(_spectral_model(tmp_path / "s.onnx"))
    calib = calibration(mi, lambda t, shape, rng: rng.normal(0, 1, shape).astype(np.float32))
    art = convert(mi, calib, tmp_path / "on")
    assert art.main == "model_int8_mixed.tflite" and art.settings["frontend_float_ops"], art.settings
    kinds = {op.split()[0] for op in art.settings["frontend_float_ops"]}
    assert {"LOG", "SQRT"} <= kinds, kinds
    assert any("signal-processing front-end" in n for n in art.notes)
    off = convert(mi, calib, tmp_path / "off", float_frontend=False)
    assert "frontend_float_ops" not in off.settings
    on, quantized = fidelity(art, mi, calib), fidelity(off, mi, calib)
    assert on > 0.999 and on > quantized, (on, quantized)
