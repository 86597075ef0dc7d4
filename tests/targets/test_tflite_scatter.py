"""ONNX rewrites of issue 22, exact against onnxruntime.

ScatterElements with a reduction (a colour histogram's ``scatter_add_``), which onnx2tf 1.28.8 refuses
("ScatterElements currently supports only reduction=['none']"): targets/tflite/rewrite/ rewrites it into a one-hot
mask and a reduction. The rewrite is checked against onnxruntime on random inputs with duplicate and negative
indices for every reduction, axis and opset; the histogram model then builds arm64 INT8 and runs in LiteRT. Gather of one index from a Concat (a stacked
RNN's ``h_n[-1]``) becomes that Concat input."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgebuild.targets.tflite.rewrite import rewrite  # noqa: E402
from edgebuild.targets.tflite.rewrite.scatter import scatter_elements_reduction  # noqa: E402


def scatter_model(reduction: str, data_shape, idx_shape, axis: int, opset: int = 18, idx_type=TensorProto.INT64):
    node = helper.make_node("ScatterElements", ["data", "indices", "updates"], ["y"], axis=axis, reduction=reduction,
                            name="scatter")
    g = helper.make_graph([node], "s", [helper.make_tensor_value_info("data", TensorProto.FLOAT, data_shape),
                                         helper.make_tensor_value_info("indices", idx_type, idx_shape),
                                         helper.make_tensor_value_info("updates", TensorProto.FLOAT, idx_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, data_shape)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def run(m, feed):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


CASES = [(r, ds, xs, ax, op) for r in ("add", "mul", "max", "min") for ds, xs, ax in (
    ((2, 5, 3), (2, 9, 3), 1),      # more updates than targets: duplicates for sure
    ((4, 3), (7, 3), 0),
    ((1, 3, 6), (1, 3, 40), -1),    # the histogram's shape, negative axis
    ((2, 2, 3, 4), (2, 2, 3, 10), 3)) for op in ((18,) if r in ("max", "min") else (16, 18))]


@pytest.mark.parametrize("reduction,data_shape,idx_shape,axis,opset", CASES)
def test_rewrite_matches_onnxruntime(reduction, data_shape, idx_shape, axis, opset):
    m = scatter_model(reduction, data_shape, idx_shape, axis, opset)
    out, note = scatter_elements_reduction(onnx.load_from_string(m.SerializeToString()))
    assert note and "scatter (" + reduction in note
    assert not any(n.op_type == "ScatterElements" for n in out.graph.node)
    onnx.checker.check_model(out)
    rng = np.random.default_rng(hash((reduction, axis, opset)) % 2**32)
    depth = data_shape[axis]
    for _ in range(5):
        idx = rng.integers(-depth, depth, idx_shape)  # negative and duplicate indices
        feed = {"data": rng.normal(size=data_shape).astype(np.float32), "indices": idx,
                "updates": rng.normal(size=idx_shape).astype(np.float32)}
        np.testing.assert_allclose(run(out, feed), run(m, feed), rtol=1e-5, atol=1e-5)
    assert [n.output[0] for n in out.graph.node if n.name == "scatter"] == ["y"]  # name and output kept


def test_int32_indices_and_none_left_alone():
    m = scatter_model("add", (3, 4), (5, 4), 0, idx_type=TensorProto.INT32)
    out, _ = rewrite(onnx.load_from_string(m.SerializeToString()))
    rng = np.random.default_rng(1)
    feed = {"data": rng.normal(size=(3, 4)).astype(np.float32), "indices": rng.integers(0, 3, (5, 4)).astype(np.int32),
            "updates": rng.normal(size=(5, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(out, feed), run(m, feed), rtol=1e-5, atol=1e-6)
    plain = scatter_model("none", (3, 4), (2, 4), 0)
    assert scatter_elements_reduction(plain)[1] is None  # onnx2tf converts reduction=none itself


@pytest.mark.parametrize("reduction", ["add", "max"])
def test_constant_data_and_updates(reduction):
    """data and updates as initializers (a histogram's zeros and ones): folded by the rewrite, still exact."""
    rng = np.random.default_rng(2)
    m = scatter_model(reduction, (2, 3, 5), (2, 3, 7), 2)
    consts = {"data": rng.normal(size=(2, 3, 5)).astype(np.float32), "updates": rng.normal(size=(2, 3, 7)).astype(np.float32)}
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    del m.graph.input[:]
    m.graph.input.append(helper.make_tensor_value_info("indices", TensorProto.INT64, (2, 3, 7)))
    out, note = rewrite(onnx.load_from_string(m.SerializeToString()))
    assert any("ScatterElements" in n for n in note)
    for _ in range(3):
        feed = {"indices": rng.integers(-5, 5, (2, 3, 7))}
        np.testing.assert_allclose(run(out, feed), run(m, feed), rtol=1e-5, atol=1e-6)


def _saved(graph, path):
    """``graph`` as a checked opset-17 model at ``path``."""
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def histogram_model(path, reduction="add"):
    """A colour-histogram branch beside a conv: bins = floor(clip(x * 4, 0, 3)), scatter-add of ones -> [1, 3, 4]."""
    w = np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("ReduceMean", ["c"], ["feat"], axes=[2, 3], keepdims=0, name="pool"),
             helper.make_node("Reshape", ["x", "shp"], ["xf"], name="flat"),
             helper.make_node("Mul", ["xf", "four"], ["xs"], name="scale"),
             helper.make_node("Clip", ["xs", "lo", "hi"], ["xc"], name="clip"),
             helper.make_node("Floor", ["xc"], ["xfl"], name="floor"),
             helper.make_node("Cast", ["xfl"], ["bins"], to=TensorProto.INT64, name="bins"),
             helper.make_node("ScatterElements", ["zeros", "bins", "ones"], ["hist"], axis=2, reduction=reduction,
                              name="histogram"),
             helper.make_node("Mul", ["hist", "inv"], ["hist_n"], name="normalise")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, 3, 64], np.int64), "shp"),
             numpy_helper.from_array(np.array(4, np.float32), "four"), numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(3, np.float32), "hi"),
             numpy_helper.from_array(np.zeros((1, 3, 4), np.float32), "zeros"),
             numpy_helper.from_array(np.ones((1, 3, 64), np.float32), "ones"),
             numpy_helper.from_array(np.array(1 / 64, np.float32), "inv")]
    g = helper.make_graph(nodes, "hist", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("feat", TensorProto.FLOAT, [1, 4]),
                           helper.make_tensor_value_info("hist_n", TensorProto.FLOAT, [1, 3, 4])], inits)
    return _saved(g, path)


@pytest.mark.slow
def test_histogram_builds_arm64_int8(tmp_path):
    pytest.importorskip("onnx2tf")
    from tests.targets.test_tflite_conformance import calibration, convert, fidelity, model_input

    mi = model_input(histogram_model(tmp_path / "hist.onnx"))
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)  # before: exit 3, "onnx2tf ... try the -onwdt option"
    assert any("ScatterElements with a reduction" in r for r in art.settings["onnx_rewrites"])
    # the binning (Floor, float -> int Cast) has no int8 kernel in TFLite and stays float; the scatter is int8
    assert {op.split()[0] for op in art.settings.get("float_ops_kept", [])} <= {"FLOOR", "CAST"}
    assert fidelity(art, mi, calib) > 0.9  # bins move where INT8 rounds the input across a bin edge
    fp32 = convert(mi, calib, tmp_path, precision="fp32")
    assert fidelity(fp32, mi, calib) > 0.99999  # the rewrite itself is exact through onnx2tf and LiteRT



@pytest.mark.parametrize("index,sizes", [(-1, (1, 1, 1)), (0, (1, 1, 1)), (3, (2, 3, 1)), (-2, (2, 3, 1))])
def test_gather_of_concat_matches_onnxruntime(index, sizes):
    """h_n[-1] of a stacked RNN: Gather(Concat(Y_h of each layer), -1) -> that layer's Y_h (also rewritten here)."""
    from edgebuild.targets.tflite.rewrite.ops import gather_of_concat

    ins = [helper.make_tensor_value_info(f"h{i}", TensorProto.FLOAT, [s, 1, 4]) for i, s in enumerate(sizes)]
    nodes = [helper.make_node("Concat", [v.name for v in ins], ["hn"], axis=0, name="cat"),
             helper.make_node("Gather", ["hn", "k"], ["last"], axis=0, name="pick")]
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("last", TensorProto.FLOAT, [1, 4]),
                                            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [sum(sizes), 1, 4])],
                          [numpy_helper.from_array(np.array(index, np.int64), "k")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, note = gather_of_concat(onnx.load_from_string(m.SerializeToString()))
    assert note and not any(n.op_type == "Gather" and n.input[0] == "hn" for n in out.graph.node)
    rng = np.random.default_rng(3)
    feed = {v.name: rng.normal(size=(s, 1, 4)).astype(np.float32) for v, s in zip(ins, sizes)}
    sess = [ort.InferenceSession(x.SerializeToString(), providers=["CPUExecutionProvider"]) for x in (out, m)]
    for a, b in zip(*(s.run(None, feed) for s in sess)):
        np.testing.assert_array_equal(a, b)


def test_prelu_int8_and_maxpool_same_match_onnxruntime():
    """PRelu -> x + (1 - a) * Relu(-x) (INT8 only: XNNPACK has no int8 PRELU); MaxPool(3, 2, ceil_mode) on an even
    size -> SAME pooling (XNNPACK has no MIRROR_PAD, the edge pad's op)."""
    from edgebuild.targets.tflite.rewrite.pooling import maxpool_edge_padding
    from edgebuild.targets.tflite.rewrite.xnnpack import prelu_int8

    rng = np.random.default_rng(4)
    slope = rng.uniform(0.05, 0.4, (3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("PRelu", ["x", "slope"], ["p"], name="prelu"),
             helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, name="pool")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5, 5])],
                          [numpy_helper.from_array(slope, "slope")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, note = prelu_int8(onnx.load_from_string(m.SerializeToString()))
    out, pool_note = maxpool_edge_padding(out)
    assert note and "pool (SAME)" in pool_note
    assert {n.op_type for n in out.graph.node} == {"Relu", "Mul", "Add", "MaxPool"}  # x + (1 - a) * Relu(-x)
    assert rewrite(onnx.load_from_string(m.SerializeToString()))[0].graph.node[0].op_type == "PRelu"  # FP32 keeps it
    for _ in range(3):
        feed = {"x": rng.normal(size=(1, 3, 10, 10)).astype(np.float32)}
        np.testing.assert_allclose(run(out, feed), run(m, feed), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("opset", [9, 17])
def test_hard_activations_int8_match_onnxruntime(opset):
    """HardSwish -> x * Clip(x + 3, 0, 6) / 6, HardSigmoid -> Clip(6a x + 6b, 0, 6) / 6 (INT8 only: XNNPACK has no
    int8 HARD_SWISH or RELU_0_TO_1, PP-LCNet's INT8 ran at 0.38x FP32 in 32 partitions)."""
    from edgebuild.targets.tflite.rewrite.xnnpack import hard_activations_int8

    nodes = [helper.make_node("HardSigmoid", ["x"], ["s"], alpha=0.25, beta=0.4, name="hsig")]
    if opset >= 14:
        nodes.append(helper.make_node("HardSwish", ["s"], ["y"], name="hswish"))
    else:
        nodes.append(helper.make_node("Mul", ["s", "x"], ["y"], name="mul"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 50])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 50])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    out, note = hard_activations_int8(onnx.load_from_string(m.SerializeToString()))
    assert note and not {"HardSwish", "HardSigmoid"} & {n.op_type for n in out.graph.node}
    onnx.checker.check_model(out)
    x = np.linspace(-8, 8, 100, dtype=np.float32).reshape(2, 50)
    np.testing.assert_allclose(run(out, {"x": x}), run(m, {"x": x}), rtol=1e-6, atol=1e-6)


def test_decomposed_hardswish_int8_matches_onnxruntime():
    """PaddlePaddle's hard_swish, Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6), -> Mul(Mul(x, 1/6), Clip(...)) (TFLite folds
    the first form into HARD_SWISH, which XNNPACK does not run in int8: PP-OCR's classifier kept 18)."""
    from edgebuild.targets.tflite.rewrite.xnnpack import hard_activations_int8

    f = lambda v, n: numpy_helper.from_array(np.array(v, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Add", ["x", "three"], ["a"], name="Add@0"),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="Clip@0"),
             helper.make_node("Mul", ["x", "c"], ["m"], name="Mul@0"),
             helper.make_node("Div", ["m", "six"], ["y"], name="Div@0")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 50])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 50])],
                          [f(3, "three"), f(0, "zero"), f(6, "six")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 7
    out, note = hard_activations_int8(onnx.load_from_string(m.SerializeToString()))
    assert note and "1 node(s)" in rewrite(onnx.load_from_string(m.SerializeToString()), "int8")[1][0]
    assert [n.op_type for n in out.graph.node] == ["Add", "Clip", "Mul", "Mul"] and out.graph.node[-1].output[0] == "y"
    x = np.linspace(-8, 8, 100, dtype=np.float32).reshape(2, 50)
    np.testing.assert_allclose(run(out, {"x": x}), run(m, {"x": x}), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("producer", ["Relu", "Clip", "Neg"])
def test_maxpool_ceil_pad_is_zero_after_a_nonnegative_op(producer):
    """MaxPool(4, 2, ceil_mode) on an odd size (not TF's SAME split): after Relu/Clip(0, ..) a zero Pad (TFLite PAD,
    which XNNPACK runs; the real nsfw-resnet's two edge pads were MIRROR_PAD fallbacks and cut 3 partitions), else
    the edge Pad; both exact."""
    from edgebuild.targets.tflite.rewrite.pooling import maxpool_edge_padding

    rng = np.random.default_rng(5)
    first = (helper.make_node("Clip", ["x", "lo"], ["r"], name="act") if producer == "Clip"
             else helper.make_node(producer, ["x"], ["r"], name="act"))
    nodes = [first, helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[4, 4], strides=[2, 2], ceil_mode=1,
                                     name="pool")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 11, 11])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5, 5])],
                          [numpy_helper.from_array(np.array(0.0, np.float32), "lo")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, note = maxpool_edge_padding(onnx.load_from_string(m.SerializeToString()))
    pads = [n for n in out.graph.node if n.op_type == "Pad"]
    mode = {a.name: a.s for a in pads[0].attribute}["mode"]
    assert mode == (b"edge" if producer == "Neg" else b"constant"), (producer, mode, note)
    for _ in range(3):
        feed = {"x": rng.normal(size=(1, 3, 11, 11)).astype(np.float32)}
        np.testing.assert_array_equal(run(out, feed), run(m, feed))


@pytest.mark.parametrize("producer", ["Relu", "Neg"])
def test_models_own_edge_pad_before_maxpool_is_zero_after_relu(producer):
    """Relu -> Transpose -> Pad(edge) -> MaxPool (a TF-exported ResNet's stem, yahoo-open-nsfw): the edge pad becomes a
    zero pad where its input is >= 0 (exact), else it stays."""
    from edgebuild.targets.tflite.rewrite.pooling import edge_pad_before_maxpool

    rng = np.random.default_rng(6)
    nodes = [helper.make_node(producer, ["x"], ["r"], name="act"),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 3, 1, 2], name="nchw"),
             helper.make_node("Pad", ["t", "pads"], ["p"], mode="edge", name="pad"),
             helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2], name="pool")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10, 10, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
                          [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, note = edge_pad_before_maxpool(onnx.load_from_string(m.SerializeToString()))
    mode = {a.name: a.s for a in next(n for n in out.graph.node if n.op_type == "Pad").attribute}["mode"]
    assert (mode == b"constant" and "pad" in note) if producer == "Relu" else (mode == b"edge" and note is None)
    for _ in range(3):
        feed = {"x": rng.normal(size=(1, 10, 10, 4)).astype(np.float32)}
        np.testing.assert_array_equal(run(out, feed), run(m, feed))


def test_scalar_affine_becomes_a_depthwise_conv():
    """Add(Mul(x, s), b) with scalars (PP-LCNetV3's learnable affine block) -> a 1x1 depthwise Conv, INT8 only: a
    shift far below the tensor's range made int8 ADDs XNNPACK refuses (the real PP-OCRv4 detector: 4 fallbacks)."""
    from edgebuild.targets.tflite.rewrite.xnnpack import scalar_affine_int8

    rng = np.random.default_rng(7)
    shift = helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.array(-8.8e-5, np.float32)))
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="act"), shift,
             helper.make_node("Mul", ["r", "s"], ["m"], name="scale"),
             helper.make_node("Add", ["b", "m"], ["y"], name="shift")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 6, 6])],
                          [numpy_helper.from_array(np.array(1.37, np.float32), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, note = scalar_affine_int8(onnx.load_from_string(m.SerializeToString()))
    assert note and [n.op_type for n in out.graph.node if n.op_type != "Constant"] == ["Relu", "Conv"]
    assert out.graph.node[-1].name == "shift" and out.graph.node[-1].output[0] == "y"  # name kept for float_layers
    assert "Conv" not in {n.op_type for n in rewrite(onnx.load_from_string(m.SerializeToString()))[0].graph.node}
    for _ in range(3):
        feed = {"x": rng.normal(0, 20, size=(1, 5, 6, 6)).astype(np.float32)}
        np.testing.assert_allclose(run(out, feed), run(m, feed), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("factor,coords,rounding,opset", [(2, "asymmetric", "floor", 12), (8, "asymmetric", "floor", 13),
                                                          (4, "half_pixel", "round_prefer_floor", 13),
                                                          (3, "pytorch_half_pixel", "round_prefer_ceil", 18),
                                                          (2, "half_pixel", "floor", 13)])
def test_nearest_upsample_is_concat_and_depth_to_space(factor, coords, rounding, opset):
    """Resize(nearest, integer factor) -> Concat of k*k copies + DepthToSpace(k) (INT8 only: XNNPACK has no
    RESIZE_NEAREST_NEIGHBOR; the real PP-OCRv4 detector had 6 on LiteRT's kernels); half_pixel + floor is not a
    plain repeat and stays."""
    from edgebuild.targets.tflite.rewrite.xnnpack import nearest_upsample_int8

    rng = np.random.default_rng(8)
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="act"),
         helper.make_node("Resize", ["r", "roi", "scales"], ["y"], mode="nearest", coordinate_transformation_mode=coords,
                          nearest_mode=rounding, name="up")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5 * factor, 4 * factor])],
        [numpy_helper.from_array(np.array([1, 1, factor, factor], np.float32), "scales"),
         numpy_helper.from_array(np.zeros(0, np.float32), "roi")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    out, note = nearest_upsample_int8(onnx.load_from_string(m.SerializeToString()))
    ops = [n.op_type for n in out.graph.node]
    if rounding == "floor" and coords != "asymmetric":
        assert note is None and "Resize" in ops
        return
    steps = {2: 1, 4: 2, 8: 3, 3: 1}[factor]  # powers of two as x2 steps; XNNPACK concatenates <= 5 inputs
    assert ops == ["Relu"] + ["Concat", "Concat", "DepthToSpace"] * steps and f"up (x{factor})" in note
    assert max(len(n.input) for n in out.graph.node) <= 5
    assert out.graph.node[-1].name == "up"
    for _ in range(2):
        feed = {"x": rng.normal(size=(1, 3, 5, 4)).astype(np.float32)}
        np.testing.assert_array_equal(run(out, feed), run(m, feed))


def flat_scatter_model(path, data_shape, x_shape, data_is_input: bool):
    """bins = floor(clip(x * depth, 0, depth - 1)) scattered (add) with the updates x itself along the last axis: a
    histogram that weights each sample by its value. Shapes chosen so the one-hot rewrite cannot take it."""
    depth = data_shape[-1]
    f = lambda v, n: numpy_helper.from_array(np.array(v, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Mul", ["x", "depth"], ["xs"], name="scale"),
             helper.make_node("Clip", ["xs", "lo", "hi"], ["xc"], name="clip"),
             helper.make_node("Floor", ["xc"], ["xf"], name="floor"),
             helper.make_node("Cast", ["xf"], ["bins"], to=TensorProto.INT64, name="bins"),
             helper.make_node("ScatterElements", ["data", "bins", "x"], ["hist"], axis=-1, reduction="add",
                              name="histogram")]
    inits = [f(depth, "depth"), f(0, "lo"), f(depth - 1, "hi")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    if data_is_input:
        inputs.append(helper.make_tensor_value_info("data", TensorProto.FLOAT, list(data_shape)))
    else:
        inits.append(numpy_helper.from_array(np.zeros(data_shape, np.float32), "data"))
    g = helper.make_graph(nodes, "flat", inputs, [helper.make_tensor_value_info("hist", TensorProto.FLOAT, list(data_shape))],
                          inits)
    return _saved(g, path)


@pytest.mark.slow
@pytest.mark.parametrize("data_shape,x_shape,data_is_input", [
    ((1, 80, 4), (1, 80, 10), False),  # 80 rows (> SCATTER_MAX_ROWS), more updates than bins: sliced
    ((1, 6, 50), (1, 3, 4), True),     # indices smaller than data on another axis, fewer updates than bins: padded
])
def test_big_scatter_add_is_one_flat_scatter_exact_in_litert(tmp_path, data_shape, x_shape, data_is_input):
    """A scatter-add the one-hot cannot take (TransNetV2's colour histogram: 129,600 updates into 51,200 bins) is one
    flat MaxUnpool, which onnx2tf makes a TFLite SCATTER_ND that sums duplicates: LiteRT matches onnxruntime on the
    original ScatterElements, duplicates included."""
    pytest.importorskip("onnx2tf")
    from edgebuild.targets.tflite.backend import TFLiteRunner
    from tests.targets.test_tflite_conformance import calibration, convert, model_input

    mi = model_input(flat_scatter_model(tmp_path / "flat.onnx", data_shape, x_shape, data_is_input))
    rewritten, notes = rewrite(onnx.load(str(mi.onnx_path)))
    assert any("histogram (add, flat)" in n for n in notes), notes
    assert "MaxUnpool" in {n.op_type for n in rewritten.graph.node}
    art = convert(mi, calibration(mi), tmp_path, precision="fp32")
    assert "SCATTER_ND" in {op.split()[0] for op in art.settings["device_requires"]["builtin_ops"]}
    runner = TFLiteRunner(art.path, art.io, 2, "xnnpack")
    sess = ort.InferenceSession(str(mi.onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(9)
    for _ in range(3):
        feed = {"x": rng.uniform(-0.1, 1.1, x_shape).astype(np.float32)}  # clipped ends: many duplicates
        if data_is_input:
            feed["data"] = rng.normal(size=data_shape).astype(np.float32)
        got, want = runner.run(feed)[0], sess.run(None, feed)[0]
        np.testing.assert_allclose(np.reshape(got, want.shape), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "max_ceil_padded", "avg_exclude_pad"])
def test_frame_pool_as_2d_matches_onnxruntime(tmp_path, pool):
    """A 3-D pool with kernel 1 over frames (TransNetV2's AvgPool3d((1, 2, 2)); onnx2tf: "Index out of range using input
    dim 5") -> Reshape, 2-D pool, Reshape: exact for every padding, ceil_mode and count_include_pad (the average up to
    float summation order)."""
    import torch

    from edgebuild.targets.tflite.rewrite.pooling import frame_pool_as_2d

    layer = {"avg": torch.nn.AvgPool3d((1, 2, 2)),
             "max_ceil_padded": torch.nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1), ceil_mode=True),
             "avg_exclude_pad": torch.nn.AvgPool3d((1, 3, 2), (1, 2, 2), padding=(0, 1, 0), count_include_pad=False)}[pool]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, padding=1), layer, torch.nn.MaxPool3d((2, 1, 1)))
    torch.onnx.export(net, (torch.zeros(1, 3, 6, 9, 10),), str(tmp_path / "p.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"])
    m = onnx.load(str(tmp_path / "p.onnx"))
    out, note = frame_pool_as_2d(onnx.load(str(tmp_path / "p.onnx")))
    assert note and note.count("Pool") == 1, note  # the (2, 1, 1) pool over frames is not one of them
    pools = [n for n in out.graph.node if n.op_type.endswith("Pool")]
    assert sorted(len(next(a.ints for a in n.attribute if a.name == "kernel_shape")) for n in pools) == [2, 3]
    onnx.checker.check_model(out)
    rng = np.random.default_rng(10)
    for _ in range(3):
        feed = {"x": rng.normal(size=(1, 3, 6, 9, 10)).astype(np.float32)}
        np.testing.assert_allclose(run(out, feed), run(m, feed), rtol=1e-6, atol=1e-6)


def _video_net():
    """TransNetV2's dilated block in small: Conv3d (3, 1, 1) dilated 1, 2, 4 over frames beside a (1, 3, 3) conv,
    then AvgPool3d((1, 2, 2))."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.space = nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
            self.time = nn.ModuleList(nn.Conv3d(4, 4, (3, 1, 1), dilation=(d, 1, 1), padding=(d, 0, 0)) for d in (1, 2, 4))
            self.pool = nn.AvgPool3d((1, 2, 2))

        def forward(self, x):
            s = torch.relu(self.space(x))
            return self.pool(torch.cat([t(s) for t in self.time], 1))

    return Block().eval()


def test_frame_taps_matches_onnxruntime(tmp_path):
    import torch

    from edgebuild.targets.tflite.rewrite.conv import frame_taps, frames_conv_as_2d

    torch.onnx.export(_video_net(), (torch.zeros(1, 3, 10, 8, 8),), str(tmp_path / "v.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"])
    m = onnx.load(str(tmp_path / "v.onnx"))
    out, note = frame_taps(onnx.load(str(tmp_path / "v.onnx")))
    assert note and all(f"(dilation {d})" in note for d in (1, 2, 4)), note
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert all(list(next(a.ints for a in n.attribute if a.name == "dilations")) == [1, 1, 1] for n in convs[2:])
    assert len(convs) == 4 and {n.name for n in convs} == {n.name for n in m.graph.node if n.op_type == "Conv"}
    onnx.checker.check_model(out)
    flat, note2d = frames_conv_as_2d(onnx.load_from_string(out.SerializeToString()))
    assert note2d and note2d.endswith("4 node(s)"), note2d  # every conv now has kernel 1 over frames
    assert all(len(next(a.ints for a in n.attribute if a.name == "kernel_shape")) == 2
               for n in flat.graph.node if n.op_type == "Conv")
    onnx.checker.check_model(flat)
    rng = np.random.default_rng(11)
    for _ in range(3):
        feed = {"x": rng.normal(size=(1, 3, 10, 8, 8)).astype(np.float32)}
        np.testing.assert_allclose(run(out, feed), run(m, feed), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(run(flat, feed), run(m, feed), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_video_block_converts_to_tflite_fp32_and_int8(tmp_path):
    """Before: onnx2tf failed on the AvgPool3d ("Index out of range using input dim 5"), and past it TFLite had no
    5-D SpaceToBatchND for the dilated conv3d: neither precision converted (TransNetV2: exit 3)."""
    pytest.importorskip("onnx2tf")
    import torch

    from tests.targets.test_tflite_conformance import calibration, convert, fidelity, model_input

    path = tmp_path / "video.onnx"
    torch.onnx.export(_video_net(), (torch.zeros(1, 3, 10, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    mi = model_input(path)
    calib = calibration(mi)
    fp32 = convert(mi, calib, tmp_path / "fp32", precision="fp32")
    notes = " ".join(fp32.settings["onnx_rewrites"])
    assert "over several frames" in notes and "3-D pooling" in notes and "2-D convolution of every frame" in notes, notes
    assert fidelity(fp32, mi, calib) > 0.99999
    int8 = convert(mi, calib, tmp_path / "int8")
    assert fidelity(int8, mi, calib) > 0.98
    # every conv is a CONV_2D, int8 and on XNNPACK (TFLite's CONV_3D has neither): the artifact is all-INT8
    ops = {op.split()[0] for op in int8.settings["device_requires"]["builtin_ops"]}
    assert "CONV_2D" in ops and "CONV_3D" not in ops, ops
    assert not int8.settings.get("float_ops_kept"), int8.settings.get("float_ops_kept")
