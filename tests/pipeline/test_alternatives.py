"""Profiles with alternatives (pipeline/stages/alternatives.py): arm64's fallback to ExecuTorch when the LiteRT way
cannot convert a PyTorch model, and arm64-best, which builds both and ships the better by the objective.

Fast tests: the profile keys and what is chosen among built candidates. Slow ones build the demo end to end: the
TFLite converter crashing (a real converter failure, injected with EDGEBUILD_FAULT) leaves arm64 with the ExecuTorch
.pte, which `edgebuild validate` then checks on the ExecuTorch runtime; an ONNX model has no ExecuTorch way and
fails with both reasons; arm64-best builds both ways and ships the one its record says.
"""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgebuild.errors import BadInputError
from edgebuild.pipeline.results import Latency
from edgebuild.pipeline.stages.alternatives import Candidate, choose
from edgebuild.targets.profiles import catalogue


def test_arm64_falls_back_to_executorch_and_arm64_best_competes():
    cat = catalogue()
    assert cat["arm64"].alternatives == ("arm64-executorch",) and cat["arm64"].alternatives_mode == "fallback"
    assert cat["android-arm64"].alternatives == ("android-executorch",)
    best = cat["arm64-best"]
    assert best.backend == "tflite" and best.alternatives == ("arm64-executorch",) and best.alternatives_mode == "compete"
    assert cat["arm64-executorch"].alternatives == ()  # the ExecuTorch profiles themselves have none


@pytest.mark.parametrize("body, match", [
    ("alternatives: [no-such-profile]", "unknown alternative"),
    ("alternatives: [mine]", "alternatives must list other profiles"),
    ("alternatives: arm64-executorch", "alternatives must list other profiles"),
    ("alternatives: [arm64-executorch]\nalternatives_mode: sometimes", "fallback or compete"),
])
def test_bad_alternatives_are_exit_2(tmp_path, body, match):
    path = tmp_path / "mine.yaml"
    path.write_text(f"name: mine\nbackend: tflite\ndescription: mine\n{body}\n")
    with pytest.raises(BadInputError, match=match):
        catalogue((str(path),))


def _built(name, status="pass", precision="int8", p50=1.0, size=1000, loss=0.0):
    verdict = SimpleNamespace(passed=status == "pass", status=status)
    result = SimpleNamespace(verdict=verdict, precision=precision, latency=Latency(p50_ms=p50), size_bytes=size)
    c = Candidate(SimpleNamespace(name=name), Path(name))
    c.result, c.prepared = result, SimpleNamespace(chosen=SimpleNamespace(loss=loss))
    return c


def test_what_ships_passing_first_then_the_objective_ties_to_the_profile_itself():
    own, alt = _built("arm64", p50=2.0, size=900, loss=-0.2), _built("arm64-executorch", p50=1.0, size=1000, loss=-0.5)
    assert choose([own, alt], "precision", "int8") is alt  # both INT8: the faster
    assert choose([own, alt], "latency", "int8") is alt
    assert choose([own, alt], "size", "int8") is own
    assert choose([own, alt], "accuracy", "int8") is alt  # lower quality loss
    fp16 = _built("arm64", precision="fp16", p50=0.5)
    assert choose([fp16, alt], "precision", "int8") is alt  # the requested precision before speed
    failing = _built("arm64-executorch", status="fail", p50=0.1)
    assert choose([own, failing], "latency", "int8") is own  # within budget beats faster
    assert choose([_built("arm64", status="fail"), _built("x", status="fail", p50=0.1)], "latency", "int8").profile.name == "arm64"
    twin = _built("arm64-executorch", p50=2.0, size=900)
    assert choose([own, twin], "precision", "int8") is own  # a tie: the profile's own


def _edgebuild(*args, env=None, timeout=900):
    import os

    return subprocess.run([sys.executable, "-m", "edgebuild.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_a_pytorch_model_the_tflite_way_cannot_convert_ships_the_executorch_pte(tmp_path):
    pytest.importorskip("executorch")
    out = tmp_path / "out"
    r = _edgebuild("--target", "arm64", "--no-auto", "--calib-samples", "32", "--no-cache", "-o", str(out), env={"EDGEBUILD_FAULT": "crash:convert:tflite"})
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.loads((out / "manifest.json").read_text())["targets"]["arm64"]
    assert t["backend"] == "executorch" and t["artifact"].endswith(".pte") and (out / "arm64" / t["artifact"]).is_file()
    alt = t["alternatives"]
    assert alt["mode"] == "fallback" and alt["shipped"] == "arm64-executorch" and alt["backend"] == "executorch"
    own, et = alt["candidates"]
    assert own["profile"] == "arm64" and own["verdict"] == "error" and "SIGSEGV" in own["error"]
    assert et["profile"] == "arm64-executorch" and et["verdict"] == "pass" and et["artifact"] == t["artifact"]
    assert "arm64 (tflite) failed" in alt["why"] and "ships instead" in alt["why"]
    assert any(n.startswith("alternatives: ") for n in t["notes"])
    assert not list((out / "arm64").glob("*.tflite"))
    assert json.loads((out / "arm64" / "validation.json").read_text())["alternatives"]["shipped"] == "arm64-executorch"
    # the target's profile is the one whose artifact shipped; the requested one is in the record
    assert t["profile"]["name"] == "arm64-executorch" and t["profile"]["backend"] == "executorch"
    assert alt["requested"] == "arm64" and t["profile"]["precision"] == "int8"
    report = (out / "report.md").read_text()
    assert "Shipped by profile **arm64-executorch** (executorch), an alternative of arm64 (fallback)" in report
    # the shipped .pte is validated again by the ExecuTorch runtime (`edgebuild validate`, not emulated)
    v = _edgebuild("validate", str(out / "arm64"), "--json", timeout=600)
    assert v.returncode == 0, v.stderr[-3000:]
    record = json.loads(v.stdout)
    assert record["verdict"] == "pass" and record["metrics"]["top1_agreement"] >= 99, record


@pytest.mark.slow
def test_an_onnx_model_has_no_executorch_way_and_fails_with_both_reasons(tmp_path, demo_onnx):
    out = tmp_path / "out"
    r = _edgebuild("--target", "arm64", "--model", str(demo_onnx), "--calib", "digits:train", "--eval", "digits:test",
                   "--no-auto", "--no-cache", "-o", str(out), env={"EDGEBUILD_FAULT": "crash:convert:tflite"})
    assert r.returncode == 3, r.stderr[-3000:]
    error = json.loads((out / "manifest.json").read_text())["targets"]["arm64"]["error"]
    assert "SIGSEGV" in error and "alternative arm64-executorch skipped" in error and "takes PyTorch models" in error


@pytest.mark.slow
def test_arm64_best_builds_both_ways_and_ships_the_better(tmp_path):
    pytest.importorskip("executorch")
    out = tmp_path / "out"
    r = _edgebuild("--target", "arm64-best", "--no-auto", "--calib-samples", "32", "--no-cache", "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.loads((out / "manifest.json").read_text())["targets"]["arm64-best"]
    alt = t["alternatives"]
    by = {c["profile"]: c for c in alt["candidates"]}
    assert set(by) == {"arm64-best", "arm64-executorch"} and alt["mode"] == "compete"
    assert by["arm64-best"]["artifact"].endswith(".tflite") and by["arm64-executorch"]["artifact"].endswith(".pte")
    passing = [c for c in alt["candidates"] if c["verdict"] == "pass"]
    assert passing, alt
    # objective precision: the requested precision reached, then the lower p50 on this host; ties to the profile
    want = min(passing, key=lambda c: (c["precision"] != "int8", c["latency_p50_ms"], c["profile"] != "arm64-best"))
    assert alt["shipped"] == want["profile"] and t["artifact"] == want["artifact"]
    assert sorted(p.name for p in (out / "arm64-best").iterdir() if p.suffix in (".pte", ".tflite")) == [t["artifact"]]
    assert "objective precision" in alt["why"] and f"{want['profile']} (" in alt["why"]
    assert t["profile"]["name"] == alt["shipped"] and alt["requested"] == "arm64-best"
    assert t["profile"]["alternatives"] == ([] if alt["shipped"] != "arm64-best" else ["arm64-executorch"])


@pytest.mark.slow
def test_a_model_onnx2tf_has_no_op_for_gets_its_arm64_artifact_through_executorch(tmp_path):
    """A real dead end, no fault injected: torch.fft.rfft exports to ONNX DFT (ONNX Runtime runs it, the reference),
    which onnx2tf does not implement; ExecuTorch runs the same program. FP32, so the check is the way, not INT8."""
    pytest.importorskip("executorch")
    import numpy as np
    import torch
    from torch import nn

    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(65, 32), nn.ReLU(), nn.Linear(32, 8))

        def forward(self, x):
            spec = torch.view_as_real(torch.fft.rfft(x, dim=-1))
            return self.head(torch.log1p((spec * spec).sum(-1)))

    torch.manual_seed(0)
    program = tmp_path / "spectral.pt2"
    torch.export.save(torch.export.export(Spectral().eval(), (torch.randn(1, 128),), strict=False), str(program))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((96, 128)).astype(np.float32))
    out = tmp_path / "out"
    r = _edgebuild("--target", "arm64", "--model", str(program), "--calib", str(tmp_path / "data.npz"),
                   "--precision", "fp32", "--no-cache", "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.loads((out / "manifest.json").read_text())["targets"]["arm64"]
    assert t["backend"] == "executorch" and t["artifact"] == "model_fp32.pte" and t["metrics"]["cosine_min"] > 0.999
    own = t["alternatives"]["candidates"][0]
    assert own["verdict"] == "error" and "DFT" in own["error"], own
