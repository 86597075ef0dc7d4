"""Names a device program can use: torch exports keep output names, class names come from the config or the image
folder, and ``package.module:attr`` is imported from the config's own directory."""
import collections
import sys

import numpy as np
import pytest

from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import BuildSpec, InputSpec, load_config

torch = pytest.importorskip("torch")

Pair = collections.namedtuple("Pair", "scores boxes")


class _Net(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.lin = kind, torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        return {"tensor": y, "tuple": (y, y * 2), "namedtuple": Pair(y, y + 1), "dict": {"b": y, "a": y - 1}}[self.kind]


def _export(tmp_path, kind, names=()):
    import onnx

    from edgebuild.pipeline.stages.export import _export_torch
    from edgebuild.pipeline.stages.load import LoadedModel

    loaded = LoadedModel("torch", kind, (InputSpec("x", (1, 4), "float32", "ANY"),), module=_Net(kind).eval(),
                         output_names=tuple(names))
    model, _ = _export_torch(loaded, tmp_path)
    return [o.name for o in model.graph.output], model, onnx


@pytest.mark.parametrize("kind, expected", [("tensor", ["output"]), ("tuple", ["output_0", "output_1"]),
                                            ("namedtuple", ["scores", "boxes"]), ("dict", ["b", "a"])])
def test_output_names_follow_forwards_return(tmp_path, kind, expected):
    names, _, _ = _export(tmp_path, kind)
    assert names == expected


def test_dict_outputs_are_named_after_the_tensor_they_hold(tmp_path):
    import onnxruntime as ort

    names, model, onnx = _export(tmp_path, "dict")
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
    got = dict(zip(names, ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})))  # a = b - 1
    np.testing.assert_allclose(got["b"] - got["a"], np.ones((1, 3), np.float32), atol=1e-5)


def test_output_names_of_the_config_win_and_must_match_the_count(tmp_path):
    assert _export(tmp_path, "tuple", ["logits", "probs"])[0] == ["logits", "probs"]
    with pytest.raises(BadInputError, match="output_names names 1 output"):
        _export(tmp_path, "tuple", ["only"])


def test_the_demo_output_is_named_output_not_a_tracer_number(tmp_path):
    from edgebuild.pipeline.stages.export import _export_torch
    from edgebuild.pipeline.stages.load import load_model

    model, _ = _export_torch(load_model(BuildSpec()), tmp_path)
    assert [o.name for o in model.graph.output] == ["output"]


def test_output_names_are_refused_for_onnx_sources(tmp_path):
    from edgebuild.pipeline.stages.load import load_model

    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(tmp_path / "m.onnx"), dynamo=False)
    with pytest.raises(BadInputError, match="output_names is for torch models"):
        load_model(BuildSpec(model=str(tmp_path / "m.onnx"), output_names=("y",)))


def test_class_names_from_the_config_or_the_folder_and_they_must_agree():
    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.stages.data import class_names

    x = {"input": np.zeros((2, 1), np.float32)}
    folder = SampleSet("f", x, origin={"classes": ["cat", "dog"]})
    plain = SampleSet("p", x)
    assert class_names(BuildSpec(), plain, folder) == ["cat", "dog"]
    assert class_names(BuildSpec(class_names=("Cat", "Dog")), plain, folder) == ["Cat", "Dog"]
    assert class_names(BuildSpec(), plain, plain) is None
    with pytest.raises(BadInputError, match="class_names lists 3 classes; the image folder has 2"):
        class_names(BuildSpec(class_names=("a", "b", "c")), plain, folder)
    with pytest.raises(BadInputError, match="class_names must be a list"):
        BuildSpec.from_dict({"class_names": [1, 2]})


def test_new_spec_fields_round_trip_through_json():
    spec = BuildSpec(output_names=("logits",), class_names=("a", "b"), python_path=("/x",))
    again = BuildSpec.from_dict(spec.to_dict())
    assert again == spec and again.preprocess.interpolation == "bicubic"


def test_module_beside_the_config_imports_from_another_directory(tmp_path, monkeypatch):
    from edgebuild.pipeline.stages.load import load_model

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "besidecfg_net.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 2)\n")
    (proj / "edgebuild.yaml").write_text("model: besidecfg_net:make\ninput: {shape: [1, 4]}\n")
    monkeypatch.chdir(tmp_path)  # not the config's directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    data = load_config(proj / "edgebuild.yaml")
    assert data["python_path"] == [str(proj.resolve())]
    loaded = load_model(BuildSpec.from_dict(data))
    assert isinstance(loaded.module, torch.nn.Linear)


def _images_onnx(path, dims=("batch", 3, "h", "w")):
    """A tiny ONNX model whose input is called ``images`` (as YOLO exports are), with dynamic dimensions."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]), helper.make_node("Flatten", ["g"], ["logits"])]
    graph = helper.make_graph(nodes, "images", [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _spec(tmp_path, *shapes, config=None):
    from edgebuild.pipeline.cli import spec_from_flags

    flags = dict(input_shape=shapes, max_accuracy_drop=None, max_latency_ms=None, max_size_mb=None,
                 max_compression_drop=None, no_auto=False, no_cache=False, trust_model=False, compress_steps=(),
                 target=("onnx-cpu",), profile=(), model=str(tmp_path / "m.onnx"))
    return spec_from_flags(config, **flags)[0]


def test_input_shape_binds_by_name_and_an_unnamed_one_fits_a_single_input_whatever_its_name(tmp_path, monkeypatch):
    from edgebuild.pipeline.stages.load import load_model

    monkeypatch.chdir(tmp_path)
    _images_onnx(tmp_path / "m.onnx")
    for flag in ("1,3,16,16", "images:1,3,16,16"):
        loaded = load_model(_spec(tmp_path, flag))
        assert [(i.name, i.shape) for i in loaded.inputs] == [("images", (1, 3, 16, 16))], flag
    spec = _spec(tmp_path, "image:1,3,8,8", "mask:1,1,8,8", "input:0:1,4")  # repeatable; a name may hold a colon
    assert [(i.name, i.shape) for i in spec.inputs] == [("image", (1, 3, 8, 8)), ("mask", (1, 1, 8, 8)), ("input:0", (1, 4))]
    with pytest.raises(BadInputError, match="name each input"):
        _spec(tmp_path, "1,3,8,8", "1,1,8,8")
    with pytest.raises(BadInputError, match="names an input twice"):
        _spec(tmp_path, "a:1,3", "a:1,4")
    with pytest.raises(BadInputError, match="the model's inputs are \\['images'\\].*--input-shape NAME:"):
        load_model(_spec(tmp_path, "image:1,3,16,16"))


def test_the_dynamic_dimension_error_shows_the_flag(tmp_path, monkeypatch):
    from edgebuild.pipeline.stages.load import load_model

    monkeypatch.chdir(tmp_path)
    _images_onnx(tmp_path / "m.onnx")
    with pytest.raises(BadInputError, match=r"--input-shape images:1,3,H,W$"):  # the batch is 1; h, w from data
        load_model(_spec(tmp_path))


@pytest.mark.slow
def test_cli_builds_an_onnx_model_whose_input_is_not_called_input(tmp_path):
    """Issue 26: ``--input-shape 1,3,640,640`` on an input named ``images`` ended in "model inputs are ['images'],
    the build spec names ['input']" (exit 2)."""
    import json
    import subprocess

    _images_onnx(tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", images=np.random.default_rng(0).random((24, 3, 16, 16), dtype=np.float32))
    run = subprocess.run([sys.executable, "-c", "from edgebuild.pipeline.cli import main; raise SystemExit(main())",
                          "--model", "m.onnx", "--input-shape", "1,3,16,16", "--calib", "data.npz", "-t", "onnx-cpu",
                          "--no-auto", "--no-cache", "--json", "-q"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    manifest = json.loads(run.stdout)
    assert [(i["name"], i["shape"]) for i in manifest["model"]["inputs"]] == [("images", [1, 3, 16, 16])]
    assert manifest["targets"]["onnx-cpu"]["verdict"] != "error", manifest["targets"]["onnx-cpu"]
