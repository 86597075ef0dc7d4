"""AdaRound (targets/onnx_adaround.py): learned weight rounding that lands on onnxruntime's INT8 grid exactly and
reduces the layer output error against nearest rounding on held-out samples."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgebuild.calibration.dataset import SampleSet  # noqa: E402
from edgebuild.targets.onnx_adaround import adaround, grid, weighted_layers  # noqa: E402


def _cnn(path, seed=0, matmul=False):
    """Conv(3->8, 3x3) -> Relu -> depthwise Conv(8, 3x3, stride 2, asymmetric pads) -> Relu -> global average pool
    -> Gemm(8->4), the shape of a small classifier.
    Weights with a few large values per channel (a wide grid), so nearest rounding costs measurable output error."""
    rng = np.random.default_rng(seed)

    def heavy(*shape):
        w = rng.normal(0, 0.05, shape).astype(np.float32)
        flat = w.reshape(shape[0], -1)
        flat[:, 0] = rng.choice([-1, 1], shape[0]) * rng.uniform(0.8, 1.2, shape[0])  # one outlier per channel
        return flat.reshape(shape)

    w1, b1 = heavy(8, 3, 3, 3), rng.normal(0, 0.1, 8).astype(np.float32)
    w2 = heavy(8, 1, 3, 3)
    w3, b3 = heavy(4, 8), np.zeros(4, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="dw", group=8, strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    if matmul:  # the classifier as MatMul (B: [in, out]) + Add, as PaddlePaddle exports it
        w3 = np.ascontiguousarray(w3.T)
        nodes[-1:] = [helper.make_node("MatMul", ["f", "w3"], ["mm"], name="fc"),
                      helper.make_node("Add", ["mm", "b3"], ["y"], name="fc_add")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(a, n) for a, n in
                               ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"), (b3, "b3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _samples(n, seed):
    """Image-like inputs: smooth in space and correlated across channels (where rounding errors add up)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (n, 1, 14, 14))
    smooth = (base[..., :-2, :-2] + base[..., 1:-1, 1:-1] + base[..., 2:, 2:] + base[..., 1:-1, :-2]) / 2
    return SampleSet("s", {"x": (smooth + 0.2 * rng.normal(0, 1, (n, 3, 12, 12))).astype(np.float32)})


def _quantized_weights(path, tmp, per_channel):
    """onnxruntime's own INT8 weights (name -> int8 array) after quantize_static on ``path``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from edgebuild.calibration.adapters import ort_reader

    out = tmp / f"q_{path.stem}_{per_channel}.onnx"
    quantize_static(str(path), str(out), ort_reader(_samples(4, 9)), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                    extra_options={"WeightSymmetric": True, "QuantizeBias": True})
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    return {n: inits[n + "_quantized"] for n in ("w1", "w2", "w3")}


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("per_channel,matmul", [(True, False), (False, False), (True, True)])
def test_adjusted_weights_sit_on_onnxruntimes_int8_grid(tmp_path, per_channel, matmul):
    src = _cnn(tmp_path / "m.onnx", matmul=matmul)
    out = tmp_path / "ada.onnx"
    record = adaround(src, out, _samples(16, 1), tmp_path, per_channel=per_channel, iterations=60)
    assert record["layers"] == 3 and record["of"] == 3
    before, after = _weights(src), _weights(out)
    q = _quantized_weights(out, tmp_path, per_channel)
    for name, axis in (("w1", 0), ("w2", 0), ("w3", 1 if matmul else 0)):
        axis = axis if per_channel else None
        scale = grid(before[name], axis, 127)
        np.testing.assert_array_equal(grid(after[name], axis, 127), scale)  # the scale did not move
        k = np.round(after[name] / scale)
        np.testing.assert_allclose(after[name], k * scale, rtol=0, atol=1e-7)  # on the grid
        np.testing.assert_array_equal(q[name], k.astype(np.int8))  # and onnxruntime stores exactly those integers
        # every weight moved by less than one grid step (rounded up or down, nothing else)
        assert np.all(np.abs(after[name] - before[name]) < scale * (1 + 1e-5))
    assert any(not np.array_equal(_quantized_weights(src, tmp_path, per_channel)[n], q[n]) for n in q)


def test_adaround_reduces_held_out_output_error(tmp_path):
    """Weights-only INT8 (activations float) of nearest vs learned rounding, on samples AdaRound never saw."""
    import onnxruntime as ort

    src = _cnn(tmp_path / "m.onnx", seed=3)
    out = tmp_path / "ada.onnx"
    adaround(src, out, _samples(64, 1), tmp_path, iterations=300)
    nearest = tmp_path / "nearest.onnx"
    model = onnx.load(str(src))
    for t in model.graph.initializer:
        if t.name in ("w1", "w2", "w3"):
            w = numpy_helper.to_array(t)
            s = grid(w, 0, 127)
            t.CopyFrom(numpy_helper.from_array((np.clip(np.round(w / s), -127, 127) * s).astype(np.float32), t.name))
    onnx.save(model, str(nearest))
    held = _samples(64, 7)

    def outputs(p):
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, f)[0] for f in held.feeds()])

    ref = outputs(src)
    mse_nearest = float(np.mean((outputs(nearest) - ref) ** 2))
    mse_ada = float(np.mean((outputs(out) - ref) ** 2))
    assert mse_nearest > 0
    assert mse_ada < 0.8 * mse_nearest, (mse_ada, mse_nearest)


def test_shared_and_skipped_weights_are_left_alone(tmp_path):
    model = onnx.load(str(_cnn(tmp_path / "m.onnx")))
    assert [n.name for n in weighted_layers(model)] == ["conv1", "dw", "fc"]
    assert [n.name for n in weighted_layers(model, {"dw"})] == ["conv1", "fc"]
    model.graph.node[0].input[1] = "w2"  # conv1 now shares dw's weight: neither is adjusted
    assert [n.name for n in weighted_layers(model)] == ["fc"]


def test_the_onnx_backend_offers_and_builds_the_adaround_candidate(model, small_sets, tmp_path):
    """onnx-cpu's INT8 candidates end with AdaRound; its conversion says what it did and stores other integers."""
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue

    calib, _ = small_sets
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    label, settings = backend.recovery_candidates(profile, {})[-1]
    assert label.startswith("AdaRound") and settings.rounding == "adaround"
    assert backend.extra_seconds(settings, model.onnx_path) > 0 == backend.extra_seconds({}, model.onnx_path)
    plain = backend.convert(model, profile, "int8", calib, tmp_path / "plain", None)
    ada = backend.convert(model, profile, "int8", calib, tmp_path / "ada", settings)
    assert ada.settings["rounding"] == "adaround" and plain.settings["rounding"] == "nearest"  # in the manifest
    assert any("AdaRound weight rounding on" in n for n in ada.notes), ada.notes

    def ints(art):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(art.path)).graph.initializer
                if t.data_type == TensorProto.INT8}

    a, p = ints(ada), ints(plain)
    assert a.keys() == p.keys() and any(not np.array_equal(a[k], p[k]) for k in a)
    for k in a:  # rounded up or down: never more than one step from onnxruntime's nearest
        assert np.abs(a[k].astype(int) - p[k].astype(int)).max() <= 1


def test_the_search_skips_adaround_with_a_reason_when_it_does_not_fit():
    import time
    from types import SimpleNamespace

    from edgebuild.pipeline.results import SearchRecord, SearchTry
    from edgebuild.pipeline.stages.search_state import Search

    s = Search.__new__(Search)
    s.ctx = SimpleNamespace(job=SimpleNamespace(spec=SimpleNamespace(auto_max_tries=12), model=SimpleNamespace(onnx_path="m")),
                            work=SimpleNamespace(deadline=float("inf")))
    s.record, s.reserve, s.durations = SearchRecord(tries=[SearchTry()]), 1, [10.0]
    s.deadline = time.monotonic() + 60.0
    s.backend = SimpleNamespace(extra_seconds=lambda settings, path: 100.0)
    assert s.attempt("AdaRound weight rounding", "int8", {"rounding": "adaround"}) is None
    assert any("skipped: AdaRound" in t for t in s.record.time_limit), s.record.time_limit


def test_adaround_is_built_on_the_int8_variant_that_came_closest():
    from types import SimpleNamespace

    from edgebuild.pipeline.stages.search_state import Search
    from edgebuild.specs import Precision
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue

    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    variants = dict(backend.recovery_candidates(profile, {}))
    ada_label = next(k for k in variants if k.startswith("AdaRound"))
    s = Search.__new__(Search)
    s.backend, s.asked = backend, {"entropy calibration": variants["entropy calibration"],
                                   "U8U8 (unsigned weights)": variants.get("U8U8 (unsigned weights)")}

    def tried(label, loss):
        return SimpleNamespace(label=label, loss=loss, artifact=SimpleNamespace(precision=Precision.INT8))

    s.tries = [tried("profile settings", 3.6), tried("entropy calibration", 3.0)]
    label, settings = s.on_best(ada_label, variants[ada_label])
    assert label.endswith(", on entropy calibration")
    assert settings.rounding == "adaround" and settings.calibrate_method == "entropy"
    s.tries = [tried("profile settings", 2.0), tried("entropy calibration", 3.0)]  # the profile's came closest
    assert s.on_best(ada_label, variants[ada_label]) == (ada_label, variants[ada_label])
    if s.asked["U8U8 (unsigned weights)"] is not None:  # unsigned weights: no AdaRound on them, the plain candidate
        s.tries = [tried("profile settings", 3.6), tried("U8U8 (unsigned weights)", 1.0)]
        assert s.on_best(ada_label, variants[ada_label]) == (ada_label, variants[ada_label])


def test_a_layer_starts_only_when_one_as_long_as_the_longest_still_fits_the_limit(tmp_path, monkeypatch):
    """ddddocr's CTC recogniser: "at most 120 s" took the search 180 s past its limit; the limit was checked only
    before each layer, so the last layer started at 119 s. Each layer here takes 1 s against a 1.5 s limit: the
    second would end past it, so it does not start."""
    import time

    from edgebuild.targets import onnx_adaround as A

    real = A._round_layer

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "_round_layer", slow)
    record = adaround(_cnn(tmp_path / "m.onnx"), tmp_path / "ada.onnx", _samples(8, 1), tmp_path, iterations=5,
                      time_limit=1.5)
    assert record["layers"] == 1 and record["not_adjusted"] == 2, record
