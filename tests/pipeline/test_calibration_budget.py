"""A build calibrates every backend on the sample count chosen once from the model's cost, and says so."""
from __future__ import annotations

import json

from edgebuild.calibration import budget as B
from edgebuild.pipeline.cli import main


def test_build_records_and_uses_the_calibration_choice(demo_onnx, tmp_path, capsys, monkeypatch):
    from edgebuild.targets.onnx import OnnxBackend

    monkeypatch.setattr(B, "ELEMENT_BUDGET", 1)  # as if the demo were a huge model: the floor
    seen = []
    real = OnnxBackend.convert

    def spy(self, model, profile, precision, calib, *args, **kwargs):  # what the backend is handed (it quantizes in a child)
        seen.append((precision, len(calib)))
        return real(self, model, profile, precision, calib, *args, **kwargs)

    monkeypatch.setattr(OnnxBackend, "convert", spy)
    out = tmp_path / "out"
    code = main(["--model", str(demo_onnx), "--calib", "digits:train", "--eval", "digits:test", "--target", "onnx-cpu",
                 "--no-auto", "--no-cache", "--out", str(out)])
    err = capsys.readouterr().err
    assert code in (0, 1), err
    m = json.loads((out / "manifest.json").read_text())
    choice = m["data"]["calibration_samples"]
    assert choice["used"] == B.MIN_SAMPLES and choice["requested"] == B.DEFAULT_SAMPLES and not choice["explicit"]
    assert choice["activation_elements"] > 0 and "the floor" in choice["reason"]
    assert m["data"]["calibration"]["samples"] == B.MIN_SAMPLES and m["spec"]["calib_samples"] is None
    assert ("int8", B.MIN_SAMPLES) in seen  # the backend calibrated on exactly those
    assert f"calibration: {B.MIN_SAMPLES} samples" in (out / "build.log").read_text()
