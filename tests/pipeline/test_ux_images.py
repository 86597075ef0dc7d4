"""Image folders without a YAML file: resize defaults to the model's input size; preprocessing flags."""
import numpy as np
import pytest
from PIL import Image

from edgebuild.calibration.sources import load_source, model_image_size
from edgebuild.pipeline.cli import spec_from_flags
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import InputSpec, PreprocessSpec


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, sizes in (("cat", [(20, 30), (64, 48)]), ("dog", [(10, 10), (33, 17)])):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def test_images_of_any_size_are_resized_to_the_model_input(tmp_path):
    folder = _folder(tmp_path)
    data = load_source(str(folder), (InputSpec("input", (1, 3, 12, 16), "float32", "NCHW"),), PreprocessSpec())
    assert data.inputs["input"].shape[1:] == (3, 12, 16) and list(data.labels) == [0, 0, 1, 1]
    assert data.origin["resize"] == [12, 16] and data.origin["classes"] == ["cat", "dog"]
    nhwc = load_source(str(folder), (InputSpec("input", (1, 12, 16, 3), "float32", "NHWC"),), PreprocessSpec())
    assert nhwc.inputs["input"].shape[1:] == (12, 16, 3)
    given = load_source(str(folder), (InputSpec("input", (1, 3, 12, 16), "float32", "NCHW"),),
                        PreprocessSpec(resize=(12, 16), scale=1.0))
    assert given.inputs["input"].max() > 1.5  # the given preprocessing is kept


def test_model_image_size():
    assert model_image_size(InputSpec("x", (1, 3, 224, 200), layout="NCHW")) == (224, 200)
    assert model_image_size(InputSpec("x", (1, 224, 200, 3), layout="NHWC")) == (224, 200)
    assert model_image_size(InputSpec("x", (1, 128))) is None


def _flags(**over):
    base = dict(input_shape=None, max_accuracy_drop=None, max_latency_ms=None, max_size_mb=None,
                max_compression_drop=None, no_auto=False, no_cache=False, trust_model=False, compress_steps=(),
                target=(), profile=(), resize=None, mean=None, std=None, scale=None, color=None, layout=None)
    return {**base, **over}


def test_preprocessing_flags_make_the_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, _ = spec_from_flags(None, **_flags(resize="224", mean="0.485,0.456,0.406", std="0.229,0.224,0.225",
                                             scale=0.5, color="bgr", layout="NHWC"))
    p = spec.preprocess
    assert p.resize == (224, 224) and p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert (p.scale, p.color, p.layout) == (0.5, "bgr", "NHWC")
    (tmp_path / "edgebuild.yaml").write_text("preprocess: {resize: [10, 20], mean: [1, 2, 3]}\n")
    spec, _ = spec_from_flags(None, **_flags(std="2"))
    assert spec.preprocess.resize == (10, 20) and spec.preprocess.mean == (1, 2, 3) and spec.preprocess.std == (2,)
    with pytest.raises(BadInputError, match="--resize"):
        spec_from_flags(None, **_flags(resize="1,2,3"))
    with pytest.raises(BadInputError, match="--mean"):
        spec_from_flags(None, **_flags(mean="a,b"))
