"""The accuracy search within its time limits (issue 15): no try starts that cannot end before the search's own
limit, the float fallback may pass that limit but never the whole build's (``build_max_seconds``), and a collapse
that no few layers explain goes to FP16 before mixed precision. The layer sensitivity's work is bounded."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from edgebuild.pipeline.cli import main
from edgebuild.pipeline.results import SearchRecord, SearchTry
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.pipeline.stages import held_out as H, search as R
from edgebuild.pipeline.stages.search_state import Search
from edgebuild.pipeline.stages.sensitivity import LAYER_SAMPLE_BUDGET, MIN_EVAL_SAMPLES, Sensitivity, samples_per_layer

OUTLIER = ["--model", "tests.outlier_model:outlier_demo", "--input-shape", "1,1,8,8",
           "--calib", "digits:train", "--eval", "digits:test", "--target", "onnx-cpu"]


def build(tmp_path, config: str):
    cfg = tmp_path / "edgebuild.yaml"
    cfg.write_text(config)
    out = tmp_path / "out"
    code = main([*OUTLIER, "--config", str(cfg), "--out", str(out)])
    return code, json.loads((out / "manifest.json").read_text())["targets"]["onnx-cpu"]


@pytest.mark.slow
def test_no_int8_try_starts_past_the_search_limit_but_fp16_still_comes(tmp_path):
    # objective size: FP16 ships because it is the float fallback, not because it is faster on this host (FP16 on a
    # CPU without FP16 arithmetic may time slower than FP32, and then the default objective ships FP32)
    code, t = build(tmp_path, "auto_max_seconds: 0.001\nobjective: size\n")
    labels = [x["label"] for x in t["search"]["tries"]]
    assert labels == ["profile settings", "FP16 (no INT8)"], labels
    assert code == 0 and t["precision"] == "fp16"


@pytest.mark.slow
def test_the_whole_build_limit_stops_even_the_float_fallback(tmp_path):
    code, t = build(tmp_path, "build_max_seconds: 0.001\n")
    assert [x["label"] for x in t["search"]["tries"]] == ["profile settings"]
    assert code == 1 and t["verdict"] == "fail" and t["precision"] == "int8"
    assert "no configuration met the budget" in t["search"]["result"]


def _search(sensitivity: dict, losses: list[float], seconds_left: float = 100.0, durations=()):
    ctx = BuildContext(SimpleNamespace(spec=SimpleNamespace(auto_max_tries=12)), SimpleNamespace(deadline=float("inf")))
    s = Search.__new__(Search)
    s.ctx, s.record, s.reserve, s.sensitivity = ctx, SearchRecord(tries=[SearchTry()]), 1, Sensitivity(sensitivity, 0.0)
    s.tries = [SimpleNamespace(loss=v) for v in losses]
    s.deadline, s.durations = time.monotonic() + seconds_left, list(durations)
    return ctx, s


def test_a_collapse_spread_over_the_graph_goes_to_fp16_first():
    backend = SimpleNamespace(supports_float_layers=True)
    profile = SimpleNamespace(allow_float_layers=True, precisions=("int8", "fp16"))
    spread = {f"/layer{i}/MatMul": 0.4 for i in range(24)}  # 24 layers, each a little: 4 of them explain 1.6 of 38
    ctx, s = _search(spread, [38.0])
    assert R._diffuse(ctx, backend, profile, s) and "spread over the graph" in s.record.collapse_spread
    local = {"/features.3/Conv": 150.0, **{f"/l{i}/Conv": 0.1 for i in range(8)}}  # one outlier layer explains it
    ctx, s = _search(local, [170.0])
    assert not R._diffuse(ctx, backend, profile, s) and "concentrated" in s.record.collapse_spread
    ctx, s = _search(spread, [38.0])  # a profile without FP16 cannot take the float route
    assert not R._diffuse(ctx, backend, SimpleNamespace(allow_float_layers=True, precisions=("int8",)), s)


def test_a_search_short_of_time_knows_it_from_its_slowest_try():
    _, s = _search({}, [5.0], seconds_left=100.0, durations=[30.0, 45.0])
    assert s.short_of_time(3) and not s.short_of_time(2)
    _, s = _search({}, [5.0], seconds_left=100.0)
    assert not s.short_of_time(100)  # nothing measured yet: no guess
    _, s = _search({}, [5.0], seconds_left=10.0, durations=[30.0])
    assert not s.room() and s.room(fallback=True)  # the reserved fallback may pass the search's own limit


def test_sensitivity_work_is_bounded_not_layers_times_samples():
    assert samples_per_layer(4) == 96  # small graphs keep every selection sample (up to 96)
    for layers in (16, 64, 200, 1000):
        n = samples_per_layer(layers)
        assert n >= MIN_EVAL_SAMPLES and (layers * n <= LAYER_SAMPLE_BUDGET or n == MIN_EVAL_SAMPLES)


def test_an_int8_choice_that_misses_on_held_out_data_gives_way_to_fp16(monkeypatch):
    """ocr-cls on arm64: INT8 with one layer in float agreed fully on the selection part, missed by 2.5 pt on the
    held-out part, and FP16 was never tried. Now FP16 is tried and ships when it meets the budget."""
    art = lambda p: SimpleNamespace(precision=p)  # noqa: E731
    best = SimpleNamespace(artifact=art("int8"), label="INT8 with 1 layer(s) in float", quality_ok=True)
    missed = SimpleNamespace(artifact=art("int8"), label=best.label, quality_ok=False, failures=["agreement 97.5 < 99.5"])
    fp16 = SimpleNamespace(artifact=art("fp16"), label="FP16", quality_ok=True)
    profile = SimpleNamespace(allow_float_layers=True, precisions=("int8", "fp16"))
    _, s = _search({}, [0.0])
    s.tries = [best]
    asked = []
    s.attempt = lambda label, precision, settings, fallback=False: asked.append((precision, fallback)) or fp16
    monkeypatch.setattr(H, "install", lambda ctx, backend, profile, budget, a, outdir, holdout:
                        SimpleNamespace(artifact=a.artifact, quality_ok=True, label=None))
    shipped = H.held_out_miss(None, None, profile, None, s, best, missed, None, None)
    assert asked == [("fp16", True)] and shipped.artifact.precision == "fp16" and shipped.label == "FP16"
    assert "not on the held-out part (agreement 97.5 < 99.5)" in s.record.held_out_miss
    asked.clear()  # integer-only profiles, or FP16 already tried and missed: the honest held-out failure stands
    assert H.held_out_miss(None, None, SimpleNamespace(allow_float_layers=False, precisions=("int8",)), None, s, best,
                            missed, None, None) is missed
    s.tries.append(SimpleNamespace(artifact=art("fp16"), label="FP16", quality_ok=False))
    assert H.held_out_miss(None, None, profile, None, s, best, missed, None, None) is missed and not asked


def test_a_float_choice_that_misses_on_held_out_data_gives_way_to_fp32(monkeypatch):
    """Basic Pitch on arm64: FP16 met the cosine budget on the selection part (0.9935), missed it on the held-out part
    (0.9886), and the build failed (exit 1) where FP32, which the profile allows, keeps the model. Now FP32 ships;
    likewise when the FP16 that replaced a held-out INT8 miss misses too."""
    art = lambda p: SimpleNamespace(precision=p)  # noqa: E731
    profile = SimpleNamespace(allow_float_layers=True, precisions=("int8", "fp16", "fp32"))
    _, s = _search({}, [0.0])
    asked = []
    s.attempt = lambda label, precision, settings, fallback=False: asked.append(precision) or SimpleNamespace(
        artifact=art(precision), label=label, quality_ok=True)
    monkeypatch.setattr(H, "install", lambda ctx, backend, profile, budget, a, outdir, holdout: SimpleNamespace(
        artifact=a.artifact, quality_ok=a.artifact.precision == "fp32", label=None, failures=["cosine 0.9886 < 0.99"]))
    fp16 = SimpleNamespace(artifact=art("fp16"), label="FP16 (no INT8)", quality_ok=True)
    missed = SimpleNamespace(artifact=art("fp16"), label=fp16.label, quality_ok=False, failures=["cosine 0.9886 < 0.99"])
    s.tries = [fp16]
    shipped = H.held_out_miss(None, None, profile, None, s, fp16, missed, None, None)
    assert asked == ["fp32"] and shipped.artifact.precision == "fp32" and "FP32 instead" in s.record.held_out_miss
    asked.clear()
    int8 = SimpleNamespace(artifact=art("int8"), label="profile settings", quality_ok=True)
    s.tries = [int8]
    shipped = H.held_out_miss(None, None, profile, None, s, int8, SimpleNamespace(
        artifact=art("int8"), label=int8.label, quality_ok=False, failures=["x"]), None, None)
    assert asked == ["fp16", "fp32"] and shipped.artifact.precision == "fp32"
    assert "FP16 missed it too" in s.record.held_out_miss
    asked.clear()  # a profile without FP16: FP32 straight after the INT8 candidates
    s.tries = [int8]
    shipped = H.held_out_miss(None, None, SimpleNamespace(allow_float_layers=True, precisions=("int8", "fp32")), None, s,
                              int8, SimpleNamespace(artifact=art("int8"), label=int8.label, quality_ok=False,
                                                    failures=["x"]), None, None)
    assert asked == ["fp32"] and shipped.artifact.precision == "fp32"
    asked.clear()  # a profile without FP32: the held-out miss stands (exit 1)
    no_fp32 = SimpleNamespace(allow_float_layers=True, precisions=("int8", "fp16"))
    s.tries = [fp16]
    assert H.held_out_miss(None, None, no_fp32, None, s, fp16, missed, None, None) is missed and not asked


def test_a_first_conversion_that_failed_late_is_the_first_estimate_of_a_try(monkeypatch):
    """MiniLM on arm64: the INT8 conversion crashed in LiteRT's load check after 303 s, and with 150 s left the search
    still started a 195 s mixed-precision try before FP16. The failed conversion's time is now the first estimate."""
    from edgebuild.pipeline.errors import ConversionError

    failed = ConversionError("arm64: TFLite int8: the converter crashed (SIGABRT) during XNNPACK load check")
    failed.seconds = 303.0
    ctx = BuildContext(SimpleNamespace(evalset=[0] * 80, spec=SimpleNamespace(seed=0, auto_max_seconds=150.0,
                                                                             auto_max_tries=12)),
                       SimpleNamespace(deadline=float("inf")))
    profile = SimpleNamespace(name="arm64", allow_float_layers=True, precisions=("int8", "fp16"))
    seen = {}
    monkeypatch.setattr(R, "_converts_at_all", lambda *a: None)
    monkeypatch.setattr(R, "split", lambda c: (([0] * 40, []), ([0] * 40, [])))
    monkeypatch.setattr(R, "selection_budget", lambda budget, n: (budget, None))
    monkeypatch.setattr(R, "_search", lambda c, b, p, search, collapsed:
                        seen.update(durations=list(search.durations), room=search.room(), fallback=search.room(True)))
    with pytest.raises(ConversionError):  # nothing was tried in this stand-in: the first error stands
        R.recover(ctx, SimpleNamespace(supports_float_layers=False), profile, None, None, None, first_error=failed)
    assert seen == {"durations": [303.0], "room": False, "fallback": True}


def test_a_costlier_try_does_not_make_plain_tries_look_longer(monkeypatch, tmp_path):
    """PP-OCRv4's detector on onnx-cpu: the AdaRound try took 123 s of the 150 s search and, counted whole, made every
    plain try (7 s) look too long to start. A try with ``extra_seconds`` is counted without them."""
    import contextlib

    from edgebuild.pipeline.stages import search_state as S

    clock = [1000.0]
    monkeypatch.setattr(S.time, "monotonic", lambda: clock[0])
    made = SimpleNamespace(artifact=SimpleNamespace(precision="int8"), restored=None)

    def convert(*a, **k):
        clock[0] += 7.0 + (113.0 if (a[-1] or {}).get("rounding") == "adaround" else 0.0)
        return made

    monkeypatch.setattr(S, "convert", convert)
    monkeypatch.setattr(S, "evaluate", lambda *a, **k: SimpleNamespace(summary=lambda: {"label": "x"}, loss=1.0))
    monkeypatch.setattr(S, "share_calibration", lambda *a: None)
    s = Search.__new__(Search)
    s.ctx = SimpleNamespace(job=SimpleNamespace(spec=SimpleNamespace(auto_max_tries=12), model=SimpleNamespace(onnx_path="m")),
                            work=SimpleNamespace(deadline=float("inf"), scratch=tmp_path,
                                                 stage=lambda what: contextlib.nullcontext()))
    s.profile, s.budget, s.select, s.reserve = SimpleNamespace(name="onnx-cpu"), None, None, 1
    s.record, s.tries, s.durations = SearchRecord(tries=[SearchTry()]), [], [7.0]
    s.deadline = clock[0] + 150.0
    s.backend = SimpleNamespace(extra_seconds=lambda settings, path: 110.0 if settings.get("rounding") == "adaround" else 0.0)
    assert s.attempt("AdaRound weight rounding", "int8", {"rounding": "adaround"}) is not None
    assert s.durations == [7.0, 10.0]  # 120 s taken, 110 s of them AdaRound's
    assert s.room()  # 30 s left: a plain try (at most 10 s) still starts
    assert S.plain_seconds(5.0, 110.0) == 0.0 and S.plain_seconds(7.0, 0.0) == 7.0
