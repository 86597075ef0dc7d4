"""Issue 15, item 7: the model classes of tests/conformance/classes.py, each in ONE build for all three CPU targets
(onnx-cpu, x86, arm64) through the CLI, as a user builds them. Each target ends pass (0) or with an honest budget
failure (1), never a conversion error (3) or a traceback; its artifact loads and runs in its own runtime (LiteRT
with XNNPACK, its default delegate, for arm64); the precision its name claims is the precision recorded."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conformance.classes import make_face_net, make_recogniser, make_yolo
from tests.conformance.test_conformance import ARTIFACT_PRECISION, build, check_target

pytest.importorskip("torch")
pytest.importorskip("onnx2tf")
pytest.importorskip("openvino")

MAKERS = {"face_net": make_face_net, "recogniser": make_recogniser, "yolo": make_yolo}
OUTPUTS = {"face_net": {"prob", "box", "landmarks"}, "recogniser": {"logp"}, "yolo": {"detections"}}


def run_tflite(path: Path, reference_shapes: list[tuple]) -> None:
    """Load with LiteRT's default delegate (XNNPACK), feed random inputs of the artifact's own shapes and dtypes,
    and check every output comes back finite, one per reference output, with as many elements."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for d in interpreter.get_input_details():
        interpreter.set_tensor(d["index"], rng.standard_normal(d["shape"]).astype(d["dtype"]))
    interpreter.invoke()
    outs = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
    assert sorted(int(o.size) for o in outs) == sorted(int(np.prod(s)) for s in reference_shapes)
    assert all(np.isfinite(o.astype(np.float64)).all() for o in outs)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MAKERS))
def test_three_cpu_targets_in_one_build(tmp_path, capsys, name):
    model, data = MAKERS[name](tmp_path)
    out = tmp_path / "out"
    code, m, err = build(capsys, model, data, "onnx-cpu,x86,arm64", out)
    assert code in (0, 1), err
    for target in ("onnx-cpu", "x86"):
        t = check_target(m, out, target, data)
        assert set(t["metrics"]["outputs"]) == OUTPUTS[name], t["metrics"]["outputs"].keys()
    t = m["targets"]["arm64"]
    assert t["verdict"] in ("pass", "fail"), t.get("error")
    assert t["artifact"].endswith(".tflite") and ARTIFACT_PRECISION[t["artifact"]] == t["precision"]
    assert set(t["metrics"]["outputs"]) == OUTPUTS[name]
    assert any("ran one sample in LiteRT with XNNPACK" in n for n in t["notes"]), t["notes"]
    shapes = [tuple(o["shape"]) for o in m["model"]["outputs"]]
    run_tflite(out / "arm64" / t["artifact"], shapes)
    if name == "recogniser":  # the raw opset-11 file with Constant weights was upgraded, and the change recorded
        assert any("opset upgraded 11 ->" in n for n in m["model"]["notes"]), m["model"]["notes"]
