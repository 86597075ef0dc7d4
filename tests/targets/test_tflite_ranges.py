"""INT8 activation ranges measured without buffer sharing (targets/tflite/ranges.py): TF's calibrator logs an
element-wise op's first input after the op wrote its output into that buffer, so ``x * 0.5`` in
``(x * 0.5) * relu6(x + 3)`` got the product's range, and channels with small activations turned to noise."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")

SCALES = np.array([4, 4, 4, 4, 0.05, 0.05, 0.1, 0.1], np.float32)  # channel magnitudes: some tiny (as in PP-LCNet)


def _model():
    rng = np.random.default_rng(0)
    inp = keras.Input((16, 16, 3), batch_size=1)
    conv = keras.layers.Conv2D(8, 3, padding="same")
    x = conv(inp)
    conv.set_weights([rng.normal(0, 1, (3, 3, 3, 8)).astype(np.float32) * SCALES / 3,
                      (rng.normal(0, 1, 8) * SCALES).astype(np.float32)])
    half = keras.layers.Lambda(lambda t: tf.math.multiply(t, 0.5), name="half")(x)
    gate = keras.layers.Lambda(lambda t: tf.nn.relu6(tf.math.add(t, 3.0)), name="gate")(x)
    y = keras.layers.Lambda(lambda ts: tf.math.multiply(ts[0], ts[1]), name="product")([half, gate])
    dw = keras.layers.DepthwiseConv2D(3, padding="same")
    out = dw(y)  # weights inverse to the channel scale (a folded batch norm): small channels matter downstream
    dw.set_weights([(rng.normal(0, 1, (3, 3, 8, 1)) / SCALES[None, None, :, None] / 3).astype(np.float32),
                    np.zeros(8, np.float32)])
    samples = [rng.normal(0, 1, (1, 16, 16, 3)).astype(np.float32) for _ in range(26)]
    return keras.Model(inp, out), keras.Model(inp, half), samples


def _converter(km, samples, calibrate_only=False):
    c = tf.lite.TFLiteConverter.from_keras_model(km)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = lambda: ({km.input_names[0]: x} for x in samples)
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    c._experimental_calibrate_only = calibrate_only
    return c


def test_calibrated_ranges_are_what_the_tensors_hold():
    from ai_edge_litert import schema_py_generated as schema

    from edgebuild.procs import patched
    from edgebuild.targets.tflite.ranges import exact_ranges

    km, half, samples = _model()
    record: list = []
    with patched([exact_ranges(record, {})]):
        calibrated = _converter(km, samples[:20], calibrate_only=True).convert()
    true = np.concatenate([half(x).numpy().ravel() for x in samples[:20]])
    graph = schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0).subgraphs[0]
    ranges = {t.name.decode(): (t.quantization.min[0], t.quantization.max[0]) for t in graph.tensors
              if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min)}
    (name, (lo, hi)), = [(n, r) for n, r in ranges.items() if "half" in n]
    assert lo == pytest.approx(true.min(), rel=1e-4) and hi == pytest.approx(true.max(), rel=1e-4), (name, lo, hi)
    assert all(r["measured"][1] - r["measured"][0] < r["logged"][1] - r["logged"][0] for r in record)
    from tensorflow.lite.python.optimize import calibrator
    assert calibrator.Calibrator.calibrate.__name__ == "calibrate" and "exact_ranges" not in \
        calibrator.Calibrator.calibrate.__qualname__  # the hook is gone after the block


def test_tf_logs_one_sample_and_every_range_is_measured_on_all():
    """On a one-graph model TF's logging calibrator (single-threaded builtin kernels: ~9 s a sample on TransNetV2)
    reads one sample; every activation's range is measured on all of them in LiteRT with XNNPACK (1.0 s a sample
    there), and equals what TF's whole calibration logs, except where buffer sharing widened TF's log."""
    from ai_edge_litert import schema_py_generated as schema

    from edgebuild.procs import patched
    from edgebuild.targets.tflite.ranges import exact_ranges

    km, _, samples = _model()

    def calibrated(patch: bool) -> tuple[dict, int]:
        read = []
        c = _converter(km, samples[:20], calibrate_only=True)
        c.representative_dataset = lambda: (read.append(1) or {km.input_names[0]: x} for x in samples[:20])
        if patch:
            with patched([exact_ranges([], {})]):
                model = c.convert()
        else:
            model = c.convert()
        graph = schema.ModelT.InitFromPackedBuf(bytearray(model), 0).subgraphs[0]
        return {t.name.decode(): (t.quantization.min[0], t.quantization.max[0]) for t in graph.tensors
                if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min)}, len(read)

    tf_ranges, tf_read = calibrated(False)
    ours, read = calibrated(True)
    assert tf_read == 20 and read == 1 + 20, (tf_read, read)  # one for TF's log, all for the measuring pass
    assert ours.keys() == tf_ranges.keys() and len(ours) >= 4
    for name, (lo, hi) in ours.items():
        if "half" in name:  # the product wrote into its buffer: TF logged the product's range
            assert hi < 0.5 * tf_ranges[name][1]
        else:
            np.testing.assert_allclose([lo, hi], tf_ranges[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_small_channels_survive_int8():
    """Relative RMS error per channel of the INT8 model against float. Measured with TF's own ranges (the ``x * 0.5``
    range 6x too wide): large channels 0.036-0.077, tiny ones 0.99-1.08 (mean 1.02); with measured ranges:
    0.014-0.037 and 0.50-0.96 (mean 0.69; what is left is the product's own per-tensor int8 step)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgebuild.procs import patched
    from edgebuild.targets.tflite.ranges import exact_ranges

    km, _, samples = _model()
    with patched([exact_ranges([], {})]):
        model = _converter(km, samples[:20]).convert()
    it = Interpreter(model_content=model, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    run = it.get_signature_runner()
    key = next(iter(run.get_input_details()))
    errors = []
    for x in samples[20:]:
        ref = km(x).numpy()
        got = next(iter(run(**{key: x}).values()))
        errors.append(np.sqrt(((got - ref) ** 2).mean((0, 1, 2))) / np.sqrt((ref ** 2).mean((0, 1, 2))))
    err = np.mean(errors, 0)
    assert err[:4].max() < 0.05 and err[4:].mean() < 0.85, err.round(3)


def test_integer_inputs_are_fed_as_integers(capfd):
    """Token ids (int32) reach the re-measuring interpreter as integers, not cast to float (a BERT's ids)."""
    from edgebuild.procs import patched
    from edgebuild.targets.tflite.ranges import exact_ranges

    ids = keras.Input((6,), batch_size=1, dtype="int32")
    km = keras.Model(ids, keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Embedding(20, 4)(ids))))
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, 20, (1, 6)).astype(np.int32) for _ in range(8)]
    record: list = []
    with patched([exact_ranges(record, {})]):
        model = _converter(km, samples).convert()
    assert model and record == []  # nothing shares a buffer here: every logged range was already exact
    assert "not re-measured" not in capfd.readouterr().err  # a float feed into the int32 input failed and was skipped


def _doctored(calibrated: bytes, widen: dict[str, float]) -> bytes:
    """``calibrated`` with the logged range of each named tensor widened by the given factor (about its centre)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    for t in m.subgraphs[0].tensors:
        k = widen.get(t.name.decode())
        if k:
            lo, hi = float(t.quantization.min[0]), float(t.quantization.max[0])
            mid, half = (lo + hi) / 2, (hi - lo) / 2 * k
            t.quantization.min, t.quantization.max = [mid - half], [mid + half]
    b = flatbuffers.Builder(len(calibrated) + 1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_each_narrowing_rule():
    """The three rules of ``measured_ranges`` (10c2d28), one tensor each in ``tanh(fc(x) * 0.5) + 1 -> reshape -> fc``:
    the FC's output (read by the TANH, which may overwrite it) is narrowed when logged 4x too wide, kept when logged
    1000x too wide (past MAX_NARROWING: an attention mask's -3.4e38 narrowed that far aborted LiteRT); the TANH's
    output, widened by the ADD that wrote into its buffer, keeps its logged range (a fixed-scale int8 output); the
    ADD's output, read only by a RESHAPE to another shape (no buffer to share), keeps a range logged 4x too wide."""
    from ai_edge_litert import schema_py_generated as schema

    from edgebuild.targets.tflite.ranges import MAX_NARROWING, measured_ranges

    rng = np.random.default_rng(0)
    inp = keras.Input((8,), batch_size=1, name="x")
    h = keras.layers.Lambda(lambda t: tf.math.multiply(t, 0.5), name="half")(keras.layers.Dense(8, name="fc")(inp))
    h = keras.layers.Lambda(lambda t: tf.math.add(tf.math.tanh(t), 1.0), name="plus")(h)
    km = keras.Model(inp, keras.layers.Dense(3, name="fc2")(keras.layers.Reshape((2, 4))(h)), name="rules")
    samples = [{"x": rng.normal(0, 1, (1, 8)).astype(np.float32)} for _ in range(8)]
    c = _converter(km, [s["x"] for s in samples], calibrate_only=True)
    calibrated = c.convert()
    names = [t.name.decode() for t in schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0).subgraphs[0].tensors]
    fc = next(n for n in names if n.startswith("rules/fc/MatMul"))
    tanh, add = "rules/plus/Tanh", "rules/plus/Add"
    assert {tanh, add} <= set(names), names
    model = schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    logged_tanh = next(t for t in model.subgraphs[0].tensors if t.name.decode() == tanh).quantization.max[0]
    assert logged_tanh > 1.2  # tanh <= 1: the ADD's output widened it, and it is not narrowed (below)

    def changed(widen):
        return {r["tensor"]: r for r in measured_ranges(_doctored(calibrated, widen), samples)[1]}

    narrowed = changed({fc: 4.0, add: 4.0})
    assert fc in narrowed and add not in narrowed and tanh not in narrowed, narrowed
    lo, hi = narrowed[fc]["logged"]
    mlo, mhi = narrowed[fc]["measured"]
    assert (hi - lo) > 3.5 * (mhi - mlo)
    assert MAX_NARROWING < 1000 and fc not in changed({fc: 1000.0})


def test_a_reconversion_of_the_same_graph_reuses_its_calibration(capfd):
    """A repair reconverts the same graph with other ops kept float (targets/tflite/convert.py): the float model is the
    same, so its calibration is reused — the dataset is not read again and the INT8 model is byte-identical."""
    from edgebuild.procs import patched
    from edgebuild.targets.tflite.ranges import exact_ranges

    km, _, samples = _model()
    memo, first, again = {}, [], []
    with patched([exact_ranges(first, memo)]):
        model = _converter(km, samples[:12]).convert()
    read = []
    converter = _converter(km, samples[:12])
    converter.representative_dataset = lambda: (read.append(1) or {km.input_names[0]: x} for x in samples[:12])
    with patched([exact_ranges(again, memo)]):
        assert converter.convert() == model
    assert read == [] and again == first and len(memo) == 1
    assert "calibration of this float model reused" in capfd.readouterr().err


def _outlier_model():
    """A conv whose output is ReLU-like with a rare spike: one calibration sample in 40 holds a value 40x the rest."""
    rng = np.random.default_rng(3)
    inp = keras.Input((8, 8, 2), batch_size=1)
    conv = keras.layers.Conv2D(4, 1, name="conv")
    x = keras.layers.Lambda(lambda t: tf.nn.relu(t), name="act")(conv(inp))
    km = keras.Model(inp, keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(x)))
    conv.set_weights([np.eye(2, 4, dtype=np.float32)[None, None], np.zeros(4, np.float32)])
    samples = [rng.normal(0, 1, (1, 8, 8, 2)).astype(np.float32) for _ in range(40)]
    samples[7][0, 3, 3, 0] = 160.0  # one spike in 10,240 values (the percentile cuts 0.05 % each side)
    return km, samples


def _logged(calibrated: bytes, part: str) -> tuple[float, float]:
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0).subgraphs[0]
    t, = [t for t in graph.tensors if part in t.name.decode() and t.quantization is not None
          and t.quantization.min is not None and len(t.quantization.min)]
    return float(t.quantization.min[0]), float(t.quantization.max[0])


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_clips_a_rare_spike(method):
    """``calibrate_method: percentile|entropy`` (the arm64 search's INT8 variants): the activation's range is the
    histogram method's, not the spike's; min-max keeps the spike (the whole int8 grid spent on one value)."""
    from edgebuild.procs import patched
    from edgebuild.targets.tflite.ranges import exact_ranges

    km, samples = _outlier_model()
    minmax = _logged(_converter(km, samples, calibrate_only=True).convert(), "act")
    record: list = []
    with patched([exact_ranges(record, {}, method, 99.9)]):
        clipped = _logged(_converter(km, samples, calibrate_only=True).convert(), "act")
    bulk = np.quantile(np.concatenate([np.maximum(s, 0).ravel() for s in samples]), 0.999)
    assert minmax[1] >= 159.0
    # percentile: within one of its 2048 bins of the 99.9th; entropy: KL's choice among a quarter of the bound to all
    # of it (its bins are the bound's: 0.3 wide here, the bulk of the values in the first ten)
    want = (0.9 * bulk, minmax[1] / 3) if method == "percentile" else (minmax[1] / 4, 0.9 * minmax[1])
    assert want[0] <= clipped[1] < want[1], (method, clipped, minmax, bulk)
    assert any("act" in r["tensor"] for r in record)


def test_mean_min_max_calibration_averages_each_samples_range():
    """``calibrate_method: mean_minmax`` on arm64 (the search's first variant): the range is the mean of each sample's
    min and max measured in LiteRT, as on onnx-cpu; the spike of one sample in 40 moves it by 1/40 of itself."""
    from edgebuild.procs import patched
    from edgebuild.targets.tflite.ranges import exact_ranges

    km, samples = _outlier_model()
    with patched([exact_ranges([], {}, "mean_minmax")]):
        lo, hi = _logged(_converter(km, samples, calibrate_only=True).convert(), "act")
    per_sample = [float(np.maximum(s[..., :2], 0).max()) for s in samples]  # the conv copies channels 0 and 1
    assert lo == pytest.approx(0.0, abs=1e-6) and hi == pytest.approx(np.mean(per_sample), rel=0.01), (hi, per_sample)


def test_entropy_searches_thresholds_below_the_maximum():
    """onnxruntime's entropy defaults (128 bins, 128 quantized bins) leave one candidate: the whole +-max|x| range
    (more only when a later chunk re-bins a wider range at the first one's bin width);
    with calibration/histogram.py's bins the KL search finds a threshold below a rare spike (onnx-cpu and arm64)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from edgebuild.calibration.histogram import Histograms

    rng = np.random.default_rng(0)
    batches = [np.maximum(rng.standard_normal(4000), 0).astype(np.float32) for _ in range(6)]
    batches[2][0] = 40.0
    ours = Histograms("entropy", {"t": 40.0})
    stock = HistogramCollector("entropy", False, 128, 128, 99.999, "same")
    for b in batches:
        ours.add({"t": b})
    stock.collect({"t": np.concatenate(batches)})  # one chunk (onnx-cpu calibrates 16 samples per chunk)
    assert stock.compute_collection_result()["t"][1] == pytest.approx(40.0)
    lo, hi = ours.ranges()["t"]
    assert lo == 0.0 and 1.0 < hi < 0.5 * 40.0
