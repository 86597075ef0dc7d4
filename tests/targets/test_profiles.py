import pytest

from edgebuild.pipeline.errors import BadInputError
from edgebuild.targets.base import backend_exists
from edgebuild.targets.profiles import PROFILE_DIR, catalogue, load_profile, resolve

PROFILES = sorted(PROFILE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_loads_and_its_backend_exists(path):
    p = load_profile(path)
    assert p.name == path.stem, "a profile file is named after its profile"
    assert backend_exists(p.backend)
    assert p.precision in p.precisions
    assert p.description.strip() and p.devices, "a profile says what it is for and on which devices"
    assert p.host_runtime and p.device_runtime and p.host_validation
    assert p.threads >= 1
    assert p.budgets.max_accuracy_drop is not None


def test_catalogue_has_the_skeleton_targets():
    assert {"onnx-cpu", "jetson-orin", "nvidia-gpu"} <= set(catalogue())


def test_user_profile_is_added_and_unknown_target_is_bad_input(tmp_path):
    f = tmp_path / "my-board.yaml"
    f.write_text("name: my-board\nbackend: onnx\ndescription: mine\nprecision: fp32\nprecisions: [fp32]\n")
    assert [p.name for p in resolve(("my-board",), (str(f),))] == ["my-board"]
    with pytest.raises(BadInputError, match="unknown target"):
        resolve(("no-such-board",))
    assert len(resolve(("all",))) == len(catalogue())


@pytest.mark.parametrize("text", [
    "name: x\nbackend: onnx\n",  # no description
    "name: x\nbackend: onnx\ndescription: d\nprecision: int4\n",
    "name: x\nbackend: onnx\ndescription: d\nbudgets: {max_speed: 3}\n",
    "name: x\nbackend: onnx\ndescription: d\ncolour: red\n",
])
def test_bad_profiles_are_bad_input(tmp_path, text):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(BadInputError):
        load_profile(f)


@pytest.mark.parametrize("backend, quant, message", [
    ("onnx", "{calibrate_metod: minmax}", "unknown onnx quant setting(s) calibrate_metod"),
    ("onnx", "{calibrate_method: kmeans}", "quant.calibrate_method must be one of"),
    ("tensorrt", "{weight_type: int4}", "quant.weight_type must be one of"),
    ("openvino", "{preset: fastest}", "quant.preset must be one of"),
    ("tflite", "{quantizer: magic}", "quantizer must be one of"),
])
def test_a_typo_in_a_profiles_quant_settings_is_exit_2_before_any_work(tmp_path, capsys, backend, quant, message):
    from edgebuild.pipeline.cli import main

    prof = tmp_path / "p.yaml"
    prof.write_text(f"name: typo\nbackend: {backend}\ndescription: d\nquant: {quant}\n")
    code = main(["--target", "typo", "--profile", str(prof), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists(), "nothing converted, nothing written"
