"""Running and comparing apart: the build saves its FP32 reference (pipeline/stages/reference.py), and
`edgebuild validate DIR --outputs device_outputs.npz` judges outputs produced elsewhere against it, running nothing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgebuild.calibration.dataset import SampleSet
from edgebuild.errors import BadInputError
from edgebuild.pipeline.cli import main
from edgebuild.pipeline.stages import reference as R


def _saved(tmp_path: Path, labels=True) -> tuple[Path, SampleSet, list]:
    rng = np.random.default_rng(0)
    evalset = SampleSet("eval", {"image": rng.random((5, 1, 4, 4), np.float32), "scale": rng.random((5, 2), np.float32)},
                             rng.integers(0, 3, 5) if labels else None, {}, {"image": (1, 1, 4, 4), "scale": (1, 2)})
    reference = [[rng.random((1, 3), np.float32), rng.random((1, 2, 2), np.float32)] for _ in range(5)]
    assert R.save(tmp_path, reference, evalset, ["onnx::logits:0", "boxes/out"])
    return tmp_path, evalset, reference


def test_the_saved_reference_is_keyed_by_name_sample_major_and_loads_back(tmp_path):
    refdir, evalset, reference = _saved(tmp_path)
    record = json.loads((refdir / "reference.json").read_text())
    assert record["format"] == R.FORMAT and record["outputs"] == ["onnx::logits:0", "boxes/out"]
    assert record["evaluation_content_hash"] == evalset.content_hash() and record["labels"] == "labels"
    with np.load(refdir / "outputs.npz") as z:
        assert sorted(z.files) == sorted(record["outputs"]) and z["onnx::logits:0"].shape == (5, 1, 3)
        np.testing.assert_array_equal(z["boxes/out"][3], reference[3][1])
    with np.load(refdir / "feeds.npz") as z:
        assert sorted(z.files) == ["image", "labels", "scale"] and z["image"].shape == (5, 1, 4, 4)
    saved = R.load(refdir)
    assert saved.evalset.content_hash() == evalset.content_hash()
    assert saved.evalset.describe()["inputs"] == evalset.describe()["inputs"]
    assert all(np.array_equal(a, b) for s, t in zip(saved.outputs, reference) for a, b in zip(s, t))


def test_feeds_npz_is_the_npz_data_source_format(tmp_path):
    from edgebuild.calibration.sources import load_source
    from edgebuild.specs import InputSpec, PreprocessSpec

    refdir, evalset, _ = _saved(tmp_path)
    inputs = (InputSpec("image", (1, 1, 4, 4), "float32", "NCHW"), InputSpec("scale", (1, 2), "float32", "NC"))
    again = load_source(str(refdir / "feeds.npz"), inputs, PreprocessSpec())
    assert again.content_hash() == evalset.content_hash()


def test_device_outputs_are_read_by_name_or_position_and_put_in_the_reference_shape(tmp_path):
    refdir, _, reference = _saved(tmp_path)
    saved = R.load(refdir)
    by_name = tmp_path / "device.npz"
    np.savez(by_name, **{"onnx::logits:0": np.stack([r[0][0] for r in reference]).astype(np.float16),  # batch dropped
                         "boxes/out": np.stack([r[1] for r in reference]), "extra": np.zeros(1)})
    got = R.read_outputs(by_name, saved)
    assert got[2][0].shape == (1, 3) and got[2][0].dtype == np.float32
    np.testing.assert_allclose(got[2][0], reference[2][0], atol=1e-3)
    positional = tmp_path / "runner_outputs.npz"  # the device runner's own file: y0, y1 in the model's output order
    np.savez(positional, y0=np.stack([r[0] for r in reference]), y1=np.stack([r[1] for r in reference]))
    np.testing.assert_array_equal(R.read_outputs(positional, saved)[4][1], reference[4][1])


@pytest.mark.parametrize("arrays,message", [
    ({"onnx::logits:0": np.zeros((5, 1, 3))}, "no array for output.*boxes/out"),
    ({"onnx::logits:0": np.zeros((4, 1, 3)), "boxes/out": np.zeros((4, 1, 2, 2))}, "has 4 samples, the reference 5"),
    ({"onnx::logits:0": np.zeros((5, 1, 4)), "boxes/out": np.zeros((5, 1, 2, 2))}, r"samples of shape \[1, 4\]"),
    ({"onnx::logits:0": np.array(["a"] * 5), "boxes/out": np.zeros((5, 1, 2, 2))}, "not numbers"),
    ({"onnx::logits:0": np.array([{"x": 1}] * 5, dtype=object), "boxes/out": np.zeros((5, 4))}, "not a readable"),
])
def test_a_device_file_that_does_not_fit_is_bad_input(tmp_path, arrays, message):
    refdir, _, _ = _saved(tmp_path)
    path = tmp_path / "device.npz"
    np.savez(path, **arrays)
    with pytest.raises(BadInputError, match=message):
        R.read_outputs(path, R.load(refdir))


def test_missing_truncated_or_foreign_reference_is_bad_input(tmp_path):
    refdir, _, _ = _saved(tmp_path)
    (refdir / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="not a .npz archive"):
        R.read_outputs(refdir / "junk.npz", R.load(refdir))
    with np.load(refdir / "feeds.npz") as z:
        feeds = {k: z[k] for k in z.files}
    feeds["image"] = feeds["image"] + 1
    np.savez(refdir / "feeds.npz", **feeds)
    with pytest.raises(BadInputError, match="does not hold the evaluation data"):
        R.load(refdir)
    (refdir / "reference.json").unlink()
    with pytest.raises(BadInputError, match="no saved reference outputs"):
        R.load(refdir)


def test_outputs_that_vary_in_shape_save_feeds_only(tmp_path):
    evalset = SampleSet("eval", {"x": np.zeros((2, 3), np.float32)})
    assert not R.save(tmp_path, [[np.zeros((1, 2))], [np.zeros((1, 3))]], evalset, ["dets"])
    assert (tmp_path / "feeds.npz").is_file() and not (tmp_path / "reference.json").exists()


# ---- end to end: a real build, outputs computed by hand, compared by the CLI -----------------------------
def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_validate_outputs_judges_a_device_file_without_running_anything(tmp_path, capsys, monkeypatch):
    from edgebuild.targets.base import Artifact, get_backend

    out = tmp_path / "out"
    assert run(["--target", "onnx-cpu", "--out", str(out)], capsys)[0] == 0
    target, refdir = out / "onnx-cpu", out / "reference"
    meta = json.loads((target / "metadata.json").read_text())
    art = Artifact(meta["target"], meta["backend"], meta["precision"], target, meta["artifact"], list(meta["files"]),
                   meta["settings"], meta["io"])
    with np.load(refdir / "feeds.npz") as z:
        feeds = [{"input": z["input"][i].reshape(1, 1, 8, 8)} for i in range(len(z["input"]))]
    with get_backend("onnx").runner(art, 1) as runner:  # "the device": the artifact run outside edgebuild's validate
        logits = np.stack([runner.run(f)[0] for f in feeds])
    (name,) = json.loads((refdir / "reference.json").read_text())["outputs"]
    good, bad = tmp_path / "device.npz", tmp_path / "wrong.npz"
    np.savez(good, **{name: logits})
    np.savez(bad, **{name: np.roll(logits, 1, axis=0)})  # every sample's result given to its neighbour

    import edgebuild.pipeline.revalidate as revalidate
    import edgebuild.targets.base as base

    def no_runtime(*a, **k):
        raise AssertionError("--outputs must not run a runtime")

    monkeypatch.setattr(base, "reference_runner", no_runtime)
    monkeypatch.setattr(revalidate, "build_evalset", no_runtime)
    monkeypatch.setattr(type(get_backend("onnx")), "runner", no_runtime)
    code, stdout, err = run(["validate", str(target), "--outputs", str(good), "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["verdict"] == "pass" and result["metrics"]["accuracy"] > 90 and result["latency"] is None
    assert result["outputs_file"]["samples"] == len(feeds) and result["reference"].startswith("saved")
    assert json.loads((target / "validation_outputs.json").read_text()) == result
    code, stdout, err = run(["validate", str(target), "--outputs", str(bad)], capsys)
    assert code == 1 and "FAIL" in stdout and "edgebuild: error: onnx-cpu:" in err
    np.savez(bad, **{name: logits[:-1]})
    code, _, err = run(["validate", str(target), "--outputs", str(bad)], capsys)
    assert code == 2 and "samples" in err and "Traceback" not in err
    code, _, err = run(["validate", str(target), "--outputs", str(good), "--eval", "digits:test"], capsys)
    assert code == 2 and "drop --eval" in err
