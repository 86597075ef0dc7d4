"""Image folders: EXIF orientation, centre crop, interpolation, and decoding into a disk-backed array."""
import numpy as np
import pytest
from PIL import Image

from edgebuild.calibration import sources
from edgebuild.calibration.sources import center_box, load_source, preprocess_image
from edgebuild.pipeline.cli import spec_from_flags
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import InputSpec, PreprocessSpec

GRAY = (InputSpec("input", (1, 1, 4, 6), "float32", "NCHW"),)


def _landscape() -> Image.Image:
    """6 wide, 4 tall: the left half black, the right half white."""
    a = np.zeros((4, 6), np.uint8)
    a[:, 3:] = 255
    return Image.fromarray(a)


def test_exif_orientation_is_applied(tmp_path):
    # stored 4 wide x 6 tall with EXIF orientation 8 (viewers turn it 90° counter-clockwise): upright it is _landscape()
    stored = _landscape().transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "photo.jpg") as im:
        assert im.size == (4, 6)
        a = preprocess_image(im, PreprocessSpec(color="gray", scale=1.0))
    assert a.shape == (1, 4, 6)  # upright: 6 wide, 4 tall
    assert a[0, :, :2].mean() < 40 and a[0, :, 4:].mean() > 215  # black left, white right, as photographed


def test_center_box_keeps_the_output_aspect_and_the_fraction_of_the_shorter_side():
    assert center_box((200, 100), 1.0, (10, 10)) == (50, 0, 150, 100)
    assert center_box((256, 256), 0.875, (224, 224)) == (16, 16, 240, 240)
    left, top, right, bottom = center_box((300, 200), 1.0, (100, 200))  # wide output: 2:1 box
    assert (right - left, bottom - top) == (300, 150) and top == 25


def test_crop_and_interpolation_change_the_pixels_as_asked():
    a = np.zeros((8, 8), np.uint8)
    a[2:6, 2:6] = 200  # a bright centre
    im = Image.fromarray(a)
    whole = preprocess_image(im, PreprocessSpec(color="gray", scale=1.0, resize=(4, 4), interpolation="nearest"))
    cropped = preprocess_image(im, PreprocessSpec(color="gray", scale=1.0, resize=(4, 4), crop=0.5,
                                                  interpolation="nearest"))
    assert cropped.min() == 200 and whole.min() == 0  # the crop keeps only the centre
    near = preprocess_image(im, PreprocessSpec(color="gray", scale=1.0, resize=(3, 3), interpolation="nearest"))
    smooth = preprocess_image(im, PreprocessSpec(color="gray", scale=1.0, resize=(3, 3), interpolation="bilinear"))
    assert set(np.unique(near)) <= {0.0, 200.0} and not np.array_equal(near, smooth)


def test_preprocess_options_are_checked():
    with pytest.raises(BadInputError, match="preprocess.crop"):
        PreprocessSpec(crop=1.5)
    with pytest.raises(BadInputError, match="preprocess.interpolation"):
        PreprocessSpec(interpolation="sinc")


def test_crop_and_interpolation_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, _ = spec_from_flags(None, **_flags(crop=0.875, interpolation="bilinear"))
    assert spec.preprocess.crop == 0.875 and spec.preprocess.interpolation == "bilinear"


def _flags(**given):
    names = ("target", "model", "weights", "input_shape", "calib", "eval", "calib_samples", "resize", "scale", "mean",
             "std", "color", "layout", "crop", "interpolation", "out", "precision", "max_accuracy_drop",
             "max_latency_ms", "max_size_mb", "max_compression_drop", "profile", "compress_steps", "train")
    flags = {n: () if n in ("target", "profile", "compress_steps") else None for n in names}
    flags.update(no_auto=False, no_cache=False, trust_model=False, **given)
    return flags


def _folder(root, n=6):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 255, (9, 11), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_large_folders_are_decoded_into_a_disk_backed_array(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "imgs")
    in_memory = load_source(str(folder), GRAY, PreprocessSpec(color="gray"))
    assert "disk_backed" not in in_memory.origin
    monkeypatch.setattr(sources, "IN_MEMORY_BYTES", 64)  # anything bigger than 64 bytes goes to disk
    streamed = load_source(str(folder), GRAY, PreprocessSpec(color="gray"))
    assert streamed.origin["disk_backed"] is True
    base = streamed.inputs["input"]
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    np.testing.assert_array_equal(streamed.inputs["input"], in_memory.inputs["input"])
    assert list(streamed.labels) == list(in_memory.labels)


def test_images_of_different_sizes_without_resize_name_two_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("L", (5, 5)).save(tmp_path / "imgs" / "a.png")
    Image.new("L", (6, 5)).save(tmp_path / "imgs" / "b.png")
    with pytest.raises(BadInputError, match="a.png.*b.png"):
        load_source(str(tmp_path / "imgs"), (), PreprocessSpec(color="gray"))


def test_nncf_dataset_makes_feeds_on_demand_and_every_pass_sees_every_sample():
    pytest.importorskip("nncf")
    from edgebuild.calibration.adapters import nncf_dataset
    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.calibration.sources import digits

    made = []

    class Counting(SampleSet):
        def feed(self, i):
            made.append(i)
            return super().feed(i)

    d = digits("test").subset(np.arange(5))
    ds = nncf_dataset(Counting(d.name, d.inputs, d.labels, d.origin, d.shapes))
    assert made == [] and ds.get_length() == 5  # nothing copied up front
    first, second = list(ds.get_inference_data()), list(ds.get_inference_data())
    assert len(first) == len(second) == 5 and made == [0, 1, 2, 3, 4] * 2
    np.testing.assert_array_equal(first[3]["input"], d.feed(3)["input"])
