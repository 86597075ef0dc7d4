"""Compression before export: each step, the measurements, the guardrails, and the CLI/yaml configuration."""
from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.pipeline.spec import BuildSpec, CompressStep, InputSpec
from edgebuild.pipeline.stages.compress import compress, config_dict, markdown, parse_step, registry
from edgebuild.pipeline.stages.compress import lowrank, measure as M, prune
from edgebuild.pipeline.stages.load import LoadedModel

DEMO_INPUT = (InputSpec("input", (1, 1, 8, 8)),)


@contextmanager
def quiet(text):
    yield


# ---- tiny models made here ---------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual add when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        layers = [] if expand == 1 else [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class TinyMobileNetV2(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            InvertedResidual(16, 16, 1, 1), InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4), InvertedResidual(32, 32, 1, 4),
            nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def mobilenet() -> tuple[LoadedModel, SampleSet]:
    torch.manual_seed(0)
    model = TinyMobileNetV2().eval()
    for m in model.modules():  # non-trivial BN statistics, so pruning choices and fidelity are meaningful
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = np.random.default_rng(0).standard_normal((24, 3, 32, 32)).astype(np.float32)
    inputs = (InputSpec("input", (1, 3, 32, 32)),)
    return LoadedModel("torch", "tiny MobileNetV2", inputs, module=model), SampleSet("random", {"input": x})


@pytest.fixture(scope="module")
def demo():
    from edgebuild.calibration.sources import digits
    from edgebuild.pipeline.demo_model import load_demo

    return LoadedModel("torch", "demo", DEMO_INPUT, module=load_demo()), digits("test")


def ctx_for(model_inputs=DEMO_INPUT):
    return SimpleNamespace(label="step 1/1 (test)", example=M.example_inputs(model_inputs))


# ---- configuration -----------------------------------------------------------------------------------
def test_every_step_config_round_trips_through_json():
    for kind, module in registry().items():
        cfg = module.Config()
        again = module.Config(**json.loads(json.dumps(config_dict(cfg))))
        assert again == cfg, kind


@pytest.mark.parametrize("step, message", [
    (CompressStep("quantize", {}), "unknown compress step 'quantize'"),
    (CompressStep("prune", {"amount": 0.5}), "unknown option(s) amount"),
    (CompressStep("prune", {"method": "random"}), "method must be one of"),
    (CompressStep("prune", {"ratio": 1.5}), "ratio must be"),
    (CompressStep("lowrank", {"energy": 0.9, "rank_ratio": 0.5}), "not both"),
    (CompressStep("distill", {"epochs": 0}), "epochs must be a positive integer"),
    (CompressStep("distill", {"teacher": "nonsense"}), "teacher must be"),
])
def test_bad_steps_and_options_are_bad_input(step, message):
    with pytest.raises(BadInputError) as e:
        parse_step(step)
    assert message in str(e.value)


def test_exclude_accepts_a_list_or_a_separated_string():
    assert prune.Config(exclude=["a.0", "b"]).exclude == ("a.0", "b")
    assert prune.Config(exclude="a.0;b").exclude == ("a.0", "b")


# ---- measurement -------------------------------------------------------------------------------------
def test_measure_counts_macs_params_size_latency_and_quality():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    assert M.count_macs(model, M.example_inputs(DEMO_INPUT)) == 8 * 8 * 4 * 9 + 256 * 3
    x = np.random.default_rng(0).standard_normal((10, 1, 8, 8)).astype(np.float32)
    data = SampleSet("x", {"input": x}, np.zeros(10, dtype=np.int64))
    m, out = M.measure(model, data, DEMO_INPUT, None)
    assert m["params"] == 36 + 256 * 3 + 3 and m["fp32_bytes"] > 4 * m["params"]
    assert m["latency_ms"] > 0 and 0 <= m["accuracy"] <= 100 and out.shape == (10, 3)
    again, _ = M.measure(model, data, DEMO_INPUT, M.Reference(out, data.labels), with_latency=False)
    assert again["top1_agreement"] == 100.0 and "latency_ms" not in again
    assert torch.get_num_threads() >= 1  # restored after the 1-thread latency run


# ---- pruning -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_pruning_zeroes_weights_but_keeps_the_classifier_and_the_size(demo, scope):
    loaded, _ = demo
    model = copy.deepcopy(loaded.module)
    out, details = prune.run(model, prune.Config(method="unstructured", ratio=0.6, scope=scope,
                                                 exclude=("features.0",)), ctx_for())
    assert details["per_layer"].keys() == {"features.3", "features.7", "classifier.1"}
    assert details["sparsity_pruned_layers"] == pytest.approx(60.0, abs=0.1)
    if scope == "layer":
        assert all(v["sparsity"] == pytest.approx(60.0, abs=0.1) for v in details["per_layer"].values())
    assert torch.equal(out.classifier[4].weight, loaded.module.classifier[4].weight)
    assert torch.equal(out.features[0].weight, loaded.module.features[0].weight)
    assert not any(hasattr(m, "weight_mask") for m in out.modules())  # permanent, no hooks left
    assert M.count_params(out) == M.count_params(loaded.module) and "as large and as fast" in details["note"]
    assert details["zlib_bytes"]["after"] < details["zlib_bytes"]["before"]


def test_structured_pruning_removes_channels_but_not_classes(demo):
    loaded, _ = demo
    example = M.example_inputs(DEMO_INPUT)
    out, details = prune.run(copy.deepcopy(loaded.module), prune.Config(method="structured", ratio=0.5), ctx_for())
    assert details["channels"]["features.3"] == [64, 32]
    assert out.classifier[4].out_features == 10 and out(*example).shape == (1, 10)
    assert M.count_macs(loaded.module, example) / M.count_macs(out, example) > 3.5


def test_structured_pruning_never_touches_excluded_layers(demo):
    loaded, _ = demo
    out, details = prune.run(copy.deepcopy(loaded.module),
                             prune.Config(method="structured", ratio=0.5, exclude="features.3"), ctx_for())
    assert torch.equal(out.features[3].weight, loaded.module.features[3].weight)  # neither inputs nor outputs
    assert "features.3" not in details["channels"] and details["channels"]["features.7"] == [128, 64]
    assert details["groups_skipped_for_exclude"]


def test_structured_pruning_of_a_mobilenetv2_keeps_the_graph_valid_and_exports(tmp_path):
    from edgebuild.pipeline.stages.export import export_onnx

    loaded, data = mobilenet()
    spec = BuildSpec(model="tiny", inputs=loaded.inputs,
                     compress=(CompressStep("prune", {"method": "structured", "ratio": 0.5}),))
    new, record = compress(loaded, spec, data, quiet)
    assert record["summary"]["mac_reduction"] > 2.5 and "top1_agreement" in record["steps"][0]["after"]
    blocks = new.module.features
    assert blocks[5].conv[6].out_channels == blocks[4].conv[6].out_channels  # both sides of the residual add
    dw = blocks[4].conv[3]
    assert dw.groups == dw.in_channels == dw.out_channels < 64  # depthwise conv pruned consistently
    assert loaded.module.features[4].conv[3].out_channels == 64  # the input model is untouched
    model, export = export_onnx(new, data, tmp_path)
    assert export["fidelity_vs_torch"]["min_cosine"] > 0.9999 and model.onnx_path.is_file()


# ---- low rank ----------------------------------------------------------------------------------------
def test_lowrank_factorization_is_exact_for_low_rank_layers():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    lin.weight.data = torch.randn(48, 4) @ torch.randn(4, 64)
    pair, info = lowrank.factorize(lin, lowrank.Config(energy=0.9999))
    x = torch.randn(5, 64)
    assert info["rank"] == 4 and info["weights"] == [48 * 64, 4 * (48 + 64)]
    assert torch.allclose(pair(x), lin(x), atol=1e-4)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    conv.weight.data = (torch.randn(32, 3) @ torch.randn(3, 16 * 9)).reshape(32, 16, 3, 3)
    pair, info = lowrank.factorize(conv, lowrank.Config(energy=0.9999))
    x = torch.randn(2, 16, 9, 9)
    assert info["rank"] == 3 and isinstance(pair[1], nn.Conv2d) and pair[1].kernel_size == (1, 1)
    assert torch.allclose(pair(x), conv(x), atol=1e-4)


def test_lowrank_leaves_alone_layers_it_cannot_shrink():
    loaded, data = mobilenet()
    out, details = lowrank.run(copy.deepcopy(loaded.module), lowrank.Config(rank_ratio=0.5),
                               ctx_for(loaded.inputs))
    left = details["left_alone"]
    assert left["classifier.2"] == "final classifier"
    assert left["features.4.conv.3"].startswith("grouped conv")
    assert any(v.startswith("no reduction") for v in left.values())  # e.g. the 16->16 1x1 convs
    assert details["factorized"] and M.count_params(out) < M.count_params(loaded.module)


# ---- the stage and its guardrails --------------------------------------------------------------------
def test_compression_needs_a_torch_model(demo_onnx):
    loaded = LoadedModel("onnx", "ONNX file demo.onnx", DEMO_INPUT, onnx_path=demo_onnx)
    with pytest.raises(BadInputError, match="compression needs a torch model"):
        compress(loaded, BuildSpec(compress=(CompressStep("prune", {}),)), None, quiet)


def test_training_data_must_not_overlap_evaluation(demo):
    loaded, evalset = demo
    spec = BuildSpec(train="digits:test", compress=(CompressStep("distill", {"epochs": 1}),))
    with pytest.raises(BadInputError, match="shares 797 of 797 samples with the evaluation data"):
        compress(loaded, spec, evalset, quiet)
    spec = BuildSpec(model="x:y", compress=(CompressStep("distill", {}),))
    with pytest.raises(BadInputError, match="needs training data"):
        compress(loaded, spec, evalset, quiet)


def test_a_step_that_breaks_the_model_is_named(demo, monkeypatch):
    import edgebuild.pipeline.stages.compress as C

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def run(model, cfg, ctx):
        model.classifier[4] = nn.Linear(100, 10)  # no longer fits the features before it
        return model, {}

    breaker = SimpleNamespace(KIND="breaker", Config=Config, run=run)
    monkeypatch.setattr(C, "registry", lambda: {"prune": prune, "breaker": breaker})
    loaded, evalset = demo
    spec = BuildSpec(compress=(CompressStep("prune", {"method": "unstructured"}), CompressStep("breaker", {})))
    with pytest.raises(ConversionError, match=r"compress step 2/2 \(breaker\) broke the model"):
        compress(loaded, spec, evalset, quiet)


def test_prune_then_distill_recovers_deterministically(demo):
    loaded, evalset = demo
    spec = BuildSpec(compress=(CompressStep("prune", {"method": "structured", "ratio": 0.5}),
                               CompressStep("distill", {"epochs": 2, "threads": 1})))
    a, record = compress(loaded, spec, evalset, quiet)
    b, _ = compress(loaded, spec, evalset, quiet)
    assert all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))
    prune_step, distill_step = record["steps"]
    assert prune_step["after"]["accuracy"] < 60 < 95 < distill_step["after"]["accuracy"]
    assert [e["epoch"] for e in distill_step["details"]["epochs"]] == [1, 2]
    assert distill_step["details"]["training"]["source"] == "digits:train"
    assert record["training"]["overlap_with_evaluation"] == 0
    assert record["summary"]["mac_reduction"] > 3.5 and a.exported_program is None
    assert "compressed (prune+distill)" in a.description
    json.dumps(record)  # the record is JSON as it is
    table = "\n".join(markdown(record))
    assert "| original | 226,794 |" in table and "prune:method=structured" in table and "warning" not in table


def test_distill_keeps_unstructured_zeros(demo):
    loaded, evalset = demo
    spec = BuildSpec(compress=(CompressStep("prune", {"ratio": 0.7, "scope": "global"}),
                               CompressStep("distill", {"epochs": 1, "alpha": 0, "threads": 1})))
    new, record = compress(loaded, spec, evalset, quiet)
    assert (new.module.features[3].weight == 0).float().mean() > 0.5
    assert record["steps"][1]["details"]["kept_zero_weights"] > 0
    assert record["steps"][1]["details"]["loss"] == "CE (fine-tuning)"


def test_distill_from_an_imported_teacher(demo):
    loaded, evalset = demo
    spec = BuildSpec(compress=(CompressStep("prune", {"method": "structured", "ratio": 0.5}),
                               CompressStep("distill", {"epochs": 1, "alpha": 1, "threads": 1,
                                                        "teacher": "edgebuild.pipeline.demo_model:load_demo"})))
    _, record = compress(loaded, spec, evalset, quiet)
    assert record["steps"][1]["details"]["teacher"] == "edgebuild.pipeline.demo_model:load_demo"
    assert record["steps"][1]["after"]["accuracy"] > 80


def test_distill_without_labels_needs_alpha_1(tmp_path):
    loaded, data = mobilenet()
    train = tmp_path / "unlabelled.npz"
    np.savez(train, x=np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32))
    steps = (CompressStep("prune", {"method": "structured", "ratio": 0.3}), CompressStep("distill", {"epochs": 1}))
    spec = BuildSpec(model="tiny", inputs=loaded.inputs, train=str(train), compress=steps)
    with pytest.raises(BadInputError, match="has no labels; set alpha=1"):
        compress(loaded, spec, data, quiet)
    spec = spec.replace(compress=(steps[0], CompressStep("distill", {"epochs": 1, "alpha": 1.0, "threads": 1})))
    _, record = compress(loaded, spec, data, quiet)
    assert record["training"]["samples"] == 32 and len(record["steps"][1]["details"]["epochs"]) == 1


def test_a_large_accuracy_loss_is_flagged(demo):
    loaded, evalset = demo
    spec = BuildSpec(compress=(CompressStep("lowrank", {"rank_ratio": 0.1}),))
    _, record = compress(loaded, spec, evalset, quiet)
    assert record["summary"]["accuracy_drop"] > 1.0 and "add or lengthen a distill step" in record["warnings"][0]


# ---- through the CLI, as a user runs it --------------------------------------------------------------
def run_cli(argv, capsys):
    from edgebuild.pipeline.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.err


def test_cli_rejects_bad_compression_with_one_line(demo_onnx, tmp_path, capsys):
    code, err = run_cli(["--compress", "squeeze:x=1", "--target", "onnx-cpu", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown compress step 'squeeze'" in err and "Traceback" not in err
    code, err = run_cli(["--model", str(demo_onnx), "--calib", "digits:train", "--eval", "digits:test",
                         "--compress", "prune:ratio=0.5", "--target", "onnx-cpu", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "compression needs a torch model" in err


@pytest.mark.slow
def test_cli_structured_pruning_and_distillation_build_int8(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["--target", "onnx-cpu", "--compress", "prune:method=structured,ratio=0.5",
                         "--compress", "distill:epochs=4,threads=1", "--out", str(out)], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    c = m["compression"]
    assert [s["kind"] for s in c["steps"]] == ["prune", "distill"]
    assert c["summary"]["mac_reduction"] >= 1.8 and c["summary"]["accuracy_drop"] <= 1.0
    assert m["model"]["accuracy"] == pytest.approx(c["final"]["accuracy"], abs=0.2)  # the compressed model was built
    assert m["targets"]["onnx-cpu"]["verdict"] == "pass"
    assert m["spec"]["compress"][0] == {"kind": "prune", "options": {"method": "structured", "ratio": 0.5}}


@pytest.mark.slow
def test_yaml_lowrank_and_distillation_build_int8(tmp_path, capsys):
    config = tmp_path / "edgebuild.yaml"
    config.write_text("train: digits:train\n"
                      "compress:\n  - lowrank: {energy: 0.7}\n  - distill: {epochs: 4, threads: 1}\n")
    out = tmp_path / "out"
    code, err = run_cli(["--config", str(config), "--target", "onnx-cpu", "--out", str(out)], capsys)
    assert code == 0, err
    c = json.loads((out / "manifest.json").read_text())["compression"]
    assert c["summary"]["param_reduction"] >= 2.0 and c["summary"]["accuracy_drop"] <= 1.0
    assert c["steps"][0]["details"]["left_alone"]["classifier.4"] == "final classifier"


@pytest.mark.slow
def test_compression_that_costs_accuracy_fails_the_build(tmp_path, capsys):
    """Pruning without fine-tuning drops the demo to ~28 %: the build must say so and exit 1."""
    from edgebuild.pipeline.cli import main

    out = tmp_path / "out"
    code = main(["--target", "onnx-cpu", "--compress", "prune:method=structured,ratio=0.5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "compression accuracy drop" in err and "max 1.0 pt" in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["verdict"] == "fail" and "failure" in m["compression"]
