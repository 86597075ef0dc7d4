"""Issue 28 (INT8 that is faster than FP32 on ONNX Runtime): HardSigmoid / HardSwish gates become int8 Add -> Clip
with their slope folded into a scale (targets/onnx/hard_gates.py) — exact in float, no float gate left between the
int8 layers, and the same accuracy as onnxruntime's own QDQ."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto as T, helper as h, numpy_helper as nh  # noqa: E402

from edgebuild.calibration.dataset import SampleSet  # noqa: E402

C = 8
GATES = ("HardSigmoid", "HardSwish", "Div")


def _mobile_net(path):
    """The gate forms of MobileNetV3 / PP-LCNet exports: Conv -> x * clip(x + 3, 0, 6) / 6 -> Conv -> HardSwish op ->
    depthwise Conv -> squeeze-excite with HardSigmoid(0.2, 0.5) (Paddle's slope) -> Conv -> x * HardSigmoid(x)
    (onnxruntime's inlined HardSwish) -> global pool."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, value):
        inits.append(nh.from_array(np.asarray(value, np.float32), name))
        return name

    def conv(name, src, cin, cout=C, group=1, k=1):
        w = rng.normal(0, 1 / np.sqrt(cin * k * k / group), (cout, cin // group, k, k)).astype(np.float32)
        nodes.append(h.make_node("Conv", [src, const(f"{name}.w", w), const(f"{name}.b", rng.normal(0, 0.5, cout))],
                                 [name], name=name, group=group, pads=[k // 2] * 4))
        return name

    x = conv("conv0", "input", 3)
    nodes += [h.make_node("Add", [x, const("three", 3.0)], ["a0"], name="hs0/add"),
              h.make_node("Clip", ["a0", const("zero", 0.0), const("six", 6.0)], ["c0"], name="hs0/clip"),
              h.make_node("Mul", [x, "c0"], ["m0"], name="hs0/mul"), h.make_node("Div", ["m0", "six"], ["y0"], name="hs0/div")]
    x = conv("conv1", "y0", C)
    nodes.append(h.make_node("HardSwish", [x], ["y1"], name="hs_op"))
    d = conv("dw", "y1", C, group=C, k=3)
    nodes.append(h.make_node("GlobalAveragePool", [d], ["se_in"], name="se/pool"))
    s = conv("se/fc", "se_in", C)
    nodes += [h.make_node("HardSigmoid", [s], ["se_gate"], name="se/gate", alpha=0.2, beta=0.5),
              h.make_node("Mul", [d, "se_gate"], ["se_out"], name="se/mul")]
    x = conv("conv2", "se_out", C)
    nodes += [h.make_node("HardSigmoid", [x], ["g2"], name="hs2/gate", alpha=1 / 6, beta=0.5),
              h.make_node("Mul", [x, "g2"], ["y2"], name="hs2/mul"),
              h.make_node("GlobalAveragePool", ["y2"], ["out"], name="pool")]
    graph = h.make_graph(nodes, "mobile", [h.make_tensor_value_info("input", T.FLOAT, [1, 3, 16, 16])],
                         [h.make_tensor_value_info("out", T.FLOAT, [1, C, 1, 1])], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def _samples(n, seed):
    return np.random.default_rng(seed).normal(0, 1, (n, 1, 3, 16, 16)).astype(np.float32)


def _outputs(path, xs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x})[0] for x in xs])


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_the_gates_are_rewritten_exactly_in_float(tmp_path):
    from edgebuild.targets.onnx.hard_gates import decompose

    src = _mobile_net(tmp_path / "m.onnx")
    out = tmp_path / "gates.onnx"
    assert decompose(src, out, skip=set()) == 4  # the Div form, the HardSwish op and both HardSigmoids
    assert not set(GATES) & set(_ops(out))
    xs = _samples(8, 3)
    np.testing.assert_allclose(_outputs(out, xs), _outputs(src, xs), rtol=1e-5, atol=1e-6)
    # a layer the settings keep in float is left as it is
    assert decompose(src, tmp_path / "skip.onnx", skip={"hs_op"}) == 3
    assert "HardSwish" in _ops(tmp_path / "skip.onnx")


def test_static_int8_runs_no_float_gate_and_keeps_the_accuracy(tmp_path):
    from edgebuild.targets.onnx.coverage import coverage_note, runtime_ops
    from edgebuild.targets.onnx.hard_gates import MARK
    from edgebuild.targets.onnx.static import quantize_static

    src = _mobile_net(tmp_path / "m.onnx")
    calib = SampleSet("calib", {"input": _samples(32, 1)[:, 0]})
    on, off = tmp_path / "on.onnx", tmp_path / "off.onnx"
    (tmp_path / "w1").mkdir(), (tmp_path / "w2").mkdir()
    quantize_static(src, on, calib, {}, tmp_path / "w1")  # int8_gates is on by default
    quantize_static(src, off, calib, {"int8_gates": False}, tmp_path / "w2")
    graph = onnx.load(str(on)).graph
    assert not set(GATES) & {n.op_type for n in graph.node}
    assert not [n.name for n in graph.node if n.name.endswith(MARK)], "every gate's slope is folded into a scale"
    # what onnxruntime runs (targets/onnx/coverage.py): its own QDQ leaves the gates float (HardSigmoid and the Div
    # between a DQ and a Q); with the rewrite every gate is a QLinearAdd and no op runs in float
    assert runtime_ops(off)["float_ops"] == {"HardSigmoid": 3, "Div": 1}
    assert runtime_ops(on) == {"int8": runtime_ops(on)["int8"], "float": 0, "float_ops": {}}
    assert runtime_ops(on)["int8"] > runtime_ops(off)["int8"]
    assert coverage_note(on).endswith("no float op between them")
    xs = _samples(16, 2)
    ref = _outputs(src, xs)

    def sqnr(y):
        return 10 * np.log10((ref ** 2).sum() / ((y - ref) ** 2).sum())

    assert sqnr(_outputs(on, xs)) > 20
    assert sqnr(_outputs(on, xs)) > sqnr(_outputs(off, xs)) - 1.0
