"""INT8 that is fast on LiteRT with XNNPACK (issue 22, item 5), and XNNPACK's coverage in every arm64 artifact.

The PReLU two-head CNN (MTCNN R-Net shape) ran INT8 at 0.13x the FP32 speed: XNNPACK has no int8 PRELU kernel (each
PReLU fell back to LiteRT's kernels and cut the model into another partition) and no MIRROR_PAD (the MaxPool
ceil-mode edge pad). Measured here (1 thread, median of 200 invoke()): FP32 0.239 -> 0.051 ms, INT8 0.307 ->
0.027 ms; INT8 partitions 6 -> 2 (the int8 SOFTMAX stays on LiteRT's kernels)."""
from __future__ import annotations

import pytest

pytest.importorskip("onnx2tf")
pytest.importorskip("ai_edge_litert")

from tests.targets.test_tflite_conformance import calibration, convert, fidelity, model_input, prelu_onnx  # noqa: E402,F401


@pytest.mark.slow
def test_prelu_cnn_int8_runs_on_xnnpack(prelu_onnx, tmp_path):  # noqa: F811
    mi = model_input(prelu_onnx)
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)
    cov = art.settings["xnnpack_coverage"]
    assert cov["partitions"] <= 2 and set(cov["fallback"]) <= {"SOFTMAX"}, cov  # before: PRELU x4, MIRROR_PAD x2; 6
    assert cov["delegated"] == cov["ops"] - sum(cov["fallback"].values())
    assert any("PRelu as x + (1 - slope)" in r for r in art.settings["onnx_rewrites"])
    assert any(n.startswith("XNNPACK runs ") for n in art.notes)
    assert "PRELU" not in {op.split()[0] for op in art.settings["device_requires"]["builtin_ops"]}
    assert fidelity(art, mi, calib) > 0.99
