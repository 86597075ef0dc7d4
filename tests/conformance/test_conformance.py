"""Conformance corpus (issue 15): self-built models of the classes people deploy, built end to end through
the CLI for the CPU targets. A build may pass (0) or miss a budget honestly (1); it never fails to convert
(3) and never ends in a traceback. Each artifact is then run in its own runtime on exact-shape feeds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgebuild.calibration.sources import load_source
from edgebuild.pipeline.cli import main
from edgebuild.pipeline.spec import InputSpec, PreprocessSpec
from tests.conformance.models import make_encoder, make_old_cnn, make_vad

MAKERS = {"vad": make_vad, "encoder": make_encoder, "zoo_cnn": make_old_cnn}
ARTIFACT_PRECISION = {"model_int8_qdq.onnx": "int8", "model_int8.xml": "int8", "model_int8.tflite": "int8",
                      "model_int8_mixed.tflite": "int8", "model_int8_mixed.xml": "int8", "model_fp16.tflite": "fp16",
                      "model_fp32.onnx": "fp32", "model_fp16.xml": "fp16", "model_fp32.xml": "fp32"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("corpus")
    return {name: make(folder) for name, make in MAKERS.items()}


def build(capsys, model: Path, data: Path, targets: str, out: Path, *extra) -> tuple[int, dict, str]:
    code = main(["--model", str(model), "--calib", str(data), "--target", targets, "--no-auto", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    return code, manifest, err


def feeds(manifest: dict, data: Path, n: int = 4) -> list[dict[str, np.ndarray]]:
    inputs = tuple(InputSpec(i["name"], tuple(i["shape"]), i["dtype"], i.get("layout") or "ANY") for i in manifest["model"]["inputs"])
    calib = load_source(str(data), inputs, PreprocessSpec())
    return [calib.feed(i) for i in range(n)]


def run_artifact(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The artifact in its own runtime (not edgebuild's runner): what a deployment would load."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    if path.suffix == ".xml":
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU")
        result = compiled.infer_new_request({k: np.array(v) for k, v in feed.items()})
        return [np.asarray(result[o]) for o in compiled.outputs]
    raise AssertionError(f"no runtime for {path}")


def check_target(manifest: dict, out: Path, target: str, data: Path) -> dict:
    t = manifest["targets"][target]
    assert t["verdict"] in ("pass", "fail"), (target, t.get("error"))
    artifact = out / target / t["artifact"]
    assert artifact.is_file()
    precision = ARTIFACT_PRECISION.get(t["artifact"])
    assert precision is None or precision == t["precision"], (t["artifact"], t["precision"])
    reference = out / "reference" / "model_fp32.onnx"
    for feed in feeds(manifest, data, 3):
        got, want = run_artifact(artifact, feed), run_artifact(reference, feed)
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(np.isfinite(g).all() for g in got)
    return t


CASES = [pytest.param("vad", "onnx-cpu"), pytest.param("vad", "x86"),
         pytest.param("encoder", "onnx-cpu"), pytest.param("encoder", "x86"),
         pytest.param("zoo_cnn", "onnx-cpu"), pytest.param("zoo_cnn", "x86")]
INPUTS = {"vad": [("input", [1, 576], "float32"), ("state", [2, 1, 128], "float32"), ("sr", [], "int64")],
          "encoder": [("input_ids", [1, 16], "int64"), ("attention_mask", [1, 16], "int64")],
          "zoo_cnn": [("data_0", [1, 3, 16, 16], "float32")]}


@pytest.mark.slow
@pytest.mark.parametrize("name, target", CASES)
def test_cpu_targets(corpus, tmp_path, capsys, name, target):
    model, data = corpus[name]
    out = tmp_path / "out"
    code, m, err = build(capsys, model, data, target, out)
    assert code in (0, 1), err
    assert [(i["name"], i["shape"], i["dtype"]) for i in m["model"]["inputs"]] == INPUTS[name]
    t = check_target(m, out, target, data)
    if name == "vad":  # the scalar stays 0-d, one value for every sample; both outputs judged
        assert m["data"]["calibration"]["inputs"]["sr"]["shape"] == [] and m["data"]["calibration"]["broadcast"] == ["sr"]
        assert set(t["metrics"]["outputs"]) == {"prob", "new_state"}
    elif name == "encoder":
        assert t["metrics"]["outputs"]["embedding"]["cosine_mean"] > 0.95
    else:  # the old file's upgrade is recorded
        notes = m["model"]["notes"]
        assert "IR version upgraded 3 -> 7" in notes and any("opset upgraded 8 -> 13" in n for n in notes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vad", "encoder"])  # zoo_cnn on arm64 (LRN, Sum) is covered by tests/targets
def test_arm64(corpus, tmp_path, capsys, name):
    """TFLite (~70 s a build here, most of it onnx2tf): int64 inputs, a 0-d scalar, a state batched on axis 1."""
    from ai_edge_litert.interpreter import Interpreter

    model, data = corpus[name]
    out = tmp_path / "out"
    code, m, err = build(capsys, model, data, "arm64", out)
    assert code in (0, 1), err
    t = m["targets"]["arm64"]
    assert t["verdict"] in ("pass", "fail") and t["artifact"].endswith(".tflite")
    assert any("ran one sample in LiteRT with XNNPACK" in n for n in t["notes"]), t["notes"]
    interpreter = Interpreter(model_path=str(out / "arm64" / t["artifact"]))  # XNNPACK is the default delegate
    interpreter.allocate_tensors()
    assert len(interpreter.get_input_details()) == len(INPUTS[name])


@pytest.mark.slow
def test_if_on_a_fixed_scalar_builds_every_cpu_target_as_a_plain_graph(tmp_path, capsys):
    """A VAD whose network sits in ``If(sr == 16000)`` (sr 16000 in all data): specialized once, so onnx-cpu is
    really INT8 (the quantizer does not enter If subgraphs), OpenVINO never sees the untaken branch and onnx2tf
    (which has no If) converts it; ``sr`` stays in every interface that keeps it."""
    from tests.conformance.models import make_branchy_vad

    model, data = make_branchy_vad(tmp_path)
    out = tmp_path / "out"
    code, m, err = build(capsys, model, data, "onnx-cpu,x86,arm64", out)
    assert code in (0, 1), err
    assert m["model"]["frozen_inputs"] == {"sr": 16000}
    assert [i["name"] for i in m["model"]["inputs"]] == ["input", "state", "sr"]
    import onnx

    t = m["targets"]["onnx-cpu"]
    shipped = onnx.load(str(out / "onnx-cpu" / t["artifact"]))
    assert "If" not in {n.op_type for n in shipped.graph.node}
    if t["artifact"] == "model_int8_qdq.onnx":
        assert any(n.op_type == "QuantizeLinear" for n in shipped.graph.node)
    else:  # this 0.05 ms VAD's INT8 (its stateful LSTM float) can run slower than FP32: FP32 ships, INT8 was a candidate
        assert t["artifact"] == "model_fp32.onnx" and t["objective"]["overruled"], t["objective"]
        cand = {c["artifact"]: c for c in t["objective"]["candidates"]}
        assert cand["model_int8_qdq.onnx"]["within_accuracy_budget"]
    for target in ("onnx-cpu", "x86"):
        check_target(m, out, target, data)
    t = m["targets"]["arm64"]
    assert t["verdict"] in ("pass", "fail") and t["artifact"].endswith(".tflite"), t.get("error")
