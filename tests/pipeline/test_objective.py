"""`objective: latency | size | accuracy` (pipeline/stages/objective.py): what ships among the target's artifact and its FP32
baseline. Timing is injected through timing.latency_interleaved (the seam the build times with), so "INT8 is slower
than FP32" is deterministic, not a property of this machine."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from edgebuild.pipeline import timing
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import BuildSpec
from edgebuild.pipeline.stages import objective as O
from edgebuild.targets.profiles import catalogue


def fake_timing(chosen_ms: float, fp32_ms: float):
    """latency_interleaved as the build calls it, with fixed p50s per role ("chosen", "fp32")."""
    ms = {"chosen": chosen_ms, "fp32": fp32_ms}

    def latency_interleaved(runners, feed, rounds=timing.ROUNDS, round_s=timing.ROUND_S, more=None, max_rounds=None):
        lat = {n: {"p50_ms": ms[n], "p90_ms": ms[n], "p99_ms": ms[n], "runs": rounds, "warmup": 0, "rounds": rounds,
                   "runs_per_round": 1, "interleaved_with": [o for o in runners if o != n], "threads_used": 1}
               for n in runners}
        return lat, {n: [ms[n]] * rounds for n in runners}

    return latency_interleaved


def build_with(tmp_path, monkeypatch, objective, chosen_ms, fp32_ms):
    from edgebuild.pipeline.build import build

    monkeypatch.setattr(timing, "latency_interleaved", fake_timing(chosen_ms, fp32_ms))
    spec = BuildSpec(targets=("onnx-cpu",), out=str(tmp_path / "out"), auto=False, objective=objective, cache=False)
    result = build(spec)
    return result.manifest, tmp_path / "out" / "onnx-cpu"


@pytest.mark.slow
def test_latency_objective_ships_the_fp32_baseline_when_int8_is_slower(tmp_path, monkeypatch):
    from edgebuild.pipeline.report import slower_than_fp32

    manifest, outdir = build_with(tmp_path, monkeypatch, "latency", chosen_ms=2.0, fp32_ms=1.0)
    t = manifest["targets"]["onnx-cpu"]
    assert t["verdict"] == "pass" and t["precision"] == "fp32" and t["artifact"] == "model_fp32.onnx"
    assert sorted(p.name for p in outdir.glob("*.onnx")) == ["model_fp32.onnx"]  # no INT8 file left behind
    v = json.loads((outdir / "validation.json").read_text())
    assert v["objective"]["shipped"] == "model_fp32.onnx" and "slower than the FP32 baseline" in v["objective"]["why"]
    assert any("0.50× speed" in w for w in v["objective"]["warnings"])
    assert {c["precision"] for c in v["objective"]["candidates"]} == {"int8", "fp32"}
    assert json.loads((outdir / "metadata.json").read_text())["artifact"] == "model_fp32.onnx"
    assert any("objective latency: shipped model_fp32.onnx" in w for w in slower_than_fp32(manifest))


@pytest.mark.slow
def test_default_objective_never_ships_an_artifact_slower_than_fp32_on_a_host_is_device_target(tmp_path, monkeypatch):
    from edgebuild.pipeline.report import slower_than_fp32

    manifest, outdir = build_with(tmp_path, monkeypatch, None, chosen_ms=2.0, fp32_ms=1.0)
    t = manifest["targets"]["onnx-cpu"]
    assert t["artifact"] == "model_fp32.onnx" and t["objective"]["objective"] == "precision"
    assert t["objective"]["shipped"] == "model_fp32.onnx" and "slower than the FP32 baseline" in t["objective"]["why"]
    assert any("slower than the FP32 baseline" in w for w in t["objective"]["warnings"])
    assert any("shipped model_fp32.onnx" in w for w in slower_than_fp32(manifest))


@pytest.mark.slow
def test_size_objective_ships_the_smaller_slower_int8_and_says_it_is_slower(tmp_path, monkeypatch):
    from edgebuild.pipeline.report import slower_than_fp32

    manifest, outdir = build_with(tmp_path, monkeypatch, "size", chosen_ms=2.0, fp32_ms=1.0)
    t = manifest["targets"]["onnx-cpu"]
    assert t["artifact"] == "model_int8_qdq.onnx" and t["objective"]["objective"] == "size"
    assert t["objective"]["warnings"] and "slower than the FP32 baseline" in t["objective"]["warnings"][0]
    assert any("INT8 artifact is slower than FP32" in w for w in slower_than_fp32(manifest))


@dataclass
class FakeArtifact:
    main: str
    precision: str
    size_bytes: int


@dataclass
class FakeAttempt:
    artifact: FakeArtifact
    loss: float
    quality_ok: bool = True
    p50_ms: float | None = None


INT8 = FakeAttempt(FakeArtifact("model_int8.onnx", "int8", 100), loss=-0.2)
FP32 = FakeAttempt(FakeArtifact("model_fp32.onnx", "fp32", 400), loss=-0.5)


def speed(median):
    return {"median": median, "rounds": 12, "iqr": 0.04, "p75": median + 0.02}


@pytest.mark.parametrize("objective, int8_speed, int8_ok, shipped", [
    ("latency", 0.6, True, "model_fp32.onnx"),  # slower: never shipped for latency
    ("latency", 1.0, True, "model_int8.onnx"),  # a tie goes to the target's own artifact
    ("latency", 1.7, True, "model_int8.onnx"),
    ("latency", 1.7, False, "model_fp32.onnx"),  # outside the accuracy budget
    ("size", 0.6, True, "model_int8.onnx"),
    ("size", 1.7, False, "model_fp32.onnx"),
    ("accuracy", 1.7, True, "model_fp32.onnx"),
    ("precision", 0.6, True, "model_fp32.onnx"),  # default: never slower than FP32 where the host is the device
    ("precision", 0.99, True, "model_int8.onnx"),  # within the timing's noise (p75 >= 1): not slower
    ("precision", 1.7, True, "model_int8.onnx"),
])
def test_pick(objective, int8_speed, int8_ok, shipped):
    int8 = FakeAttempt(INT8.artifact, INT8.loss, int8_ok)
    best, record = O.pick(objective, catalogue()["onnx-cpu"], int8, FP32, speed(int8_speed))
    assert best.artifact.main == shipped == record.shipped
    assert bool(record.warnings) == (int8_speed < 1.0)


def test_default_objective_ships_the_slower_artifact_where_the_host_is_not_the_device():
    best, record = O.pick("precision", catalogue()["arm64"], INT8, FP32, speed(0.6))
    assert best is INT8 and record.warnings


def test_latency_objective_without_a_measured_speedup_keeps_the_target_artifact():
    """No speed-up measured (nothing timed): nothing shows INT8 slower, so it ships, and the record says why."""
    best, record = O.pick("latency", catalogue()["onnx-cpu"], INT8, FP32, None)
    assert best is INT8 and "no speed-up measured" in record.why and not record.warnings


def test_latency_objective_is_not_applied_where_the_host_is_not_the_device():
    arm64 = catalogue()["arm64"]
    assert arm64.host_is_device is False
    best, record = O.pick("latency", arm64, INT8, FP32, speed(0.6))
    assert best is INT8 and "not applied" in record.why and record.warnings


def test_bad_objective_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="objective must be one of"):
        BuildSpec(objective="fastest")
    p = tmp_path / "p.yaml"
    p.write_text("name: mine\nbackend: onnx\ndescription: x\nobjective: speed\n")
    from edgebuild.targets.profiles import load_profile

    with pytest.raises(BadInputError, match="objective must be one of"):
        load_profile(p)


def test_objective_flag_sets_every_targets_objective_and_a_bad_one_exits_2(tmp_path, monkeypatch, capsys):
    """`--objective size` is the config's `objective: size` (and wins over it); an unknown value is exit 2."""
    from edgebuild.pipeline.cli import main
    from edgebuild.pipeline.flags import spec_from_flags

    monkeypatch.chdir(tmp_path)
    (tmp_path / "edgebuild.yaml").write_text("objective: accuracy\n")
    seen = {}
    monkeypatch.setattr("edgebuild.pipeline.cli.spec_from_flags",
                        lambda config, **flags: seen.setdefault("spec", spec_from_flags(config, **flags)))
    monkeypatch.setattr("edgebuild.pipeline.build.build", lambda spec, **kw: (_ for _ in ()).throw(SystemExit(0)))
    try:
        main(["--target", "onnx-cpu", "--objective", "size"])
    except SystemExit:
        pass
    assert seen["spec"][0].objective == "size"
    assert main(["--target", "onnx-cpu", "--objective", "fastest"]) == 2
    assert "fastest" in capsys.readouterr().err
