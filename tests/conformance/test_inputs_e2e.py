"""Quick end-to-end checks of model loading and data validation (no conversion): old ONNX files accepted
and numerically unchanged, symbolic batch dims on any axis, bad data and bad shapes as one-line exit 2."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgebuild.calibration.sources import load_source
from edgebuild.pipeline.cli import main
from edgebuild.pipeline.spec import BuildSpec, InputSpec
from edgebuild.pipeline.stages.export import export_onnx
from edgebuild.pipeline.stages.load import load_model
from tests.conformance.models import make_encoder, make_old_cnn, make_vad, old_cnn


def ort_run(model, feed):
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("kw, expected", [
    (dict(opset=8), ["IR version upgraded 3 -> 7", "opset upgraded 8 -> 13"]),
    (dict(opset=9, weights_as_inputs=True), ["IR version upgraded 3 -> 7", "9 initializer(s) removed from the graph inputs"]),
    (dict(opset=11, constants=True), ["9 Constant node(s) turned into initializers", "opset upgraded 11 -> 13"]),
])
def test_old_onnx_files_are_accepted_and_numerically_unchanged(tmp_path, kw, expected):
    original = old_cnn(**kw)
    x = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    want = ort_run(original, {"data_0": x})[0]  # onnxruntime runs the file as it is
    if kw.get("opset") == 8:
        with pytest.raises(onnx.checker.ValidationError, match="in initializer but not in graph input"):
            onnx.checker.check_model(original)
    model_path, data = make_old_cnn(tmp_path, **kw)
    loaded = load_model(BuildSpec(model=str(model_path)))
    assert [(i.name, i.shape) for i in loaded.inputs] == [("data_0", (1, 3, 16, 16))]
    evalset = load_source(str(data), loaded.inputs, BuildSpec().preprocess)
    mi, record = export_onnx(loaded, evalset, tmp_path)
    for e in expected:
        assert any(n.startswith(e) for n in record["notes"]), record["notes"]
    exported = onnx.load(str(mi.onnx_path))
    assert exported.ir_version >= 7 and record["opset"] == 13
    assert [i.name for i in exported.graph.input] == ["data_0"]
    np.testing.assert_allclose(ort_run(exported, {"data_0": x})[0], want, rtol=1e-5, atol=1e-6)


def test_symbolic_batch_on_any_axis_and_integer_scalar_inputs(tmp_path):
    vad, _ = make_vad(tmp_path)
    enc, _ = make_encoder(tmp_path)
    assert load_model(BuildSpec(model=str(vad))).inputs == (
        InputSpec("input", (1, 576), "float32", "ANY"), InputSpec("state", (2, 1, 128), "float32", "ANY"),
        InputSpec("sr", (), "int64", "ANY"))
    assert [(i.shape, i.dtype) for i in load_model(BuildSpec(model=str(enc))).inputs] == [((1, 16), "int64")] * 2


def test_vad_export_equals_the_original_on_exact_feeds(tmp_path):
    vad, data = make_vad(tmp_path)
    loaded = load_model(BuildSpec(model=str(vad)))
    evalset = load_source(str(data), loaded.inputs, BuildSpec().preprocess)
    mi, _ = export_onnx(loaded, evalset, tmp_path)
    for i in (0, 5):
        feed = evalset.feed(i)
        for a, b in zip(ort_run(onnx.load(str(vad)), feed), ort_run(onnx.load(str(mi.onnx_path)), feed)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def one_error(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("edgebuild: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


@pytest.mark.parametrize("model", ["onnx", "torch"])
def test_input_shape_of_the_wrong_rank_is_exit_2(demo_onnx, tmp_path, capsys, model):
    src = str(demo_onnx) if model == "onnx" else "edgebuild.pipeline.demo_model:DigitsCNN"
    code, line = one_error(capsys, ["--model", src, "--input-shape", "1,64", "--calib", "digits:train",
                                    "--eval", "digits:test", "--target", "onnx-cpu", "--out", str(tmp_path / "o")])
    assert code == 2 and "[1, 64]" in line


@pytest.mark.parametrize("bad", ["nan", "inf", "complex", "strings"])
@pytest.mark.parametrize("which", ["--calib", "--eval"])
def test_bad_values_in_data_are_exit_2_naming_source_and_input(demo_onnx, tmp_path, capsys, bad, which):
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    if bad in ("nan", "inf"):
        x[7, 0, 3, 3] = np.nan if bad == "nan" else np.inf
    elif bad == "complex":
        x = x.astype(np.complex64)
    else:
        x = np.array([str(v) for v in x.ravel()[:20]])
    np.save(tmp_path / "bad.npy", x)
    good = "digits:test" if which == "--calib" else "digits:train"
    other = "--eval" if which == "--calib" else "--calib"
    code, line = one_error(capsys, ["--model", str(demo_onnx), which, str(tmp_path / "bad.npy"), other, good,
                                    "--target", "onnx-cpu", "--out", str(tmp_path / "o")])
    assert code == 2 and "bad.npy" in line
    assert {"nan": "input input has 1 NaN/Inf", "inf": "NaN/Inf", "complex": "complex", "strings": "not numbers"}[bad] in line


@pytest.mark.parametrize("rates, specialized", [((16000,), True), ((16000, 8000), False)])
def test_an_if_on_an_input_the_data_never_varies_becomes_the_taken_branch(tmp_path, rates, specialized):
    from tests.conformance.models import make_branchy_vad

    model_path, data = make_branchy_vad(tmp_path, rates)
    loaded = load_model(BuildSpec(model=str(model_path)))
    evalset = load_source(str(data), loaded.inputs, BuildSpec().preprocess)
    mi, record = export_onnx(loaded, evalset, tmp_path)
    exported = onnx.load(str(mi.onnx_path))
    ops = {n.op_type for n in exported.graph.node}
    assert [i.name for i in exported.graph.input] == ["input", "state", "sr"]  # the interface is unchanged
    if specialized:
        assert "If" not in ops and "LSTM" in ops and record["frozen_inputs"] == {"sr": 16000}
        assert any(n.startswith("graph specialized for sr=16000") for n in record["notes"]), record["notes"]
        dims = [d.dim_value for d in exported.graph.input[1].type.tensor_type.shape.dim]
        assert dims == [2, 1, 16]  # the untaken branch no longer keeps the sizes symbolic
    else:
        assert "If" in ops and "frozen_inputs" not in record
        assert any("which vary in the data" in n for n in record["notes"]), record["notes"]
    original = onnx.load(str(model_path))
    for i in (0, 1, 7):  # the reference computes what the original computes on every sample
        feed = evalset.feed(i)
        for a, b in zip(ort_run(original, feed), ort_run(exported, feed)):
            np.testing.assert_array_equal(a, b)
