"""Typed results (pipeline/results.py): every type round-trips exactly to the JSON edgebuild writes, and the one
verdict function decides targets and builds."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgebuild.pipeline.results import (Check, Failure, Manifest, Metrics, OutputMetrics, TargetResult, TaskScores, Threads,
                                        Verdict, compression_check, decide)

SIZE = Check("size_mb", 2.5, 1.0, kind="size", what="size", unit=" MB", fmt=".3f")
COSINE = Failure("logits.cosine", 0.8, 0.99, "min", what="cosine similarity", output="logits")
OUTPUT = {"kind": "class_scores", "max_abs_error": 0.1, "max_rel_error": 0.01, "cosine_mean": 0.99, "sqnr_db": 30.0,
          "cosine": 0.99, "sqnr_min_db": 30.0, "top1_agreement": 98.0, "top5_agreement": 100.0,
          "accuracy_reference": 97.0, "accuracy": 96.5, "accuracy_drop": 0.5, "top5_accuracy": 99.0,
          "groups": [{"axis": 1, "slices": "0:4", "count": 4, "cosine": 0.97, "judged": True}]}
METRICS = {"samples": 40, "finite": True, "outputs": {"logits": OUTPUT}, "cosine_min": 0.99, "cosine_mean": 0.99,
           "max_abs_error": float("inf"), "classifier": True, "top1_agreement": 98.0, "accuracy": 96.5,
           "accuracy_reference": 97.0, "accuracy_drop": 0.5,
           "task": {"name": "detection", "reference": {"mAP50": 0.5}, "artifact": {"mAP50": 0.45}},
           "warnings": ["w"], "a_future_key": {"x": 1}}
ENTRY = {"verdict": "fail", "backend": "onnx", "precision": "int8", "artifact": "m.onnx", "files": {"m.onnx": {}},
         "settings": {"per_channel": True}, "metrics": METRICS, "latency": {"p50_ms": 1.0}, "size_bytes": 2500000,
         "memory": {}, "ratios": None, "baseline_fp32": None, "failures": [str(SIZE)],
         "failed_checks": [SIZE.to_dict()], "notes": [], "budgets": {"max_size_mb": 1.0}, "host_validation": "x",
         "threads": {"profile": 4, "used": 2}, "cache": {"conversion": False}, "profile": {"name": "onnx-cpu"},
         "seconds": 1.5}
ERROR = {"verdict": "error", "backend": "tflite", "error": "arm64: converter crashed (SIGSEGV)", "failures": [],
         "profile": {"name": "arm64"}, "seconds": 0.5}


def _exact(read, write, d):
    """``write(read(d))`` is ``d``: the same keys in the same order, the same values (the file's text)."""
    assert json.dumps(write(read(copy.deepcopy(d)))) == json.dumps(d)


@pytest.mark.parametrize("cls, d", [(OutputMetrics, OUTPUT), (Metrics, METRICS), (TaskScores, METRICS["task"]),
                                    (Metrics, {}), (Metrics, {"samples": 3, "outputs": {}, "task": None})])
def test_metrics_round_trip(cls, d):
    _exact(cls.from_dict, cls.to_dict, d)


def test_metrics_are_typed_per_output():
    m = Metrics.from_dict(METRICS)
    o = m.outputs["logits"]
    assert isinstance(o, OutputMetrics) and o.kind == "class_scores" and o.accuracy_drop == 0.5
    assert o.get("max_rel_error") == 0.01 and o.get("cosine") == 0.99 and o.get("nothing") is None
    assert o.worst_group()["slices"] == "0:4"
    assert m.extra == {"a_future_key": {"x": 1}} and m.task.first() == ("mAP50", 0.45)
    assert m.headline() == ("accuracy_drop", 0.5)
    assert Metrics(top1_agreement=97.0).headline() == ("top1_disagreement", 3.0)
    assert Metrics.from_dict({"task": METRICS["task"], "cosine_min": 0.9}).headline() == ("mAP50", 0.45)
    assert Metrics(cosine_min=0.9).headline() == ("cosine_min", 0.9)


def test_a_check_is_one_line_and_round_trips():
    assert str(SIZE) == "size 2.500 MB > max 1.0 MB" and "\n" not in str(COSINE)
    assert str(COSINE) == "cosine similarity 0.8 < min 0.99"
    for c in (SIZE, COSINE):
        d = c.to_dict()
        assert Check.from_dict(d).to_dict() == d and str(Check.from_dict(d)) == str(c)
    assert COSINE.to_dict()["output"] == "logits" and "output" not in SIZE.to_dict()  # the README's keys stay
    assert not SIZE.ok and not COSINE.ok and Check("x", 1.0, 1.0).ok and not Check("x", math.nan, 1.0).ok


def test_the_verdict_is_decided_in_one_place():
    assert decide() == Verdict("pass") and decide().exit_code == 0 and decide().quality_ok
    fail = decide([SIZE])
    assert fail.status == "fail" and fail.exit_code == 1 and fail.quality_ok  # a size failure is not quality
    assert not decide([COSINE]).quality_ok
    err = decide(error="boom")
    assert err.status == "error" and err.exit_code == 3 and not err.quality_ok
    assert decide(parts=[decide(), fail]).status == "fail"
    assert decide([SIZE], parts=[decide(), err]).status == "error"  # an error beats any failure
    assert decide([COSINE], parts=[decide()]).status == "fail"  # the build's own failure (compression)
    for v in (decide(), fail, err):
        assert Verdict.from_dict(v.to_dict()) == v


@pytest.mark.parametrize("d", [ENTRY, ERROR, {**ENTRY, "verdict": "pass", "failures": [], "failed_checks": [],
                                               "ratios": {"size_vs_fp32": 0.3}, "search": {"tries": []},
                                               "objective": {"objective": "precision"}},
                               {**ERROR, "previous": {**ENTRY, "from_earlier_build": "2026-01-01"}}])
def test_target_results_round_trip(d):
    _exact(TargetResult.from_dict, TargetResult.to_dict, d)
    t = TargetResult.from_dict(d)
    assert t.verdict.status == d["verdict"] and isinstance(t.verdict, Verdict)


def test_a_target_result_writes_its_manifest_entry_and_its_validation_json():
    t = TargetResult(decide([SIZE]), backend="onnx", artifact="m.onnx", metrics=Metrics.from_dict(METRICS),
                     threads=Threads(4, 2), evaluation={"samples": 40})
    entry, validation = t.to_dict(), t.to_validation()
    assert entry["ratios"] is None and entry["baseline_fp32"] is None and "evaluation" not in entry
    assert "ratios" not in validation and validation["threads"] == 4 and validation["threads_used"] == 2
    assert entry["failed_checks"] == validation["failed_checks"] == [SIZE.to_dict()]
    _exact(TargetResult.from_validation, TargetResult.to_validation, validation)
    assert TargetResult.failed("tflite", "boom").to_dict() == {"verdict": "error", "backend": "tflite", "error": "boom",
                                                                "failures": []}


def _manifest(**targets) -> dict:
    return {"edgebuild": "0.1", "created": "2026-01-02T00:00:00+00:00", "verdict": "pass", "exit_code": 0,
            "seconds": 3.0, "spec": {}, "cwd": "/", "tools": {}, "model": {}, "data": {}, "judging": {},
            "targets": targets, "cache": {"reference_outputs": False}}


def test_the_build_verdict_counts_its_own_targets_and_the_compression_budget():
    ok = {**ENTRY, "verdict": "pass", "failures": [], "failed_checks": []}
    kept = {**ENTRY, "from_earlier_build": "2026-01-01"}  # failed in an earlier build, kept: not this build's
    m = _manifest(x86=ok, arm64=kept)
    _exact(Manifest.from_dict, Manifest.to_dict, {**m, "kept_from_earlier_build": ["arm64"]})
    assert Manifest.from_dict(m).verdict.status == "pass" and list(Manifest.from_dict(m).built) == ["x86"]
    record = {"summary": {"accuracy_drop": 2.5}, "budget": {"max_compression_drop": 1.0}}
    check = compression_check(record)
    assert not check.ok and str(check) == "compression accuracy drop 2.50 pt > max 1.0 pt"
    compressed = {**m, "verdict": "fail", "exit_code": 1, "compression": {**record, "failure": str(check)}}
    _exact(Manifest.from_dict, Manifest.to_dict, compressed)
    assert Manifest.from_dict(compressed).verdict.failures[0].metric == "compression_accuracy_drop"
    errored = {**compressed, "verdict": "error", "exit_code": 3, "targets": {"x86": ok, "arm64": ERROR}}
    _exact(Manifest.from_dict, Manifest.to_dict, errored)
    assert Manifest.of(errored).exit_code == 3 and Manifest.of(Manifest.of(errored)) is not None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real build whose target fails its size budget (so its manifest carries typed failed checks)."""
    import torch

    from edgebuild import build

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(64, 3))
    x = np.random.default_rng(0).normal(size=(48, 1, 4, 4)).astype(np.float32)
    return build(model=net, input_shape=(1, 1, 4, 4), calib=x, targets=["onnx-cpu"],
                 out=str(tmp_path_factory.mktemp("results") / "out"), auto=False, cache=False,
                 budgets={"cosine_min": 0.5, "max_size_mb": 1e-6})


def test_a_real_build_round_trips_exactly(built):
    text = (built.out / "manifest.json").read_text()
    manifest = Manifest.from_dict(json.loads(text))
    assert json.dumps(manifest.to_dict(), indent=2, default=str) == text
    assert manifest.verdict.status == "fail" and built.exit_code == 1 == json.loads(text)["exit_code"]
    t = manifest.targets["onnx-cpu"]
    assert isinstance(t.metrics, Metrics) and t.verdict.failures[0].metric == "size_mb"
    assert set(t.metrics.outputs) == {o["name"] for o in manifest.model["outputs"]}
    validation = (built.out / "onnx-cpu" / "validation.json").read_text()
    v = TargetResult.from_validation(json.loads(validation))
    assert json.dumps(v.to_validation(), indent=2, default=str) == validation
    assert v.verdict == t.verdict and v.metrics == t.metrics
    assert built.typed.to_dict() == built.manifest


def test_a_failed_build_raises_one_budget_error_naming_the_check(built):
    from edgebuild.pipeline.errors import BudgetError

    with pytest.raises(BudgetError, match=r"budget failed — onnx-cpu: size [0-9.]+ MB > max 1e-06 MB"):
        built.raise_for_verdict()


DATA = Path(__file__).parent / "data"


def test_the_demo_manifest_reads_as_typed_records_and_writes_back_byte_for_byte():
    """A real manifest.json (and validation.json) written by the demo build (`edgebuild --target
    onnx-cpu,x86,arm64`): every measurement of a target is a typed record, and writing it back gives the same
    bytes (keys, their order, values, absent and null keys)."""
    from edgebuild.pipeline.results import Baseline, FileRecord, Gate, Latency, Memory, Ratios, WeightShare
    from edgebuild.specs import Precision
    from edgebuild.targets.profiles import Budget

    text = (DATA / "demo_manifest.json").read_text()
    manifest = Manifest.from_dict(json.loads(text))
    assert json.dumps(manifest.to_dict(), indent=2, default=str) == text
    assert list(manifest.targets) == ["onnx-cpu", "x86", "arm64"]
    for name, t in manifest.targets.items():
        assert isinstance(t.latency, Latency) and t.latency.p50_ms > 0 and t.latency.threads_profile >= 1, name
        assert isinstance(t.memory, Memory) and t.memory.peak_mb > 0
        assert isinstance(t.ratios, Ratios) and 0 < t.ratios.size_vs_fp32 < 1 and t.ratios.speedup_vs_fp32_spread
        assert isinstance(t.baseline_fp32, Baseline) and t.baseline_fp32.artifact.startswith("model_fp32")
        assert isinstance(t.baseline_fp32.latency, Latency) and isinstance(t.baseline_fp32.metrics, Metrics)
        assert isinstance(t.baseline_fp32.memory, Memory)
        assert isinstance(t.gate, Gate) and t.gate.decided_by == "task metric"
        assert isinstance(t.quantized, WeightShare) and t.quantized.int8_weight_share == 1.0
        assert isinstance(t.budgets, Budget) and t.budgets.max_accuracy_drop is not None
        assert isinstance(t.threads, Threads) and t.threads.used >= 1
        assert all(isinstance(f, FileRecord) and len(f.sha256) == 64 for f in t.files.values())
        assert sum(f.bytes for f in t.files.values()) == t.size_bytes and t.precision == Precision.INT8
    validation = (DATA / "demo_arm64_validation.json").read_text()
    v = TargetResult.from_validation(json.loads(validation))
    assert json.dumps(v.to_validation(), indent=2, default=str) == validation
    assert v.latency == manifest.targets["arm64"].latency and v.threads == manifest.targets["arm64"].threads


def test_records_keep_what_this_version_does_not_know():
    """A newer build's keys inside a record, and a budget this version cannot read, survive a round trip."""
    entry = {**ENTRY, "latency": {"p50_ms": 1.0, "p95_ms": 2.0}, "budgets": {"max_accuracy_drop": 1.0, "max_joules": 3},
             "files": {"m.onnx": {"bytes": 3, "sha256": "0" * 64, "mtime": 1}}, "threads": {"profile": 4, "used": 2}}
    t = TargetResult.from_dict(entry)
    assert t.latency.extra == {"p95_ms": 2.0} and t.budgets == entry["budgets"] and t.files["m.onnx"].bytes == 3
    _exact(TargetResult.from_dict, TargetResult.to_dict, entry)
