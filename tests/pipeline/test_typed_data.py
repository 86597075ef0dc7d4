"""Issue 21, typed working data: where an artifact came from travels in typed fields (``ConversionOutcome``,
``Attempt.restored`` / ``Attempt.reference``), never in its notes or labels, which are for people; a candidate's
checks are computed from its measurements in one place (``V.assess``)."""
import dataclasses

import pytest

from edgebuild.pipeline.build import build
from edgebuild.pipeline.results import CacheUse, Latency, Metrics, TargetResult
from edgebuild.pipeline.spec import BuildSpec
from edgebuild.pipeline.stages import validate as V

MISLEADING = ["restored from the stage cache (sha256 verified)",
              "converted from the same onnx2tf/TensorFlow graph as the int8 model (one converter run for both)",
              "same conversion"]


@pytest.mark.slow
def test_notes_and_labels_that_read_like_cache_hits_change_nothing(tmp_path, monkeypatch):
    """A cold build whose artifacts carry notes worded like a cache restore or a sibling conversion, and whose FP32
    reference attempt is labelled otherwise, records what really happened: nothing came from the cache, and the
    baseline is the reference itself. (The old code read those words.)"""
    import edgebuild.pipeline.stages.per_target as PT
    import edgebuild.targets.onnx as onnx_backend

    convert = onnx_backend.OnnxBackend.convert

    def noted(self, *a, **k):
        art = convert(self, *a, **k)
        art.notes = [*art.notes, *MISLEADING]
        return art

    reference_attempt = PT.reference_attempt

    def relabelled(*a, **k):
        attempt = reference_attempt(*a, **k)
        if attempt is not None:
            attempt.label = "the FP32 baseline, relabelled"
        return attempt

    monkeypatch.setattr(onnx_backend.OnnxBackend, "convert", noted)
    monkeypatch.setattr(PT, "reference_attempt", relabelled)
    spec = BuildSpec(targets=("onnx-cpu",), out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    t = build(spec).manifest["targets"]["onnx-cpu"]
    assert all(n in t["notes"] for n in MISLEADING[:1])  # the notes are there, for people
    cache = {k: v for k, v in t["cache"].items() if k != "memory"}
    assert cache == {"search": False, "conversion": False, "validation": False, "baseline_conversion": False,
                     "baseline_validation": "the reference", "latency": False}
    assert isinstance(TargetResult.from_dict(t).cache, CacheUse)


def test_cache_use_round_trips_and_says_a_sibling_in_its_own_words():
    use = CacheUse(search=False, conversion=True, validation=False).with_baseline(False, "int8", False, True)
    assert use.baseline_conversion == "converted in the same conversion run as the int8 artifact"
    assert use.baseline_validation is True
    d = dataclasses.replace(use, latency=False, memory={"memory": True}).to_dict()
    assert list(d) == ["search", "conversion", "validation", "baseline_conversion", "baseline_validation", "latency",
                       "memory"]
    assert CacheUse.from_dict(d).to_dict() == d
    assert "search" not in CacheUse(conversion=False).to_dict()  # a target that did not search says nothing of it
    assert CacheUse().with_baseline(True, "int8", True, False).to_dict() == {
        "baseline_conversion": True, "baseline_validation": "the reference"}


def _metrics(cosine: float) -> Metrics:
    return Metrics.from_dict({"samples": 10, "finite": True, "outputs": {"y": {
        "kind": "tensor", "cosine": cosine, "cosine_mean": cosine, "max_abs_error": 0.1, "sqnr_min_db": 40.0}}})


def test_one_assessment_judges_every_measurement_it_is_given():
    budget = V.Budget(None, 1.0, 0.5, None, max_memory_mb=2.0)
    quality_only = V.assess(_metrics(0.999), budget)
    assert quality_only.failures == [] and quality_only.loss <= 0
    full = V.assess(_metrics(0.5), budget, size_bytes=2_000_000, lat={"p50_ms": 3.0}, memory={"peak_mb": 9.0})
    assert [c.kind for c in full.failures] == ["quality", "latency", "size", "memory"]
    assert full.loss > 0 and full.loss == V.quality_loss(_metrics(0.5), budget)
    assert [str(c) for c in full.failures] == [str(c) for c in V.judge(_metrics(0.5), 2_000_000, {"p50_ms": 3.0},
                                                                       budget, memory={"peak_mb": 9.0})]


def test_an_attempts_failures_follow_its_measurements(tmp_path):
    """No stage rewrites a candidate's failures: adding a measurement (latency, memory) is what changes them."""
    from edgebuild.pipeline.stages.per_target import Attempt
    from edgebuild.targets.base import Artifact

    (tmp_path / "m.onnx").write_bytes(b"x" * 1000)
    art = Artifact("t", "onnx", "int8", tmp_path, "m.onnx", ["m.onnx"])
    a = Attempt(art, _metrics(0.999), V.Budget(None, 1.0, None, None, max_memory_mb=2.0))
    assert a.failures == [] and a.quality_ok
    a.latency = Latency(p50_ms=5.0)
    assert [c.metric for c in a.failures] == ["latency_p50_ms"] and a.quality_ok
    a.memory = {"peak_mb": 3.0}
    assert [c.metric for c in a.failures] == ["latency_p50_ms", "memory_peak_mb"]
    assert not dataclasses.replace(a, metrics=_metrics(0.5)).quality_ok


def test_compare_returns_typed_metrics_that_write_the_json_keys_in_measured_order():
    import numpy as np

    rng = np.random.default_rng(0)
    ref = [[rng.normal(size=(1, 10)).astype(np.float32)] for _ in range(20)]
    labels = np.array([int(np.argmax(r[0])) for r in ref])
    m = V.compare(ref, ref, labels)
    assert isinstance(m, Metrics) and isinstance(m.outputs["output_0"].cosine, float)
    assert m.accuracy_drop == 0.0 and m.headline() == ("accuracy_drop", 0.0)
    d = m.to_dict()
    assert list(d)[:3] == ["samples", "finite", "outputs"] and Metrics.from_dict(d) == m
    assert V.assess(m, V.Budget(0.5)).failures == []


TYPED_MODULES = ("search", "search_state", "mixed_precision", "islands", "per_target", "convert", "objective",
                 "weights", "validate", "package")


def precision_literals(source: str) -> list[int]:
    """Lines where a precision is a plain string where the code decides or asks for something: compared, tested for
    membership, or passed to a call ("int8" as a dict key naming a role, or inside a message, is not one)."""
    import ast

    from edgebuild.specs import PRECISIONS

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Call):
            operands = [*node.args, *(k.value for k in node.keywords)]
        else:
            continue
        for o in operands:
            items = o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o]
            lines += [node.lineno for i in items if isinstance(i, ast.Constant) and i.value in PRECISIONS]
    return lines


def test_no_precision_string_creeps_back_into_the_stages():
    from pathlib import Path

    import edgebuild.pipeline.stages as stages

    assert precision_literals('if p == "int8" or p in ("fp16", "x"):\n    f(p, "fp32")\n') == [1, 1, 2]
    assert precision_literals('d = {"fp32": 1}\nf"{p} int8"\n') == []
    folder = Path(stages.__file__).parent
    found = {m: precision_literals((folder / f"{m}.py").read_text()) for m in TYPED_MODULES}
    assert not any(found.values()), f"use edgebuild.specs.Precision, not a plain string: {found}"


def test_precision_is_typed_from_the_profile_to_the_target_and_written_as_before():
    from edgebuild.pipeline.stages.per_target import precision_for
    from edgebuild.specs import Precision
    from edgebuild.targets.profiles import catalogue

    arm64 = catalogue()["arm64"]
    assert arm64.precision is Precision.INT8 and all(isinstance(p, Precision) for p in arm64.precisions)
    assert precision_for(arm64, BuildSpec()) is Precision.INT8
    assert precision_for(arm64, BuildSpec(precision="fp16")) is Precision.FP16
    assert BuildSpec(precision="fp16").to_dict()["precision"] == "fp16"
    import json

    assert json.loads(json.dumps(arm64.to_dict()))["precisions"][0] in ("int8", "fp16", "fp32", "dynamic")


def test_validate_emulate_judges_its_host_agreement_in_the_one_judge(tmp_path, monkeypatch):
    """`validate --emulate`: the emulated outputs' agreement with the host's is a check of ``V.assess`` like every
    other (no failure is appended outside the judge), so the verdict, the failed checks and the ranking agree."""
    from types import SimpleNamespace

    import numpy as np

    from edgebuild.pipeline import emulate, revalidate

    seen = []
    real = V.assess
    monkeypatch.setattr(V, "assess", lambda *a, **k: seen.append(a) or real(*a, **k))
    rng = np.random.default_rng(0)
    ref = [[rng.normal(size=(1, 10)).astype(np.float32)] for _ in range(20)]
    loaded = SimpleNamespace(reference=ref, evalset=SimpleNamespace(labels=None, describe=lambda: {"samples": 20}),
                             judging=V.Judging(), artifact=SimpleNamespace(size_bytes=100, directory=tmp_path),
                             budget=V.Budget(max_accuracy_drop=1.0), meta={"target": "arm64"}, reference_source="saved")
    bad = {"top1_agreement": 90.0, "cosine_min": 0.9999, "max_abs_error_relative": 0.001}
    r = revalidate.judged(loaded, ref, None, vs_host=bad, emulation={"vs_host": bad})
    assert r["verdict"] == "fail" and [c["metric"] for c in r["failed_checks"]] == ["emulated_vs_host_top1_agreement"]
    assert r["failures"] == ["emulated vs host top1_agreement 90 < min 99.5"] and r["emulation"] == {"vs_host": bad}
    assert seen and seen[-1][-1] == bad  # through the judge
    assert revalidate.judged(loaded, ref, None, vs_host={**bad, "top1_agreement": 100.0})["verdict"] == "pass"
    assessment = real(Metrics(), V.Budget(), vs_host=bad)
    assert [c.metric for c in assessment.checks] == [f"emulated_vs_host_{k}" for k, _, _ in V.HOST_AGREEMENT]
    assert [str(c) for c in emulate.host_failures(bad)] == r["failures"] and emulate.HOST_AGREEMENT is V.HOST_AGREEMENT
