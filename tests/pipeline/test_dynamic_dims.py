"""Dynamic input dimensions by meaning, not by position (issue 25): a symbolic dimension is the batch (1) when it is
named like one or leads; any other (a captcha-OCR model's image width, axis 3, with a fixed batch of 1) takes its
size from the calibration and evaluation data when every sample agrees, else exit 2 naming the dimension and the
exact line to add. The model is built here: Conv -> ReLU -> mean over the height -> [1, width, 4] per-column scores."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.stages.export import input_shape


def ocr_onnx(path: Path, dims=(1, 1, 64, "width")) -> Path:
    """A tiny OCR-like model: image [1, 1, 64, width] (only the width is dynamic) -> per-column scores [1, width, 4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 1, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[2], keepdims=0),  # [1, 4, width]
             helper.make_node("Transpose", ["m"], ["scores"], perm=[0, 2, 1])]  # [1, width, 4]
    graph = helper.make_graph(nodes, "ocr", [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, dims[3], 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _images(n: int, width: int) -> np.ndarray:
    return np.random.default_rng(width).random((n, 1, 64, width), dtype=np.float32)


def _spec(calib=None, eval=None, resize=None):
    return SimpleNamespace(calib=calib, eval=eval, preprocess=SimpleNamespace(resize=resize))


def test_the_batch_is_a_named_or_leading_dimension_and_any_other_comes_from_the_data(tmp_path):
    np.save(tmp_path / "w96.npy", _images(3, 96))
    np.savez(tmp_path / "w96.npz", image=_images(3, 96)[:, 0], labels=np.arange(3))  # without the batch axis
    m = tmp_path / "m.onnx"
    assert input_shape(m, "image", [1, 1, 64, "width"], _spec(str(tmp_path / "w96.npy")), 1) == \
        ((1, 1, 64, 96), ["input image: dimension width = 96, from the data"])
    assert input_shape(m, "image", ["N", 1, 64, "w"], _spec(str(tmp_path / "w96.npz")), 1)[0] == (1, 1, 64, 96)
    assert input_shape(m, "image", ["?", 1, 64, "?"], _spec(str(tmp_path / "w96.npy")), 1)[0] == (1, 1, 64, 96)
    assert input_shape(m, "state", [2, "batch", 128], _spec(), 1) == ((2, 1, 128), [])  # named: the batch on axis 1
    assert input_shape(m, "x", ["N", 3, 8, 8], _spec(), 1) == ((1, 3, 8, 8), [])  # leading: the batch
    np.save(tmp_path / "seq.npy", np.zeros((5, 20, 16), np.float32))  # [seq, batch, 16] samples without the batch
    assert input_shape(m, "x", ["seq", "batch_size", 16], _spec(str(tmp_path / "seq.npy")), 1)[0] == (20, 1, 16)
    np.save(tmp_path / "ids.npy", np.zeros((5, 1, 128), np.int64))
    assert input_shape(m, "ids", ["batch", "sequence"], _spec(str(tmp_path / "ids.npy")), 1)[0] == (1, 128)


def test_a_width_the_data_do_not_fix_is_exit_2_naming_it_and_the_exact_line_to_add(tmp_path):
    np.save(tmp_path / "w96.npy", _images(3, 96))
    np.save(tmp_path / "w128.npy", _images(3, 128))
    m = tmp_path / "ocr.onnx"
    with pytest.raises(BadInputError) as e:
        input_shape(m, "image", [1, 1, 64, "width"], _spec(str(tmp_path / "w96.npy"), str(tmp_path / "w128.npy")), 1)
    msg = str(e.value)
    assert "dynamic dimension 'width' on axis 3 that is not the batch" in msg and "96" in msg and "128" in msg
    assert "`input: {name: image, shape: [1, 1, 64, 96]}`" in msg and "--input-shape image:1,1,64,96" in msg
    with pytest.raises(BadInputError, match=r"no calibration or evaluation data.*`input: \{name: image, shape: \[1, 1, 64, WIDTH\]\}`, "
                                            r"or --input-shape image:1,1,64,WIDTH$"):
        input_shape(m, "image", [1, 1, 64, "width"], _spec(), 1)
    with pytest.raises(BadInputError, match=r"digits: samples of shape \[1, 8, 8\] do not line up"):
        input_shape(m, "image", [1, 1, 64, "width"], _spec("digits"), 1)


def test_an_image_folders_width_is_taken_when_every_image_has_it(tmp_path):
    from PIL import Image

    same, mixed = tmp_path / "same", tmp_path / "mixed"
    for folder, widths in ((same, (120, 120, 120)), (mixed, (120, 120, 200))):
        folder.mkdir()
        for i, w in enumerate(widths):
            Image.new("L", (w, 64), color=i * 60).save(folder / f"{i}.png")
    m = tmp_path / "ocr.onnx"
    assert input_shape(m, "image", [1, 1, 64, "width"], _spec(str(same)), 1)[0] == (1, 1, 64, 120)
    assert input_shape(m, "image", [1, 1, 64, "width"], _spec(str(mixed), resize=(64, 160)), 1)[0] == (1, 1, 64, 160)
    with pytest.raises(BadInputError, match=r"2 different sizes \(height x width: 64x120, 64x200; set preprocess.resize\)"
                                            r".*shape: \[1, 1, 64, 120\]"):
        input_shape(m, "image", [1, 1, 64, "width"], _spec(str(mixed)), 1)


def _cli(args, capsys):
    from edgebuild.pipeline.cli import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_a_dynamic_width_model_builds_without_a_config_at_the_datas_width(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ocr_onnx(tmp_path / "ocr.onnx")
    np.save(tmp_path / "calib.npy", _images(24, 96))
    np.save(tmp_path / "val.npy", _images(16, 96))
    code, stdout, err = _cli(["--model", "ocr.onnx", "--calib", "calib.npy", "--eval", "val.npy", "-t", "onnx-cpu",
                              "--no-auto", "--no-cache", "--json", "-q", "--out", "out"], capsys)
    assert code in (0, 1), err[-3000:]
    m = json.loads(stdout)
    assert m["model"]["inputs"][0]["shape"] == [1, 1, 64, 96]  # not [1, 1, 64, 1]: the width is not the batch
    assert "dimension width = 96, from the data" in m["model"]["source"]
    assert m["model"]["outputs"][0]["shape"] == [1, 96, 4]
    assert m["targets"]["onnx-cpu"]["verdict"] != "error", m["targets"]["onnx-cpu"]


@pytest.mark.slow
def test_mixed_widths_are_exit_2_and_the_suggested_flag_builds(tmp_path, capsys, monkeypatch):
    """Images of two widths: exit 2 with the fix, nothing written; the fix as given builds (the images are resized
    to the model's input)."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    ocr_onnx(tmp_path / "ocr.onnx")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        w = 96 if i % 3 else 112
        Image.fromarray((rng.random((64, w)) * 255).astype(np.uint8), "L").save(tmp_path / "imgs" / f"{i:02d}.png")
    (tmp_path / "edgebuild.yaml").write_text("model: ocr.onnx\ncalib: imgs\npreprocess: {color: gray}\n")
    args = ["-t", "onnx-cpu", "--no-auto", "--no-cache", "--json", "-q", "--out", "out"]
    code, stdout, err = _cli(args, capsys)
    assert code == 2 and not (tmp_path / "out").exists()
    line = err.strip().splitlines()[-1]
    assert "'width' on axis 3" in line and "(N, 1, 64, 1)" not in line, line
    fix = line.split("or --input-shape ")[1].split()[0]
    assert fix == "image:1,1,64,96", line
    code, stdout, err = _cli([*args, "--input-shape", fix], capsys)
    assert code in (0, 1), err[-3000:]
    assert json.loads(stdout)["model"]["inputs"][0]["shape"] == [1, 1, 64, 96]
