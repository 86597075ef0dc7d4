import json

import pytest

from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import BuildSpec, Budgets, CompressStep, InputSpec, PreprocessSpec, load_config


def full_spec() -> BuildSpec:
    return BuildSpec(
        model="m.onnx", weights=None, inputs=(InputSpec("x", (1, 3, 32, 32)),),
        preprocess=PreprocessSpec(resize=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)),
        calib="c", eval="e", targets=("onnx-cpu", "jetson-orin"), budgets=Budgets(max_accuracy_drop=1.0),
        compress=(CompressStep("prune", {"ratio": 0.5}),), precision="int8",
    )


def test_every_config_round_trips_through_json():
    spec = full_spec()
    again = BuildSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert BuildSpec.from_dict(BuildSpec().to_dict()) == BuildSpec()


@pytest.mark.parametrize("bad", [
    {"precision": "int4"}, {"nope": 1}, {"inputs": [{"name": "x", "shape": [1, -3]}]},
    {"inputs": [{"name": "x", "dtype": "float64"}]}, {"budgets": {"max_accuracy": 1}},
    {"preprocess": {"color": "cmyk"}}, {"compress": [{"prune": {}, "lowrank": {}}]}, {"calib_samples": 0},
    {"task": "sequence", "task_options": {"near_tie_ratio": 1.5}},
])
def test_invalid_options_are_bad_input(bad):
    with pytest.raises(BadInputError):
        BuildSpec.from_dict(bad)


def test_yaml_config_resolves_relative_paths(tmp_path):
    (tmp_path / "edgebuild.yaml").write_text(
        "model: nets/m.onnx\ncalib: data/calib\neval: digits:test\ntargets: onnx-cpu\n"
        "input: {name: x, shape: [1, 1, 8, 8]}\ncompress:\n  - prune: {ratio: 0.5}\n"
    )
    spec = BuildSpec.from_dict(load_config(tmp_path / "edgebuild.yaml"))
    assert spec.model == str(tmp_path / "nets/m.onnx")
    assert spec.calib == str(tmp_path / "data/calib")
    assert spec.eval == "digits:test"
    assert spec.targets == ("onnx-cpu",)
    assert spec.inputs[0].shape == (1, 1, 8, 8)
    assert spec.compress == (CompressStep("prune", {"ratio": 0.5}),)


def test_bad_yaml_is_one_line_bad_input(tmp_path):
    (tmp_path / "edgebuild.yaml").write_text("model: [unclosed\n")
    with pytest.raises(BadInputError, match="not valid YAML"):
        load_config(tmp_path / "edgebuild.yaml")
