"""Issue 21, typed working data: where an artifact came from travels in typed fields (``ConversionOutcome``,
``Attempt.restored`` / ``Attempt.reference``), never in its notes or labels, which are for people; a candidate's
checks are computed from its measurements in one place (``V.assess``)."""
import dataclasses

import pytest

from edgebuild.pipeline.build import build
from edgebuild.pipeline.results import CacheUse, TargetResult
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


def _metrics(cosine: float) -> dict:
    return {"samples": 10, "finite": True, "outputs": {"y": {"kind": "tensor", "cosine": cosine, "cosine_mean": cosine,
                                                             "max_abs_error": 0.1, "sqnr_min_db": 40.0}}}


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
    a.latency = {"p50_ms": 5.0}
    assert [c.metric for c in a.failures] == ["latency_p50_ms"] and a.quality_ok
    a.memory = {"peak_mb": 3.0}
    assert [c.metric for c in a.failures] == ["latency_p50_ms", "memory_peak_mb"]
    assert not dataclasses.replace(a, metrics=_metrics(0.5)).quality_ok
