import numpy as np
import pytest

from edgebuild.targets.base import get_backend
from edgebuild.targets.onnx import OrtRunner
from edgebuild.targets.profiles import catalogue


def _accuracy(runner, data):
    pred = np.array([runner.run(f)[0].argmax() for f in data.feeds()])
    return (pred == data.labels).mean() * 100


@pytest.mark.parametrize("precision,name", [("fp32", "model_fp32.onnx"), ("fp16", "model_fp16.onnx"),
                                            ("dynamic", "model_dynamic_int8.onnx"), ("int8", "model_int8_qdq.onnx")])
def test_onnx_cpu_builds_every_precision_with_an_honest_name(model, small_sets, tmp_path, precision, name):
    import onnx

    calib, test = small_sets
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    art = backend.convert(model, profile, precision, calib, tmp_path, None)
    assert art.main == name and art.files == [name]
    graph = onnx.load(str(art.path)).graph
    ops = {n.op_type for n in graph.node}
    if precision == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        from edgebuild.targets.isa import host_isa  # 7-bit weights only where the host has no VNNI/AMX

        assert art.settings["reduce_range"] is (not host_isa()["vnni"]) and art.settings["activation_type"] == "uint8"
    if precision == "dynamic":
        assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "ConvInteger" in ops
    if precision == "fp16":  # I/O stays float32 so feeds need no change
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    with OrtRunner(model.onnx_path, 1) as ref, backend.runner(art, 1) as run:
        assert abs(_accuracy(ref, test) - _accuracy(run, test)) <= 1.0


def test_tensorrt_profile_is_symmetric_s8s8_with_engine_script(model, small_sets, tmp_path):
    import onnx

    calib, _ = small_sets
    art = get_backend("tensorrt").convert(model, catalogue()["jetson-orin"], "int8", calib, tmp_path, None)
    assert art.files[:2] == ["model_int8_qdq.onnx", "build_engine.sh"]
    script = (tmp_path / "build_engine.sh").read_text()
    assert "--onnx=model_int8_qdq.onnx" in script and "--int8" in script
    zero_points = [i for i in onnx.load(str(art.path)).graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(onnx.numpy_helper.to_array(z).dtype == np.int8 and not onnx.numpy_helper.to_array(z).any()
                               for z in zero_points), "TensorRT needs symmetric int8 (zero point 0)"


def test_symmetric_s8s8_needs_unfused_host_validation(model, small_sets, tmp_path):
    """Why TensorRT profiles validate with Q/DQ unfused: ORT's fused x86 kernels (no VNNI) saturate on S8S8."""
    calib, test = small_sets
    art = get_backend("tensorrt").convert(model, catalogue()["jetson-orin"], "int8", calib, tmp_path, None)
    with OrtRunner(model.onnx_path, 1) as ref, OrtRunner(art.path, 1, simulate=True) as sim:
        assert _accuracy(ref, test) - _accuracy(sim, test) <= 0.5


def test_float_layers_keep_their_nodes_float_and_unknown_names_fail(model, small_sets, tmp_path):
    import onnx

    from edgebuild.pipeline.errors import ConversionError

    calib, _ = small_sets
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    art = backend.convert(model, profile, "int8", calib, tmp_path / "a", {"float_layers": ["/classifier/classifier.1/Gemm"]})
    assert art.main == "model_int8_mixed_qdq.onnx"
    graph = onnx.load(str(art.path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    gemm = next(n for n in graph.node if n.name == "/classifier/classifier.1/Gemm")
    assert producers[gemm.input[1]].op_type == "DequantizeLinear" and any("weight-only INT8" in n for n in art.notes), \
        "the float layer's weights are int8 behind a DequantizeLinear (weight-only; targets/onnx/weight_only.py)"
    art = backend.convert(model, profile, "int8", calib, tmp_path / "c",
                          {"float_layers": ["/classifier/classifier.1/Gemm"], "weight_only": False})
    graph = onnx.load(str(art.path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    gemm = next(n for n in graph.node if n.name == "/classifier/classifier.1/Gemm")
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in gemm.input[1:]), \
        "without weight-only INT8 the float layer's weights are not quantized"
    with pytest.raises(ConversionError, match="not in the model"):
        backend.convert(model, profile, "int8", calib, tmp_path / "b", {"float_layers": ["/no/such/Conv"]})


def test_chunked_calibration_matches_onnxruntime_calibrating_at_once(demo_onnx, digits_split, tmp_path):
    """Calibrating CALIB_CHUNK samples at a time bounds memory and gives onnxruntime's own min-max ranges exactly."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgebuild.calibration.adapters import ort_reader
    from edgebuild.targets import onnx as backend
    from edgebuild.targets.onnx.prepare import prepared

    calib = digits_split[0].subset(np.arange(50))  # not a multiple of the chunk size
    ours, theirs = tmp_path / "ours.onnx", tmp_path / "theirs.onnx"
    backend.quantize_qdq(demo_onnx, ours, calib, {**backend.INT8_DEFAULTS, "calibrate_method": "minmax"}, tmp_path)
    pre = prepared(demo_onnx, tmp_path)
    quantize_static(str(pre), str(theirs), ort_reader(calib), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "QuantizeBias": True,
                                   "DedicatedQDQPair": False})
    scales = lambda p: {i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer  # noqa: E731
                        if i.name.endswith("_scale")}
    a, b = scales(ours), scales(theirs)
    assert a.keys() == b.keys() and len(a) > 5
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)


def _spiky_relu_model(tmp_path):
    """x -> Relu -> MatMul, and 64 samples of which one holds a value 40x the bulk's (a rare spike)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgebuild.calibration.dataset import SampleSet

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((256, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["act"], name="relu"),
                               helper.make_node("MatMul", ["act", "w"], ["y"], name="mm")], "spiky",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    path = tmp_path / "spiky.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[37, 5] = 160.0
    return path, SampleSet("calib", {"x": x}, None, {}, {"x": (1, 256)})


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_on_onnx_cpu_clips_a_rare_spike(tmp_path, method):
    """``calibrate_method: percentile|entropy`` on onnx-cpu (the search's INT8 variants) set the range by the
    method's search over fixed-bin histograms bounded by the min-max range (calibration/histogram.py, as on arm64).
    With onnxruntime's entropy calibrator the KL search had one candidate, +-max|x|: "entropy" was min-max or worse."""
    import onnx
    from onnx import numpy_helper

    from edgebuild.targets import onnx as backend

    model, calib = _spiky_relu_model(tmp_path)

    def act_scale(m: str) -> float:
        out = tmp_path / f"{m}.onnx"
        backend.quantize_qdq(model, out, calib, {**backend.INT8_DEFAULTS, "calibrate_method": m, "percentile": 99.9},
                             tmp_path)
        g = onnx.load(str(out)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "act")
        return float(np.ravel(inits[q.input[1]])[0])

    minmax, clipped = act_scale("minmax"), act_scale(method)
    assert minmax == pytest.approx(160.0 / 255, rel=0.01)
    bulk = float(np.quantile(np.maximum(calib.inputs["x"], 0), 0.999))
    want = (0.9 * bulk, 160.0 / 3) if method == "percentile" else (160.0 / 4, 0.9 * 160.0)
    assert want[0] <= clipped * 255 < want[1], (method, clipped * 255, bulk)


def test_mean_min_max_calibration_on_onnx_cpu_averages_each_samples_range(tmp_path):
    """``calibrate_method: mean_minmax`` (NNCF's default for per-tensor activations; a search variant): the range is
    the mean of each calibration sample's min and max, so one sample's spike no longer sets every sample's step."""
    import onnx
    from onnx import numpy_helper

    from edgebuild.targets import onnx as backend

    model, calib = _spiky_relu_model(tmp_path)
    out = tmp_path / "mean.onnx"
    backend.quantize_qdq(model, out, calib, {**backend.INT8_DEFAULTS, "calibrate_method": "mean_minmax"}, tmp_path)
    g = onnx.load(str(out)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "act")
    want = float(np.maximum(calib.inputs["x"], 0).max(axis=1).mean())  # each sample's min is 0 (a ReLU)
    assert 3.0 < want < 160.0 / 10
    assert float(np.ravel(inits[q.input[1]])[0]) * 255 == pytest.approx(want, rel=0.01)


def test_the_tries_of_one_search_calibrate_once_per_graph_samples_and_method(model, small_sets, tmp_path, monkeypatch):
    """Float layers decide which tensors get Q/DQ, never a tensor's range: with a ranges store (the search's
    ``Backend.calibration_store``) the mixed-precision tries of one build calibrate once (issue 28: a mixed try on
    PP-OCRv4's detector took 49 s, 38 of them calibrating), and give byte-identical files to calibrating every time.
    Another method or other samples calibrate anew."""
    import onnx

    from edgebuild.targets.isa import resolve
    from edgebuild.targets.onnx import static

    calls = []
    real = static.calibrate_in_chunks
    monkeypatch.setattr(static, "calibrate_in_chunks", lambda *a, **k: (calls.append("minmax"), real(*a, **k))[1])
    real_histograms = static.calibrate_histograms
    monkeypatch.setattr(static, "calibrate_histograms",
                        lambda *a, **k: (calls.append(a[2]["calibrate_method"]), real_histograms(*a, **k))[1])
    calib = small_sets[0]
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    s = backend.requested_settings(profile).for_precision("int8")
    s["reduce_range"] = resolve("reduce_range", s["reduce_range"])[0]
    layers = [n.name for n in onnx.load(str(model.onnx_path)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(layers) >= 2
    store = tmp_path / "store"

    def quantize(name: str, float_layers, stored: bool, **changes) -> bytes:
        wd = tmp_path / name
        wd.mkdir()
        static.quantize_qdq(model.onnx_path, wd / "q.onnx", changes.pop("calib", calib),
                            {**s, "float_layers": list(float_layers), **changes}, wd,
                            ranges_store=store if stored else None)
        return (wd / "q.onnx").read_bytes()

    sets = [layers[:1], layers[1:2], layers[:2]]
    with_store = [quantize(f"a{i}", f, True) for i, f in enumerate(sets)]
    assert len(calls) == 1 and len(list(store.glob("ranges-*.json"))) == 1
    without = [quantize(f"b{i}", f, False) for i, f in enumerate(sets)]
    assert len(calls) == 4 and with_store == without and len(set(with_store)) == 3
    quantize("c", sets[0], True, calibrate_method="entropy")  # its histograms' bounds: the stored min-max ranges
    quantize("d", sets[0], True, calib=calib.subset(np.arange(50)))
    assert calls[4:] == ["entropy", "minmax"] and len(list(store.glob("ranges-*.json"))) == 3
    quantize("e", sets[2], True, calibrate_method="entropy")
    assert len(calls) == 6


def test_the_backend_keeps_ranges_in_its_calibration_store(model, small_sets, tmp_path):
    """Through the converter child: two mixed-precision conversions with the store set leave one ranges file."""
    import onnx

    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    backend.calibration_store = tmp_path / "store"
    layers = [n.name for n in onnx.load(str(model.onnx_path)).graph.node if n.op_type in ("Conv", "Gemm")]
    for i, name in enumerate(layers[:2]):
        art = backend.convert(model, profile, "int8", small_sets[0], tmp_path / f"t{i}", {"float_layers": (name,)})
        assert art.main == "model_int8_mixed_qdq.onnx"
    assert len(list((tmp_path / "store").glob("ranges-*.json"))) == 1


def test_mean_min_max_skips_a_sample_whose_tensor_is_empty(tmp_path):
    """A tensor of dynamic length (boxes after NMS on an image with none) is empty for some samples: onnxruntime
    reduces it to (+inf, -inf), which must not enter the mean (it made the scale infinite)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.targets import onnx as backend

    one = numpy_helper.from_array(np.ones((1,), np.float32), "w")
    consts = [one, numpy_helper.from_array(np.array([0], np.int64), "st"),
              numpy_helper.from_array(np.array([1], np.int64), "ax")]
    nodes = [helper.make_node("Slice", ["x", "st", "n", "ax"], ["sl"]), helper.make_node("Mul", ["sl", "w"], ["m"]),
             helper.make_node("Relu", ["m"], ["act"]), helper.make_node("Add", ["act", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                                           helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])], consts)
    path = tmp_path / "sliced.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])),
              str(path))
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    calib = SampleSet("calib", {"x": x, "n": np.array([8, 0, 8, 8], np.int64)}, None, {}, {"x": (1, 8), "n": (1,)})
    out = tmp_path / "q.onnx"
    backend.quantize_qdq(path, out, calib, {**backend.INT8_DEFAULTS, "calibrate_method": "mean_minmax"}, tmp_path)
    scales = {i.name: float(np.ravel(numpy_helper.to_array(i))[0]) for i in onnx.load(str(out)).graph.initializer
              if i.name.endswith("_scale")}
    want = float(np.mean([np.maximum(x[i], 0).max() for i in (0, 2, 3)]))  # the three samples that have values
    assert np.isfinite(list(scales.values())).all() and scales["act_scale"] * 255 == pytest.approx(want, rel=0.01)
