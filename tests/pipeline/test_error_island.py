"""Issue 28 item 3: an INT8 graph onnxruntime refuses to load gets its float island (stages/islands.py), and the root
cause seen on a real model (onnxruntime's copy of a shared bias taking a tensor's name, targets/onnx_islands.py) is
fixed before quantizing."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

BIAS = "m/cq/conv1d_25;m/cq/conv1d_25"  # tf2onnx-like: one zero bias shared by a front-end's fixed convolutions


def _front_end_model(path, front: int = 5, learned: int = 3):
    """``front`` Convs sharing one bias whose outputs are named ``<bias><k>`` (tf2onnx's ``;``-joined names do that:
    ``.../conv1d_25;.../conv1d_25`` and the output ``.../conv1d_25;.../conv1d_252``), each followed by a Neg, then
    ``learned`` Conv+Relu layers with their own biases."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [nh.from_array(np.zeros(4, np.float32), BIAS)], "x"
    for i in range(front):
        w = f"m/cq/kernel_{i}"
        inits.append(nh.from_array(rng.normal(size=(4, 4 if i else 2, 1, 3)).astype(np.float32), w))
        out = f"{BIAS}{i}"
        nodes += [h.make_node("Conv", [x, w, BIAS], [out], name=f"m/cq/conv1d_{i};m/cq/conv1d_{i}", pads=[0, 1, 0, 1]),
                  h.make_node("Neg", [out], [f"m/cq/Neg_{i};m/cq/Neg_{i}"], name=f"m/cq/Neg_{i};m/cq/Neg_{i}")]
        x = nodes[-1].output[0]
    for i in range(learned):
        w, b = f"m/conv2d_{i}/kernel", f"m/conv2d_{i}/bias"
        inits += [nh.from_array(rng.normal(size=(4, 4, 1, 3)).astype(np.float32) * 0.3, w),
                  nh.from_array(rng.normal(size=4).astype(np.float32), b)]
        nodes += [h.make_node("Conv", [x, w, b], [f"m/conv2d_{i}/out"], name=f"m/conv2d_{i}/Conv2D", pads=[0, 1, 0, 1]),
                  h.make_node("Relu", [f"m/conv2d_{i}/out"], [f"m/relu_{i}"], name=f"m/relu_{i}")]
        x = f"m/relu_{i}"
    graph = h.make_graph(nodes, "front", [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 1, 8])],
                         [h.make_tensor_value_info(x, T.FLOAT, [1, 4, 1, 8])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _samples(n=4):
    return np.random.default_rng(1).normal(size=(n, 1, 2, 1, 8)).astype(np.float32)


def _plain_ort_qdq(src, out, nodes_to_exclude=()):
    """onnxruntime's own QDQ quantization (what a user does by hand), 2 calibration samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"x": s} for s in _samples(2))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    nodes_to_exclude=list(nodes_to_exclude))


def _load_error(path) -> str | None:
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return None
    except Exception as e:  # noqa: BLE001 — onnxruntime's load failure, as text
        return str(e)


def test_onnxruntime_own_qdq_of_a_shared_bias_does_not_load_and_edgebuild_quantizes_it(tmp_path):
    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.targets.onnx import quantize_static
    from edgebuild.targets.onnx_islands import quantizer_safe

    src = _front_end_model(tmp_path / "m.onnx")
    _plain_ort_qdq(src, tmp_path / "plain.onnx")
    assert _load_error(tmp_path / "plain.onnx")  # the failure is real: onnxruntime's quantizer made it
    fixed = tmp_path / "fixed.onnx"
    fixed.write_bytes(src.read_bytes())
    assert quantizer_safe(fixed) == 4 and quantizer_safe(fixed) == 0
    names = [i.name for i in onnx.load(str(fixed)).graph.initializer]
    assert len(names) == len(set(names))
    calib = SampleSet("calib", {"x": _samples()[:, 0]})
    quantize_static(src, tmp_path / "q.onnx", calib, {}, tmp_path)
    assert _load_error(tmp_path / "q.onnx") is None
    q = onnx.load(str(tmp_path / "q.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in q.node) >= 8  # the layers are INT8
    f32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    i8 = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    x = _samples(1)[0]
    a, b = f32.run(None, {"x": x})[0].ravel(), i8.run(None, {"x": x})[0].ravel()
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9


def test_the_float_island_of_an_unloadable_int8_graph_is_found_by_load_checks(tmp_path):
    from edgebuild.pipeline.stages.islands import MAX_CHECKS, find_island, nodes_named_in, quantizable_order

    src = _front_end_model(tmp_path / "m.onnx")
    order, parents = quantizable_order(src)
    assert len(order) == 16
    calls = []

    def loads(float_nodes):  # the cheap check: onnxruntime's own QDQ (unfixed), 2 calibration samples, a load
        out = tmp_path / f"c{len(calls)}.onnx"
        calls.append(list(float_nodes))
        _plain_ort_qdq(src, out, float_nodes)
        return _load_error(out)

    first = loads([])
    assert first and "Node (" in first
    named = nodes_named_in(src, first)
    island = find_island(order, parents, named, loads)
    rec = island.record()
    assert island.nodes and len(calls) - 1 == len(rec["rounds"]) <= MAX_CHECKS
    assert rec["rounds"][-1]["loads"] or any(r["loads"] for r in rec["rounds"])
    # the island is in the front-end: the learned layers stay INT8
    assert not any(n.startswith("m/conv2d_") for n in island.nodes)
    _plain_ort_qdq(src, tmp_path / "island.onnx", island.nodes)
    assert _load_error(tmp_path / "island.onnx") is None
    q = onnx.load(str(tmp_path / "island.onnx")).graph
    int8_weights = {n.input[0] for n in q.node if n.op_type == "DequantizeLinear"}
    assert all(any(w.startswith(f"m/conv2d_{i}/kernel") for w in int8_weights) for i in range(3))


def test_nodes_named_in_matches_whole_tf2onnx_names_with_semicolons(tmp_path):
    from edgebuild.pipeline.stages.islands import nodes_named_in

    src = _front_end_model(tmp_path / "m.onnx")
    text = ("onnxruntime cannot load model_int8_qdq.onnx: Fail: [ONNXRuntimeError] : 1 : FAIL : Node "
            "(m/cq/Neg_3;m/cq/Neg_3) Op (Neg) [ShapeInferenceError] All inputs to Concat must have same rank.")
    assert nodes_named_in(src, text) == ["m/cq/Neg_3;m/cq/Neg_3"]
    # a tensor named in quotes names its producer; a name's prefix alone ('m/cq/Neg_3') names nothing
    assert nodes_named_in(src, f"Error merging shape info for output. '{BIAS}2' source:{{4}}") == \
        ["m/cq/conv1d_2;m/cq/conv1d_2"]
    assert nodes_named_in(src, "Node (m/cq/Neg_3) Op (Neg) failed") == []


@pytest.mark.parametrize("checks", [1, 3])
def test_island_search_stays_within_its_checks(tmp_path, checks):
    from edgebuild.pipeline.stages.islands import find_island, quantizable_order

    order, parents = quantizable_order(_front_end_model(tmp_path / "m.onnx"))
    seen = []
    island = find_island(order, parents, [], lambda nodes: seen.append(nodes) or "still fails", max_checks=checks)
    assert len(seen) == checks and island.nodes == [] and "no float prefix" in island.how


def _output_collision_model(path, channels: int = 4):
    """Three Conv+Relu layers, and a side output named ``h_DequantizeLinear_Output`` for the inner tensor ``h``: the
    name onnxruntime's quantizer gives ``h``'s DequantizeLinear output, so the INT8 graph defines it twice and does
    not load. A graph output keeps its name (the user's interface), so no renaming fixes it before quantizing."""
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", channels
    for i, out in enumerate(["h", "g", "y"]):
        w, b = f"w{i}", f"b{i}"
        scale = 0.5 if c == 4 else 0.1
        inits += [nh.from_array(rng.normal(size=(c, c if i else 2, 1, 3)).astype(np.float32) * scale, w),
                  nh.from_array(rng.normal(size=c).astype(np.float32) * 0.1, b)]
        nodes += [h.make_node("Conv", [x, w, b], [f"c{i}"], name=f"conv{i}", pads=[0, 1, 0, 1]),
                  h.make_node("Relu", [f"c{i}"], [out], name=f"relu{i}")]
        x = out
    nodes.append(h.make_node("Sigmoid", ["h"], ["h_DequantizeLinear_Output"], name="side"))
    graph = h.make_graph(nodes, "collide", [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 1, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, c, 1, 8]),
                          h.make_tensor_value_info("h_DequantizeLinear_Output", T.FLOAT, [1, c, 1, 8])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_inner_names_the_quantizer_would_define_twice_are_renamed(tmp_path):
    from edgebuild.targets.onnx_islands import quantizer_safe_names_in

    model = onnx.load(str(_output_collision_model(tmp_path / "m.onnx")))
    assert quantizer_safe_names_in(model) == 0  # a graph output keeps its name
    model.graph.output.pop()  # the side tensor becomes an inner one: renamed, its node keeps its name
    model.graph.output.append(h.make_tensor_value_info("sideout", T.FLOAT, [1, 4, 1, 8]))
    model.graph.node.append(h.make_node("Neg", ["h_DequantizeLinear_Output"], ["sideout"], name="neg"))
    assert quantizer_safe_names_in(model) == 1
    side = next(n for n in model.graph.node if n.name == "side")
    assert side.output[0] == "h_DequantizeLinear_Output_t1"
    assert next(n for n in model.graph.node if n.name == "neg").input[0] == "h_DequantizeLinear_Output_t1"


@pytest.mark.slow
def test_a_build_whose_int8_graph_does_not_load_finds_its_float_island_and_ships_int8(tmp_path):
    import json

    from edgebuild.pipeline.cli import main

    # 64 channels, so the INT8 graph is smaller than FP32 (with 4 its Q/DQ made it twice FP32's size); objective size:
    # the island is under test, not the speed of a 0.02 ms graph (slower than FP32 in INT8 on a host without VNNI)
    src = _output_collision_model(tmp_path / "m.onnx", channels=64)
    rng = np.random.default_rng(3)
    np.save(tmp_path / "calib.npy", rng.normal(size=(16, 1, 2, 1, 8)).astype(np.float32))
    np.save(tmp_path / "eval.npy", rng.normal(size=(40, 1, 2, 1, 8)).astype(np.float32))
    out = tmp_path / "out"
    code = main(["--model", str(src), "--calib", str(tmp_path / "calib.npy"), "--eval", str(tmp_path / "eval.npy"),
                 "--target", "onnx-cpu", "--out", str(out), "--objective", "size"])
    t = json.loads((out / "manifest.json").read_text())["targets"]["onnx-cpu"]
    search = t["search"]
    assert "Duplicate definition" in search["tries"][0]["error"]
    island = search["error_island"]
    assert island["result"] == "converted and met the budget" and 0 < len(island["rounds"]) <= 8
    assert island["node_count"] < 7 and "conv2" not in island["nodes"]  # the last layer stays INT8
    assert code == 0 and t["precision"] == "int8" and search["chosen"].startswith("INT8 with")
    q = onnx.load(str(out / "onnx-cpu" / t["artifact"])).graph
    assert "w2" in {n.input[0].removesuffix("_quantized") for n in q.node if n.op_type == "DequantizeLinear"}


def _spectral_model(path, learned_in_front: bool = False):
    """A constant-Q-like front-end from ops: two Convs with fixed kernels (real and imaginary part) on the waveform,
    squared, summed, Sqrt, Log; then a learned Conv+Relu. ``learned_in_front``: a Relu before the Log (a learned
    network computing a log, not a spectrogram)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.normal(size=(8, 1, 16)).astype(np.float32), "kre"),
             nh.from_array(rng.normal(size=(8, 1, 16)).astype(np.float32), "kim"),
             nh.from_array(np.array([1e-6], np.float32), "eps"),
             nh.from_array(rng.normal(size=(4, 8, 3)).astype(np.float32), "w"),
             nh.from_array(np.zeros(4, np.float32), "b")]
    nodes = [h.make_node("Pad", ["x", "pads"], ["xp"], name="pad", mode="reflect"),
             h.make_node("Conv", ["xp", "kre"], ["re"], name="cq/re", strides=[4]),
             h.make_node("Conv", ["xp", "kim"], ["im0"], name="cq/im", strides=[4]),
             h.make_node("Neg", ["im0"], ["im"], name="cq/neg"),
             h.make_node("Mul", ["re", "re"], ["re2"], name="cq/re2"),
             h.make_node("Mul", ["im", "im"], ["im2"], name="cq/im2"),
             h.make_node("Add", ["re2", "im2"], ["p0"], name="cq/power"),
             h.make_node("Mul", ["p0", "eps"], ["p00"], name="cq/scale"),
             h.make_node("Div", ["p00", "eps"], ["p"], name="cq/unscale"),
             h.make_node("Relu" if learned_in_front else "Identity", ["p"], ["p1"], name="cq/p1"),
             h.make_node("Sqrt", ["p1"], ["mag"], name="cq/mag"),
             h.make_node("Add", ["mag", "eps"], ["mag1"], name="cq/eps"),
             h.make_node("Log", ["mag1"], ["logmag"], name="cq/log"),
             h.make_node("Mul", ["logmag", "eps"], ["scaled"], name="norm/scale"),
             h.make_node("Transpose", ["scaled"], ["t"], name="t", perm=[0, 1, 2]),
             h.make_node("Conv", ["t", "w", "b"], ["c"], name="learned/conv", pads=[1, 1]),
             h.make_node("Relu", ["c"], ["y"], name="learned/relu")]
    inits.append(nh.from_array(np.array([0, 0, 8, 0, 0, 8], np.int64), "pads"))
    graph = h.make_graph(nodes, "spectral", [h.make_tensor_value_info("x", T.FLOAT, [1, 1, 256])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_a_spectrogram_made_of_fixed_kernel_convolutions_is_a_float_front_end(tmp_path):
    from edgebuild.targets.regions import float_regions

    front = float_regions(_spectral_model(tmp_path / "s.onnx"))["frontend"]
    assert {"cq/re", "cq/im", "cq/mag", "cq/log", "pad"} <= set(front)
    assert not {"learned/conv", "learned/relu", "norm/scale"} & set(front)
    # a learned op before the Log: no spectrogram, the walk stops at the first weighted layer as before
    front = float_regions(_spectral_model(tmp_path / "l.onnx", learned_in_front=True))["frontend"]
    assert "cq/log" not in front and "cq/re" not in front
