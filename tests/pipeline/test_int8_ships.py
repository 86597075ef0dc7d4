"""INT8 that ships (issue 28): the task decides, quality loss on one scale, what ships, names that tell the truth.

The models are built here (tiny torch modules); their FP32 outputs are the reference, and an "artifact" is either
the model's outputs with a known, INT8-sized error added (unit tests of the gate) or a real onnx-cpu build.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgebuild.pipeline.stages import validate as V
from edgebuild.pipeline.results import SearchRecord, SearchTry
from edgebuild.targets.settings import OnnxSettings, OpenVinoSettings
from edgebuild.pipeline.stages.validate import Budget, Judging, compare, judge

BUDGET = Budget(max_accuracy_drop=0.5, max_latency_ms=None, max_size_mb=None, min_cosine=None)


def _two_head(n: int = 60):
    """A face-net-like model: class scores (softmax) and a small box-offset regression head; inputs of very
    different energy (quiet and loud samples). Returns (reference outputs per sample, labels)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    cls, box = nn.Linear(32, 4), nn.Linear(32, 4)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (n, 16)).astype(np.float32)
    x *= np.where(np.arange(n) % 3 == 0, 0.15, 1.0)[:, None].astype(np.float32)  # a third are quiet samples
    with torch.no_grad():
        h = body(torch.from_numpy(x))
        logits = cls(h) * 8.0
        probs = torch.softmax(logits, 1).numpy()
        offsets = (box(h) * 0.02).numpy()  # offsets near zero, as a centred face's box regression
    return [[probs[i:i + 1], offsets[i:i + 1]] for i in range(n)], probs.argmax(1)


def _int8_like(reference, noise: float, seed: int = 1):
    """The reference with an error of fixed absolute size on the regression head (what an int8 scale leaves)."""
    rng = np.random.default_rng(seed)
    return [[p, b + rng.normal(0, noise, b.shape).astype(np.float32)] for p, b in reference]


def test_task_perfect_int8_is_not_vetoed_by_the_per_sample_cosine_of_quiet_samples():
    ref, labels = _two_head()
    out = _int8_like(ref, 4e-4)
    names = ("prob", "box")
    # without a task metric (no labels), today's generic gate judges the worst sample: it fails on the quiet ones
    m_generic = compare(ref, out, None, Judging(output_names=names, task="regression"))
    assert V.decided_by(m_generic, "regression") is None
    generic = judge(m_generic, None, None, BUDGET, "regression")
    assert any(f.metric == "box.cosine" for f in generic), generic
    # with labels, accuracy decides: the box head is only guarded against collapse (energy-weighted, over the set)
    m = compare(ref, out, labels, Judging(output_names=names))
    assert m.accuracy_drop == 0.0 and m.outputs["box"].get("cosine") < 0.99 < m.outputs["box"].get("cosine_energy")
    assert judge(m, None, None, BUDGET) == []
    g = V.gate(m, BUDGET)
    assert g["decided_by"] == V.TASK and "accuracy" in g["metric"] and "collapse guard" in g["guard"]
    assert V.gate(m_generic, BUDGET, "regression")["decided_by"] == V.GENERIC


def test_no_false_pass_when_the_task_metric_collapses_or_an_unscored_output_collapses():
    ref, labels = _two_head()
    flipped = [[p[:, ::-1].copy(), b] for p, b in ref]  # class scores reversed: accuracy collapses
    fails = judge(compare(ref, flipped, labels, Judging(output_names=("prob", "box"))), None, None, BUDGET)
    assert any(f.metric == "prob.accuracy_drop" for f in fails), fails
    dead_box = [[p, np.zeros_like(b) + 0.01] for p, b in ref]  # the box head collapsed to a constant
    fails = judge(compare(ref, dead_box, labels, Judging(output_names=("prob", "box"))), None, None, BUDGET)
    assert [f.metric for f in fails] == ["box.cosine_energy", "box.sqnr_db"], fails


def test_a_channel_without_energy_never_decides():
    """A sentence encoder's embedding dimension of ~2e-8: FP16 flushes it; its SQNR is noise, not a failure."""
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 0.3, (40, 1, 32)).astype(np.float32)
    emb[:, :, 7] = rng.normal(0, 2e-8, (40, 1))
    out = emb + rng.normal(0, 1e-4, emb.shape).astype(np.float32)
    out[:, :, 7] = 0.0
    ref, art = [[e] for e in emb], [[o] for o in out]
    m = compare(ref, art, None, Judging(output_names=("emb",)))
    assert all(not g["judged"] for g in (m.outputs["emb"].groups or []) if g["slices"] == "7")
    assert judge(m, None, None, BUDGET) == []


def test_quality_loss_is_on_the_metric_resolution_one_sample_is_not_a_collapse():
    """27 samples: one sample is 3.7 pt. A selection budget of 0 pt missed by one sample is a loss of 1, not 3703."""
    ref, labels = _two_head(27)
    out = [list(s) for s in ref]
    i = int(np.flatnonzero(labels != 0)[0])
    p = out[i][0].copy()
    p[0, 0] = p.max() + 0.1
    out[i][0] = p / p.sum()
    m = compare(ref, out, labels, Judging(output_names=("prob", "box")))
    assert m.accuracy_drop == pytest.approx(100 / 27)
    tight = Budget(max_accuracy_drop=0.0, max_latency_ms=None, max_size_mb=None, min_cosine=None)
    loss = V.quality_loss(m, tight)
    assert 0.9 < loss < 1.1, loss
    from edgebuild.pipeline.stages.search import COLLAPSED_LOSS

    assert loss < COLLAPSED_LOSS
    # a real collapse (every sample wrong) is still far past the collapse line
    flipped = [[s[0][:, ::-1].copy(), s[1]] for s in ref]
    assert V.quality_loss(compare(ref, flipped, labels, Judging(output_names=("prob", "box"))), tight) > COLLAPSED_LOSS


def test_profile_latency_and_size_numbers_are_advice_only_user_budgets_fail_a_build(tmp_path):
    """A 3-D video CNN's 100-frame window takes more than the profile's typical 50 ms: a warning, never exit 1."""
    from edgebuild.pipeline.spec import BuildSpec
    from edgebuild.pipeline.stages.per_target import advice_warnings, budget_for
    from edgebuild.targets.profiles import catalogue, load_profile

    for name in ("onnx-cpu", "x86", "x86-fp16", "intel-n100", "jetson-orin", "nvidia-gpu", "arm64", "android-arm64"):
        profile = catalogue()[name]
        b = budget_for(profile, BuildSpec())
        assert b.max_latency_ms is None and b.max_size_mb is None, name  # nothing the user did not set
        assert b.max_accuracy_drop == 0.5
    profile = catalogue()["onnx-cpu"]
    assert profile.advice.max_latency_ms == 50

    class Art:
        size_bytes = 300_000_000

    class Chosen:
        p50_ms, artifact, memory = 120.0, Art(), {}

    warnings = advice_warnings(profile, budget_for(profile, BuildSpec()), Chosen())
    assert len(warnings) == 2 and "120.0 ms" in warnings[0] and "advice" in warnings[0]
    # the user's own budget is a budget: it fails the gate, and the advice says nothing more about it
    from dataclasses import replace

    from edgebuild.pipeline.spec import Budgets

    b = budget_for(profile, replace(BuildSpec(), budgets=Budgets(max_latency_ms=10)))
    assert b.max_latency_ms == 10 and len(advice_warnings(profile, b, Chosen())) == 1
    # a user's own profile file keeps its budgets binding; a bad advice key is bad input
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nbackend: onnx\ndescription: x\nbudgets: {max_latency_ms: 5}\nadvice: {max_size_mb: 3}\n")
    mine = load_profile(p)
    assert budget_for(mine, BuildSpec()).max_latency_ms == 5 and mine.advice.max_size_mb == 3
    p.write_text("name: mine\nbackend: onnx\ndescription: x\nadvice: {max_accuracy_drop: 3}\n")
    from edgebuild.errors import BadInputError

    with pytest.raises(BadInputError, match="advice takes"):
        load_profile(p)


def _big_float_layer_model(tmp_path):
    """A small conv front (int8) and a big fully-connected layer (87 % of the weights), as ONNX."""
    import torch
    from torch import nn

    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.stages.export import file_hash
    from edgebuild.targets.base import ExportedModel, TensorInfo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 64)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    fc = next(n.name for n in __import__("onnx").load(str(path)).graph.node if n.op_type == "Gemm")
    x = np.random.default_rng(0).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    calib = SampleSet("calib", {"x": x}, None, {}, {"x": (1, 3, 8, 8)})
    exported = ExportedModel(path, (TensorInfo("x", (1, 3, 8, 8), "float32", "NCHW"),),
                             (TensorInfo("y", (1, 64), "float32"),), 17, file_hash(path))
    return exported, calib, fc


def test_an_int8_file_whose_big_layer_stays_float_is_named_mixed_with_its_share(tmp_path):
    from edgebuild.pipeline.stages.weights import INT8_NAME_SHARE, rename_to_share, weight_share
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue

    exported, calib, fc = _big_float_layer_model(tmp_path)
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    full = backend.convert(exported, profile, "int8", calib, tmp_path / "full")
    share = weight_share(full.path, "onnx")
    assert share["int8_weight_share"] == 1.0 and rename_to_share(full, share) is None
    assert full.main == "model_int8_qdq.onnx"
    # the user keeps the big layer out of quantization, weights too: the file is INT8 in name only unless renamed
    art = backend.convert(exported, profile, "int8", calib, tmp_path / "big-float",
                          {"nodes_to_exclude": [fc], "weight_only": False})
    assert art.main == "model_int8_qdq.onnx"
    share = weight_share(art.path, "onnx")
    assert share["int8_weight_share"] < 0.2 < INT8_NAME_SHARE and share["float_layers"][0]["layer"] == fc
    note = rename_to_share(art, share)
    assert art.main == "model_int8_mixed_qdq.onnx" and art.path.is_file() and "of the weights are INT8" in note
    assert not (tmp_path / "big-float" / "model_int8_qdq.onnx").exists()
    # OpenVINO: the same measure on the IR
    ov = get_backend("openvino")
    ir = ov.convert(exported, catalogue()["x86"], "int8", calib, tmp_path / "ov")
    assert weight_share(ir.path, "openvino")["int8_weight_share"] == 1.0
    ir = ov.convert(exported, catalogue()["x86"], "int8", calib, tmp_path / "ov-f", {"ignored_scope": {"names": [fc]},
                                                                                      "weight_only": False})
    assert weight_share(ir.path, "openvino")["int8_weight_share"] < 0.2


def test_a_slower_artifact_does_not_ship_however_fast_fp32_is():
    """FP32 at 0.05 ms and INT8 at 0.76x on both timings: the FP32 baseline ships, as it would at 5 ms (no sub-ms
    exemption). Slower only at the profile's threads and not on one thread each (the host's load): the INT8 ships,
    and the record says both numbers."""
    from dataclasses import dataclass

    from edgebuild.pipeline.stages import objective as O
    from edgebuild.targets.profiles import catalogue

    @dataclass
    class Art:
        main: str
        precision: str
        size_bytes: int

    @dataclass
    class Att:
        artifact: Art
        loss: float = -0.5
        quality_ok: bool = True
        p50_ms: float | None = None

    int8, fp32 = Att(Art("model_int8_qdq.onnx", "int8", 100)), Att(Art("model_fp32.onnx", "fp32", 400), p50_ms=0.05)
    slow = {"median": 0.76, "p75": 0.78, "rounds": 12, "rounds_not_slower": 0, "p_slower": 0.0002}
    for ms in (0.05, 5.0):
        fp32.p50_ms = ms
        best, record = O.pick("precision", catalogue()["onnx-cpu"], int8, fp32, slow)
        assert best is fp32 and record.overruled
    both = {**slow, "single_thread": dict(slow, median=0.8)}
    best, record = O.pick("precision", catalogue()["onnx-cpu"], int8, fp32, both)
    assert best is fp32 and "0.80× on one thread" in record.why
    load = {**slow, "single_thread": {"median": 1.4, "p75": 1.5, "rounds": 12, "rounds_not_slower": 12, "p_slower": 1.0}}
    best, record = O.pick("precision", catalogue()["onnx-cpu"], int8, fp32, load)
    assert best is int8 and not record.overruled and "on one thread 1.40×" in record.why
    assert any("on one thread each 1.40×" in w for w in record.warnings)  # still said: slower at the profile's threads


def test_a_held_out_miss_tries_the_next_int8_candidate_before_fp16(monkeypatch):
    """A CTC recogniser on x86: one INT8 variant passed the selection part and missed the held-out part; the next INT8
    candidate (preset=mixed) keeps the task. It is tried, judged on both parts, and ships: FP16 is never asked."""
    import time
    from types import SimpleNamespace

    from edgebuild.pipeline.stages import held_out as H
    from edgebuild.pipeline.stages.search_state import Search

    art = lambda p: SimpleNamespace(precision=p)  # noqa: E731
    best = SimpleNamespace(artifact=art("int8"), label="full bias correction", quality_ok=True)
    missed = SimpleNamespace(artifact=art("int8"), label=best.label, quality_ok=False, failures=["cosine 0.9857 < 0.99"])
    backend = SimpleNamespace(requested_settings=lambda profile: OpenVinoSettings(preset="performance"),
                              recovery_candidates=lambda profile, s: [
                                  ("full bias correction", s.replace(fast_bias_correction=False)),
                                  ("asymmetric activations (preset=mixed)", s.replace(preset="mixed"))])
    profile = SimpleNamespace(allow_float_layers=True, precisions=("int8", "fp16"))
    s = Search.__new__(Search)
    s.record, s.tries, s.deadline, s.durations = SearchRecord(tries=[SearchTry("full bias correction")]), [best], time.monotonic() + 99, []
    asked = []

    def attempt(label, precision, settings, fallback=False):
        asked.append((precision, settings and settings.preset))  # a whole, typed Settings (None: the profile's)
        return SimpleNamespace(artifact=art(precision), label=label, quality_ok=True)

    s.attempt = attempt
    monkeypatch.setattr(H, "install", lambda ctx, backend, profile, budget, a, outdir, holdout:
                        SimpleNamespace(artifact=a.artifact, quality_ok=True, label=None))
    shipped = H.held_out_miss(None, backend, profile, None, s, best, missed, None, None)
    assert asked == [("int8", "mixed")] and shipped.artifact.precision == "int8"
    assert "preset=mixed" in s.record.chosen and "instead" in s.record.held_out_miss
    # when the next INT8 candidate misses the held-out part too, FP16 comes
    asked.clear()
    monkeypatch.setattr(H, "install", lambda ctx, backend, profile, budget, a, outdir, holdout:
                        SimpleNamespace(artifact=a.artifact, quality_ok=a.artifact.precision == "fp16", label=None,
                                        failures=["x"]))
    shipped = H.held_out_miss(None, backend, profile, None, s, best, missed, None, None)
    assert asked == [("int8", "mixed"), ("fp16", None)] and shipped.artifact.precision == "fp16"


def test_int8_weight_range_follows_the_instruction_set_and_is_recorded(tmp_path):
    """7-bit weights (reduce_range / overflow_fix) only where the CPU has no VNNI/AMX; the record says which ISA."""
    from edgebuild.targets import isa
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue

    avx2 = tmp_path / "avx2"
    avx2.write_text("processor : 0\nflags : fpu sse avx avx2 fma\n")
    vnni = tmp_path / "vnni"
    vnni.write_text("processor : 0\nflags : fpu avx2 avx512f avx512bw avx512_vnni\n")
    assert isa.host_isa(avx2)["vnni"] is False and isa.host_isa(vnni)["vnni"] is True
    assert isa.resolve("reduce_range", "auto", isa.host_isa(avx2))[0] is True
    value, record = isa.resolve("reduce_range", "auto", isa.host_isa(vnni))
    assert value is False and record["chose"] == {"reduce_range": False} and "avx512_vnni" in record["flags"]
    assert isa.resolve("overflow_fix", "auto", isa.host_isa(vnni))[0] == "disable"
    assert isa.resolve("overflow_fix", "auto", isa.host_isa(avx2))[0] == "enable"
    assert isa.resolve("reduce_range", True) == (True, None)  # a profile's explicit choice stands
    # the host-is-device profiles ask for auto; the artifact records what the host's ISA chose
    assert catalogue()["onnx-cpu"].quant["reduce_range"] == "auto" and catalogue()["x86"].quant["overflow_fix"] == "auto"
    exported, calib, _ = _big_float_layer_model(tmp_path)
    art = get_backend("onnx").convert(exported, catalogue()["onnx-cpu"], "int8", calib, tmp_path / "o")
    host = isa.host_isa()
    assert art.settings["reduce_range"] is (not host["vnni"]) and art.settings["isa"]["source"].startswith("host")
    # the record fed back (the accuracy search does) is accepted
    get_backend("onnx").requested_settings(catalogue()["onnx-cpu"], art.settings)


def test_a_stacked_lstm_ships_int8_weights_on_onnx_cpu(tmp_path):
    """A speaker-encoder-like 3-layer LSTM (95 % of the weights): static QDQ alone left it float and the file was INT8
    in name only; now its weights are int8 (DynamicQuantizeLSTM), it stays faithful, and its name is earned."""
    import onnx
    import torch
    from torch import nn

    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.stages.export import file_hash
    from edgebuild.pipeline.stages.weights import weight_share
    from edgebuild.similarity import cosine
    from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
    from edgebuild.targets.onnx import OrtRunner
    from edgebuild.targets.profiles import catalogue

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.lstm, self.out = nn.Linear(20, 32), nn.LSTM(32, 96, num_layers=3, batch_first=True), nn.Linear(96, 16)

        def forward(self, x):
            h, _ = self.lstm(torch.relu(self.inp(x)))
            return self.out(h[:, -1])

    path = tmp_path / "lstm.onnx"
    torch.onnx.export(Encoder().eval(), (torch.zeros(1, 12, 20),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    x = np.random.default_rng(0).normal(0, 1, (48, 12, 20)).astype(np.float32)
    calib = SampleSet("calib", {"x": x[:32]}, None, {}, {"x": (1, 12, 20)})
    exported = ExportedModel(path, (TensorInfo("x", (1, 12, 20), "float32"),), (TensorInfo("y", (1, 16), "float32"),),
                             17, file_hash(path))
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    art = backend.convert(exported, profile, "int8", calib, tmp_path / "q")
    ops = [n.op_type for n in onnx.load(str(art.path)).graph.node]
    assert ops.count("DynamicQuantizeLSTM") == 3 and "LSTM" not in ops
    share = weight_share(art.path, "onnx")["int8_weight_share"]
    assert share >= 0.9 and art.main == "model_int8_qdq.onnx"
    assert any("LSTM layer(s) with int8 weights" in n for n in art.notes)
    with OrtRunner(path, 1) as ref, backend.runner(art, 1) as q:
        for i in range(32, 48):
            assert cosine(ref.run({"x": x[i:i + 1]})[0], q.run({"x": x[i:i + 1]})[0]) > 0.99
    # off (and no weight-only INT8 for it either): the LSTM stays float and the share says the file is not INT8
    flt = backend.convert(exported, profile, "int8", calib, tmp_path / "f", {"quantize_recurrent": False,
                                                                            "weight_only": False})
    assert weight_share(flt.path, "onnx")["int8_weight_share"] < 0.1
    # x86: NNCF quantizes the LSTMSequence weights of the OpenVINO IR
    ir = get_backend("openvino").convert(exported, catalogue()["x86"], "int8", calib, tmp_path / "ov")
    assert weight_share(ir.path, "openvino")["int8_weight_share"] >= 0.9 and ir.main == "model_int8.xml"


def _conv_bn_paddle_like(tmp_path):
    """PP-OCR's shape: Conv + BatchNormalization pairs with exporter-made names (Conv@0, conv2d_53.tmp_0). OpenVINO
    folds each BatchNormalization into its Convolution and names the result Multiply_NNNN: no ONNX name survives."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, (cin, cout) in enumerate([(3, 8), (8, 8)]):
        w = rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}_weights")]
        for k, v in (("scale", 1 + rng.random(cout)), ("bias", rng.normal(0, 0.1, cout)),
                     ("mean", rng.normal(0, 0.1, cout)), ("var", 0.5 + rng.random(cout))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}_{k}"))
        nodes += [helper.make_node("Conv", [prev, f"conv{i}_weights"], [f"conv2d_{53 + i}.tmp_0"], f"Conv@{i}", pads=[1] * 4),
                  helper.make_node("BatchNormalization", [f"conv2d_{53 + i}.tmp_0", f"bn{i}_scale", f"bn{i}_bias",
                                                          f"bn{i}_mean", f"bn{i}_var"], [f"batch_norm_{i}.tmp_3"],
                                   f"BatchNormalization@{i}"),
                  helper.make_node("Relu", [f"batch_norm_{i}.tmp_3"], [f"relu_{i}.tmp_0" if i == 0 else "y"], f"Relu@{i}")]
        prev = f"relu_{i}.tmp_0"
    graph = helper.make_graph(nodes, "paddle_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    path = tmp_path / "paddle.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    return path


def test_x86_float_island_finds_ops_openvino_renamed_and_changes_the_artifact(tmp_path):
    from types import SimpleNamespace

    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.stages.export import file_hash
    from edgebuild.pipeline.stages.mixed_precision import _same_files
    from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
    from edgebuild.targets.openvino import _int8_settings
    from edgebuild.targets.openvino_nncf import import_without_telemetry, onnx_outputs, resolve_float_scope
    from edgebuild.targets.profiles import catalogue

    path = _conv_bn_paddle_like(tmp_path)
    ov = import_without_telemetry("openvino")
    model = ov.convert_model(str(path))
    assert "Conv@0" not in {op.get_friendly_name() for op in model.get_ops()}  # the ONNX name is gone
    scope, notes = resolve_float_scope(model, _int8_settings({"float_layers": ["Conv@0"]}, "x86"), "x86",
                                       onnx_outputs(str(path)))
    conv = {op.get_friendly_name(): op.get_type_name() for op in model.get_ops()}
    assert any(conv.get(n) == "Convolution" for n in scope["names"]) and not notes
    x = np.random.default_rng(1).normal(0, 1, (16, 1, 3, 8, 8)).astype(np.float32)
    calib = SampleSet("calib", {"x": x[:, 0]}, None, {}, {"x": (1, 3, 8, 8)})
    exported = ExportedModel(path, (TensorInfo("x", (1, 3, 8, 8), "float32", "NCHW"),),
                             (TensorInfo("y", (1, 8, 8, 8), "float32"),), 11, file_hash(path))
    backend, x86 = get_backend("openvino"), catalogue()["x86"]
    plain = backend.convert(exported, x86, "int8", calib, tmp_path / "plain")
    island = backend.convert(exported, x86, "int8", calib, tmp_path / "island", {"float_layers": ["Conv@0"]})
    assert island.main == "model_int8_mixed.xml" and not _same_files(island, plain), "the island changed nothing"
    assert _same_files(plain, SimpleNamespace(directory=plain.directory, files=list(plain.files)))


def test_a_signal_processing_front_end_and_a_topk_tail_stay_float_from_the_start(tmp_path):
    import onnx
    import torch
    from torch import nn

    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.stages.export import file_hash
    from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
    from edgebuild.targets.profiles import catalogue
    from edgebuild.targets.regions import MIN_REGION, float_regions

    class Audio(nn.Module):
        """A log-power 'spectrogram' built from ops (frames, window, square, sum of bands, log), then a CNN, then TopK."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.window = nn.Parameter(torch.hann_window(32), requires_grad=False)
            self.conv = nn.Conv1d(8, 16, 3, padding=1)
            self.head = nn.Linear(16 * 15, 40)

        def forward(self, x):  # x [1, 256]
            frames = torch.stack([x[:, i * 16:i * 16 + 32] for i in range(15)], 1) * self.window  # [1, 15, 32]
            power = frames.pow(2)
            bands = torch.stack([power[..., 4 * b:4 * b + 4].sum(-1) for b in range(8)], 1)  # [1, 8, 15]
            feats = torch.log(bands + 1e-3)
            h = torch.relu(self.conv(feats)).flatten(1)
            return torch.topk(self.head(h), 5).values

    path = tmp_path / "audio.onnx"
    torch.onnx.export(Audio().eval(), (torch.zeros(1, 256),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    regions = float_regions(path)
    assert len(regions["frontend"]) >= MIN_REGION and regions["postprocess"], regions
    graph = onnx.load(str(path)).graph
    assert not any(n.op_type == "Conv" for n in graph.node if n.name in regions["frontend"])
    x = np.random.default_rng(0).normal(0, 0.3, (24, 256)).astype(np.float32)
    calib = SampleSet("calib", {"x": x}, None, {}, {"x": (1, 256)})
    exported = ExportedModel(path, (TensorInfo("x", (1, 256), "float32"),), (TensorInfo("y", (1, 5), "float32"),),
                             17, file_hash(path))
    art = get_backend("onnx").convert(exported, catalogue()["onnx-cpu"], "int8", calib, tmp_path / "q")
    q = onnx.load(str(art.path)).graph
    quantized_inputs = {n.input[0] for n in q.node if n.op_type == "QuantizeLinear"}
    front_outputs = {o for n in graph.node if n.name in regions["frontend"] for o in n.output}
    assert quantized_inputs and not (quantized_inputs & (front_outputs - {o for n in graph.node if n.op_type == "Log"
                                                                          for o in n.output}))
    assert any("front-end" in n for n in art.notes) and art.main == "model_int8_qdq.onnx"
    off = get_backend("onnx").convert(exported, catalogue()["onnx-cpu"], "int8", calib, tmp_path / "off",
                                      {"float_regions": False})
    assert {n.input[0] for n in onnx.load(str(off.path)).graph.node if n.op_type == "QuantizeLinear"} & front_outputs


def test_nodes_a_runtime_error_names_become_the_float_island(tmp_path):
    from edgebuild.pipeline.stages.islands import nodes_named_in

    exported, _, fc = _big_float_layer_model(tmp_path)
    text = (f"onnxruntime cannot load model_int8_qdq.onnx: Fail: [ShapeInferenceError] Node ({fc}_quant) Op (Gemm) "
            "All inputs to Concat must have same rank")
    assert nodes_named_in(exported.onnx_path, text) == [fc]
    assert nodes_named_in(exported.onnx_path, "Fail: something without names") == []


def test_a_task_scores_the_output_with_real_values_not_an_input_passed_through():
    """MiniLM's ONNX returns its input ids and mask first: the embedding task scored those (cosine 1.0) and passed an
    INT8 whose sentence embedding had a mean cosine of 0.95. The task now scores the first real-valued output."""
    from edgebuild.pipeline import tasks as T

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30000, (20, 1, 16)).astype(np.float32)
    emb = rng.normal(0, 0.3, (20, 1, 8)).astype(np.float32)
    ref = {"output": ids, "461": emb}
    out = {"output": ids, "461": emb + rng.normal(0, 0.2, emb.shape).astype(np.float32)}
    assert T.default_output(ref, {}) == "461"
    scores = T.embedding(out, ref, None, {})
    assert scores["cosine_mean"] < 0.98  # the damaged embedding is what is scored
    assert T.default_output(ref, {"output": "output"}) == "output"


def test_int8_variants_use_the_search_time_before_fp16():
    """ocr-cls on x86: a try took 24 s and the search went to FP16 before any INT8 variant because all five variants
    and mixed precision did not fit. Now the variants go first while one more try fits beside the reserved FP16."""
    import time
    from types import SimpleNamespace

    from edgebuild.pipeline.stages import search as R
    from edgebuild.pipeline.stages.search_state import Search

    backend = SimpleNamespace(requested_settings=lambda profile: OnnxSettings(),
                              recovery_candidates=lambda profile, s: [(f"variant {i}", {"v": i}) for i in range(5)],
                              supports_float_layers=True)
    profile = SimpleNamespace(allow_float_layers=True, precisions=("int8", "fp16"))
    s = Search.__new__(Search)
    s.record, s.tries, s.deadline, s.durations = SearchRecord(tries=[SearchTry()]), [], time.monotonic() + 100, [24.0]
    asked = []

    def attempt(label, precision, settings, fallback=False):
        asked.append(label)
        return SimpleNamespace(quality_ok=label == "variant 1", label=label)

    s.attempt = attempt
    found = R._search(None, backend, profile, s, collapsed=False)
    assert asked == ["variant 0", "variant 1"] and found.label == "variant 1" and s.record.float_first is None
    s.deadline, asked[:] = time.monotonic() + 30, []  # not even one more 24 s INT8 try fits beside FP16: FP16 first
    s.attempt = lambda label, precision, settings, fallback=False: asked.append(label) or SimpleNamespace(
        quality_ok=precision == "fp16", label=label, artifact=SimpleNamespace(precision=precision))
    s.ctx, s.reserve = SimpleNamespace(job=SimpleNamespace(spec=SimpleNamespace(auto_max_tries=2)),
                                       work=SimpleNamespace(deadline=float("inf"))), 1  # no INT8 try left beside it
    found = R._search(None, backend, profile, s, collapsed=False)
    assert asked[0].startswith("FP16") and s.record.float_first and found.label.startswith("FP16")
