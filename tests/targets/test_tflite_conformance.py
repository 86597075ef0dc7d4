"""Real-world model shapes on the TFLite backend (issue 15): each tiny model is built here, converted for arm64
(or cortex-m), and must load and run in LiteRT with XNNPACK, close to the FP32 ONNX model.

    model (built here)                           what broke                          what the conversion does now
    PReLU two-head CNN, MaxPool(ceil_mode)       XNNPACK "failed to prepare"         MaxPool as SAME pooling / edge Pad
    same, rewrites off                           XNNPACK "failed to prepare"         ops at fault kept float / named
    BERT-style encoder, int64 ids + mask, GELU   'tf.Erf' is not a builtin op        Erf as tanh (3.6e-4), ids int64
    ONNX Sum (ADD_N)                             not full-integer (ADD_N)            chain of Add: full-integer
    ONNX LRN                                     not full-integer (LRN)              float where allowed, else named
    opset-11 Softmax, Constant weights, Paddle   onnx2tf at Softmax@0 (scope name)   names made TF-safe, converts
    CTC recogniser: conv -> BiLSTM -> log-softmax  (as reported: 0 signatures)       converts
    VAD LSTM cell: state [2,1,128], 0-d int64 sr   IndexError in calibration          state kept, sr [1] on device
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgebuild.calibration.dataset import SampleSet, sample_shape
from edgebuild.pipeline.errors import ConversionError
from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
from edgebuild.targets.profiles import catalogue
from tests.conformance.classes import weights_as_constants

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2tf")
pytest.importorskip("ai_edge_litert")
nn = torch.nn
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SAMPLES = 16


# ---- helpers -----------------------------------------------------------------------------------------
def export(module, args, names, outputs, path, opset=17):
    import onnxslim

    torch.onnx.export(module.eval(), args, str(path), opset_version=opset, input_names=names, output_names=outputs,
                      dynamo=False)
    onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))  # as the pipeline's export does
    return path


def model_input(path) -> ExportedModel:
    g = onnx.load(str(path))
    init = {i.name for i in g.graph.initializer}

    def info(v):
        t = v.type.tensor_type
        shape = tuple(d.dim_value for d in t.shape.dim)
        return TensorInfo(v.name, shape, helper.tensor_dtype_to_np_dtype(t.elem_type).name, "NCHW" if len(shape) == 4 else "ANY")

    return ExportedModel(path, tuple(info(v) for v in g.graph.input if v.name not in init), tuple(info(v) for v in g.graph.output), 17)


def calibration(mi: ExportedModel, make=None) -> SampleSet:
    """SAMPLES samples per input, stored without the batch axis, with the model's exact input shapes."""
    rng = np.random.default_rng(0)
    data = {}
    for t in mi.inputs:
        shape = (SAMPLES, *sample_shape(t.shape))
        data[t.name] = make(t, shape, rng) if make else rng.random(shape, dtype=np.float32).astype(t.dtype)
    return SampleSet("conformance", data, shapes={t.name: t.shape for t in mi.inputs})


def convert(mi, calib, tmp_path, profile="arm64", precision="int8", **settings):
    return get_backend("tflite").convert(mi, catalogue()[profile] if isinstance(profile, str) else profile, precision,
                                         calib, tmp_path / "out", settings)


def fidelity(art, mi, calib, n=8) -> float:
    """Worst cosine over n samples between the artifact on LiteRT + XNNPACK and onnxruntime on the ONNX model."""
    import onnxruntime as ort

    from edgebuild.targets.tflite.backend import TFLiteRunner

    sess = ort.InferenceSession(str(mi.onnx_path), providers=["CPUExecutionProvider"])
    runner = TFLiteRunner(art.path, art.io, 2, "xnnpack")  # raises when XNNPACK cannot prepare the model
    worst = 1.0
    for i in range(n):
        feed = calib.feed(i)
        got = np.concatenate([np.ravel(y) for y in runner.run(feed)]).astype(np.float64)
        ref = np.concatenate([np.ravel(y) for y in sess.run(None, feed)]).astype(np.float64)
        worst = min(worst, float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))))
    return worst


def ops(art) -> set[str]:
    return {op.split()[0] for op in art.settings["device_requires"]["builtin_ops"]}


# ---- the PReLU two-head CNN (MTCNN R-Net shape) -------------------------------------------------------
class PReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True),
                                  nn.Conv2d(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2, ceil_mode=True),
                                  nn.Conv2d(48, 64, 2), nn.PReLU(64))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.PReLU(128))
        self.prob, self.box = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        h = self.fc(self.body(x))
        return torch.softmax(self.prob(h), 1), self.box(h)


@pytest.fixture(scope="module")
def prelu_onnx(tmp_path_factory):
    torch.manual_seed(0)
    m = PReLUNet()
    for p in m.modules():
        if isinstance(p, nn.PReLU):
            p.weight.data.uniform_(0.05, 0.4)
    return export(m, (torch.zeros(1, 3, 24, 24),), ["input"], ["prob", "box"], tmp_path_factory.mktemp("prelu") / "prelu.onnx")


@pytest.mark.slow
def test_prelu_two_head_cnn_runs_on_xnnpack(prelu_onnx, tmp_path):
    mi = model_input(prelu_onnx)
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)
    assert art.main == "model_int8.tflite" and art.settings["xnnpack_checked"]
    # MaxPool(3, 2, ceil_mode) on 22x22 is TF's SAME pooling, PReLU x + (1 - a) Relu(-x) in INT8: no PADV2 (XNNPACK
    # refused its -3.4e38 range), no MIRROR_PAD and no int8 PRELU (neither has an XNNPACK kernel)
    assert not {"PRELU", "MIRROR_PAD", "PADV2"} & ops(art)
    assert any("MaxPool padding as TF's SAME pooling" in r for r in art.settings["onnx_rewrites"])
    assert fidelity(art, mi, calib) > 0.999


@pytest.mark.slow
def test_xnnpack_failure_is_repaired_or_named(prelu_onnx, tmp_path):
    """onnx2tf's own MaxPool padding (rewrites off) gives a tensor scale of ~1e36 that XNNPACK refuses: with
    float layers allowed those ops stay float (and it loads), on an integer-only XNNPACK profile the error
    names them and suggests what to do — never the bare 'failed to prepare'."""
    mi = model_input(prelu_onnx)
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path, onnx_rewrites=False)
    assert art.main == "model_int8_mixed.tflite" and art.settings["float_ops_kept"]
    assert any("XNNPACK" in r for r in art.settings["repairs"])
    fidelity(art, mi, calib)  # loads and runs with XNNPACK
    strict = dataclasses.replace(catalogue()["arm64"], allow_float_layers=False)
    with pytest.raises(ConversionError, match=r"XNNPACK cannot run .*ops at fault: .*PADV2.*scale 1.*Suggestion"):
        convert(mi, calib, tmp_path / "strict", strict, onnx_rewrites=False)


# ---- BERT-style encoder: int64 ids + mask, GELU (Erf) ------------------------------------------------
class TinyBert(nn.Module):
    def __init__(self, vocab=100, dim=32, length=16):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.randn(1, length, dim) * 0.1)
        self.layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, activation="gelu", batch_first=True)

    def forward(self, ids, mask):
        h = self.layer(self.emb(ids) + self.pos, src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1)


@pytest.mark.slow
def test_bert_int64_inputs_and_gelu(tmp_path):
    torch.manual_seed(0)
    args = (torch.zeros(1, 16, dtype=torch.int64), torch.ones(1, 16, dtype=torch.int64))
    mi = model_input(export(TinyBert(), args, ["input_ids", "attention_mask"], ["embedding"], tmp_path / "bert.onnx"))
    assert "Erf" in {n.op_type for n in onnx.load(str(mi.onnx_path)).graph.node}

    def ids(t, shape, rng):
        if t.name == "attention_mask":
            return (np.arange(16)[None] < rng.integers(4, 17, (shape[0], 1))).astype(np.int64)
        return rng.integers(0, 100, shape).astype(np.int64)

    calib = calibration(mi, ids)
    art = convert(mi, calib, tmp_path)
    assert [(p["dtype"], p["scale"]) for p in art.io["inputs"]] == [("int64", None)] * 2  # ids never quantized
    assert any(r.startswith("Erf as tanh") for r in art.settings["onnx_rewrites"]) and "TANH" in ops(art)
    assert art.settings["fp32_graph_check"]["cosine_min"] > 0.9999  # the Erf approximation costs nothing visible
    assert fidelity(art, mi, calib) > 0.85  # INT8 of a random-weight encoder; the accuracy search judges real ones


class PassThroughBert(TinyBert):
    """sentence-transformers exports return their inputs too: ``(embedding, input_ids, attention_mask)``."""

    def forward(self, ids, mask):
        h = self.layer(self.emb(ids) + self.pos, src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).float()
        return h, (h * m).sum(1) / m.sum(1).clamp(min=1), ids, mask


@pytest.mark.slow
def test_outputs_that_are_inputs_unchanged(tmp_path):
    """MiniLM's outputs (exit 3 on arm64): onnx2tf drops an output that is an input (the .tflite is converted without
    them and the runner returns the input in their place, in the source's output order), and loses one whose tensor
    name has a ':' (torch names it ``onnx::Shape_422``; renamed the way onnx2tf sanitizes names)."""
    from edgebuild.targets.tflite import passthrough as tflite_passthrough

    torch.manual_seed(0)
    args = (torch.zeros(1, 16, dtype=torch.int64), torch.ones(1, 16, dtype=torch.int64))
    mi = model_input(export(PassThroughBert(), args, ["input_ids", "attention_mask"], ["onnx::Shape_7", "embedding", "ids", "mask"],
                            tmp_path / "bert.onnx"))
    assert tflite_passthrough.find(mi.onnx_path) == {"ids": "input_ids", "mask": "attention_mask"}
    calib = calibration(mi, lambda t, shape, rng: rng.integers(0, 2 if t.name == "attention_mask" else 100,
                                                               shape).astype(np.int64))
    art = convert(mi, calib, tmp_path, precision="fp32")
    assert [o["name"] for o in art.io["outputs"]] == ["onnx::Shape_7", "embedding", "ids", "mask"]
    assert [o.get("from_input") for o in art.io["outputs"]] == [None, None, "input_ids", "attention_mask"]
    assert any("output ids is input input_ids unchanged" in n for n in art.notes)
    assert fidelity(art, mi, calib) > 0.9999  # all three outputs, in order, against onnxruntime


# ---- Sum / LRN ---------------------------------------------------------------------------------------
def _conv_graph(path, middle: list, extra_inits=()) -> ExportedModel:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}") for i in range(3)]
    g = helper.make_graph(nodes + middle, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], initializer=inits + list(extra_inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return model_input(path)


@pytest.mark.slow
def test_sum_becomes_int8_adds(tmp_path):
    mi = _conv_graph(tmp_path / "sum.onnx", [helper.make_node("Sum", ["c0", "c1", "c2"], ["s"], name="sum"),
                                             helper.make_node("Relu", ["s"], ["y"], name="relu")])
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)
    assert art.main == "model_int8.tflite" and "ADD_N" not in ops(art) and "ADD" in ops(art)
    assert fidelity(art, mi, calib) > 0.99


@pytest.mark.slow
def test_lrn_stays_float_where_allowed_and_is_named_on_cortex_m(tmp_path):
    lrn = [helper.make_node("Add", ["c0", "c1"], ["a"], name="add"),
           helper.make_node("LRN", ["a"], ["y"], size=5, alpha=1e-4, beta=0.75, bias=1.0, name="lrn")]
    mi = _conv_graph(tmp_path / "lrn.onnx", lrn)
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)
    assert art.main == "model_int8_mixed.tflite"
    assert [k.split()[0] for k in art.settings["float_ops_kept"]] == ["LOCAL_RESPONSE_NORMALIZATION"]
    assert any(n.startswith("mixed INT8") for n in art.notes)
    assert fidelity(art, mi, calib) > 0.99
    with pytest.raises(ConversionError, match=r"LOCAL_RESPONSE_NORMALIZATION.*ONNX LRN.*integer-only"):
        convert(mi, calib, tmp_path / "mcu", "cortex-m")


# ---- opset-11 Softmax with Constant-node weights; CTC recogniser; VAD with state and a 0-d input -------
class OrientationNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return torch.softmax(self.fc(self.f(x)), dim=1)


@pytest.mark.slow
def test_opset11_softmax_with_constant_weights(tmp_path):
    """Raw opset-11 export with every weight a Constant node, upgraded to 13 by onnx's version converter and
    simplified, as pipeline/stages/export.py does with ONNX sources below opset 13, its nodes named as PaddlePaddle
    names them (``Softmax@0``: not a TF scope name)."""
    import onnxslim
    from onnx import version_converter

    raw = tmp_path / "raw.onnx"
    torch.onnx.export(OrientationNet().eval(), (torch.zeros(1, 3, 48, 192),), str(raw), opset_version=11,
                      input_names=["x"], output_names=["prob"], dynamo=False)
    m = weights_as_constants(onnx.load(str(raw)))
    up = onnxslim.slim(onnx.shape_inference.infer_shapes(version_converter.convert_version(m, 13)))
    for i, n in enumerate(up.graph.node):  # PaddlePaddle's node names (PP-OCR): onnx2tf named tf.nn.softmax after them
        n.name = f"{n.op_type}@{i}"
    path = tmp_path / "cls.onnx"
    onnx.save(up, str(path))
    mi = model_input(path)
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)
    assert art.main == "model_int8.tflite" and "SOFTMAX" in ops(art)
    assert fidelity(art, mi, calib) > 0.999


class CTCRecogniser(nn.Module):
    def __init__(self, classes=12):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d((2, 1)), nn.Conv2d(32, 32, (8, 1)), nn.ReLU())
        self.rnn, self.fc = nn.LSTM(32, 24, bidirectional=True, batch_first=True), nn.Linear(48, classes)

    def forward(self, x):
        seq = self.cnn(x).squeeze(2).permute(0, 2, 1)  # [1, T, C]
        return torch.log_softmax(self.fc(self.rnn(seq)[0]), -1)


@pytest.mark.slow
def test_ctc_recogniser(tmp_path):
    torch.manual_seed(0)
    mi = model_input(export(CTCRecogniser(), (torch.zeros(1, 3, 32, 64),), ["x"], ["logp"], tmp_path / "ctc.onnx"))
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)
    assert art.main == "model_int8.tflite" and art.io["outputs"][0]["shape"] == [1, 32, 12]
    assert fidelity(art, mi, calib) > 0.99


class VAD(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.cell, self.out = nn.Linear(576, 64), nn.LSTMCell(64, 128), nn.Linear(128, 1)

    def forward(self, x, state, sr):
        h, c = self.cell(torch.relu(self.enc(x)) * (sr.float() / 16000.0), (state[0], state[1]))
        return torch.sigmoid(self.out(h)), torch.stack([h, c])


@pytest.mark.slow
def test_vad_state_off_axis_0_and_scalar_int64_input(tmp_path):
    args = (torch.zeros(1, 576), torch.zeros(2, 1, 128), torch.tensor(16000))
    mi = model_input(export(VAD(), args, ["input", "state", "sr"], ["prob", "stateN"], tmp_path / "vad.onnx"))
    assert [t.shape for t in mi.inputs] == [(1, 576), (2, 1, 128), ()]

    def data(t, shape, rng):
        return np.full(shape, 16000, np.int64) if t.name == "sr" else rng.normal(0, 0.5, shape).astype(np.float32)

    calib = calibration(mi, data)
    art = convert(mi, calib, tmp_path)
    io = {p["name"]: p for p in art.io["inputs"]}
    assert io["state"]["shape"] == [2, 1, 128] and io["sr"]["dtype"] == "int64" and io["sr"]["scale"] is None
    assert io["sr"]["source_shape"] == [] and io["sr"]["shape"] == [1] and any("0-d" in n for n in art.notes)
    assert fidelity(art, mi, calib) > 0.99


# ---- the rewrites themselves (onnxruntime only: fast) -------------------------------------------------
def test_rewrites_are_exact_or_bounded(tmp_path):
    import onnxruntime as ort

    from edgebuild.targets.tflite.rewrite.ops import ERF_MAX_ABS_ERROR
    from edgebuild.targets.tflite.rewrite import rewrite

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 11, 10])
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, name="pool"),
             helper.make_node("MaxPool", ["x"], ["q"], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], name="pool2"),
             helper.make_node("Erf", ["x"], ["e"], name="erf"),
             helper.make_node("Sum", ["x", "x", "e"], ["s"], name="sum")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("p", "q", "e", "s")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs), opset_imports=[helper.make_opsetid("", 13)])
    feed = {"x": np.random.default_rng(0).normal(0, 2, (1, 4, 11, 10)).astype(np.float32)}  # negative values too
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    new, notes = rewrite(onnx.load_from_string(model.SerializeToString()))
    assert {n.op_type for n in new.graph.node} >= {"Pad", "Tanh", "Add"} and not {"Erf", "Sum"} & {n.op_type for n in new.graph.node}
    assert len(notes) == 3 and "pool" in notes[0] and "pool2" in notes[0]
    got = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(got[0], want[0])  # max pooling: exact
    np.testing.assert_array_equal(got[1], want[1])
    assert np.abs(got[2] - want[2]).max() <= ERF_MAX_ABS_ERROR
    assert np.abs(got[3] - want[3]).max() <= ERF_MAX_ABS_ERROR + 1e-5
