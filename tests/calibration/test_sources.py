import numpy as np
import pytest

from edgebuild.calibration.dataset import SampleSet, cap, drop_overlap, split
from edgebuild.calibration.sources import digits, fit_to_inputs, load_source
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import InputSpec, PreprocessSpec

NCHW = (InputSpec("input", (1, 1, 8, 8)),)


def test_digits_splits_are_disjoint_and_fixed():
    train, test = digits("train"), digits("test")
    assert len(train) == 1000 and len(test) == 797
    assert not set(train.sample_hashes()) & set(test.sample_hashes()) or \
        len(set(train.sample_hashes()) & set(test.sample_hashes())) < 5  # sklearn digits has a few duplicate images
    assert train.content_hash() == digits("train").content_hash()
    assert train.inputs["input"].shape[1:] == (1, 8, 8) and train.inputs["input"].max() <= 1.0


def test_split_is_deterministic_and_disjoint():
    data = digits("all")
    a_cal, a_ev = split(data, 0.3, seed=1)
    b_cal, b_ev = split(data, 0.3, seed=1)
    assert a_ev.content_hash() == b_ev.content_hash()
    assert len(a_cal) + len(a_ev) == len(data)
    assert abs(len(a_ev) - 0.3 * len(data)) <= 1
    assert a_ev.origin["split"]["seed"] == 1


def test_overlap_is_removed_from_calibration():
    data = digits("train")
    calib = data.subset(np.arange(0, 100))
    evalset = data.subset(np.arange(50, 150))
    cleaned, removed = drop_overlap(calib, evalset)
    assert removed >= 50 and not set(cleaned.sample_hashes()) & set(evalset.sample_hashes())
    with pytest.raises(BadInputError):
        drop_overlap(evalset, evalset)


def test_cap_keeps_a_deterministic_subset():
    data = digits("train")
    assert len(cap(data, 10, 0)) == 10
    assert cap(data, 10, 0).content_hash() == cap(data, 10, 0).content_hash()


def test_npz_with_labels_and_named_inputs(tmp_path):
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", input=x, labels=np.arange(20) % 10)
    data = load_source(str(tmp_path / "d.npz"), NCHW, PreprocessSpec())
    assert data.has_labels and len(data) == 20 and np.array_equal(data.inputs["input"], x)


def test_npz_without_recognisable_inputs_is_bad_input(tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 3)), b=np.zeros((2, 3)))
    with pytest.raises(BadInputError, match="cannot tell which arrays"):
        load_source(str(tmp_path / "d.npz"), NCHW, PreprocessSpec())


def test_npy_is_reshaped_to_the_input(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((5, 64), dtype=np.float64))
    data = load_source(str(tmp_path / "d.npy"), NCHW, PreprocessSpec())
    assert data.inputs["input"].shape == (5, 1, 8, 8) and data.inputs["input"].dtype == np.float32
    assert not data.has_labels


def test_image_folder_with_classes_and_preprocessing(tmp_path):
    from PIL import Image

    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 10), colour).save(tmp_path / c / f"{i}.png")
    pre = PreprocessSpec(resize=(8, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = load_source(str(tmp_path), (InputSpec("img", (1, 3, 8, 16)),), pre)
    assert data.inputs["img"].shape == (6, 3, 8, 16)
    assert list(data.labels) == [0, 0, 0, 1, 1, 1]
    assert data.inputs["img"][0, 0, 0, 0] == pytest.approx(1.0) and data.inputs["img"][0, 2, 0, 0] == pytest.approx(-1.0)
    nhwc = load_source(str(tmp_path), (InputSpec("img", (1, 8, 16, 3), layout="NHWC"),), pre)
    assert nhwc.inputs["img"].shape == (6, 8, 16, 3)


def test_unreadable_image_is_bad_input(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match="cannot read image"):
        load_source(str(tmp_path), NCHW, PreprocessSpec())


def test_shape_mismatch_is_bad_input():
    data = SampleSet("x", {"input": np.zeros((3, 5), np.float32)})
    with pytest.raises(BadInputError, match="do not fit"):
        fit_to_inputs(data, NCHW)


def test_adapters_feed_every_sample():
    from edgebuild.calibration.adapters import ort_reader

    data = digits("test").subset(np.arange(7))
    reader = ort_reader(data)
    feeds = []
    while (f := reader.get_next()) is not None:
        feeds.append(f)
    assert len(feeds) == 7 and feeds[0]["input"].shape == (1, 1, 8, 8)
    reader.rewind()
    assert reader.get_next() is not None


def test_one_hot_labels_become_indices(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32), y=np.eye(10)[[3, 1, 4, 1]])
    data = load_source(str(tmp_path / "d.npz"), NCHW, PreprocessSpec())
    assert list(data.labels) == [3, 1, 4, 1]


def test_calibration_and_evaluation_folders_must_share_classes(tmp_path):
    from PIL import Image

    from edgebuild.pipeline.spec import BuildSpec
    from edgebuild.pipeline.stages.data import resolve_data

    for split, classes in (("calib", ["a", "b", "c"]), ("eval", ["a", "c"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("L", (8, 8), 10 * len(c)).save(tmp_path / split / c / f"{split}.png")
    spec = BuildSpec(model="m.onnx", calib=str(tmp_path / "calib"), eval=str(tmp_path / "eval"),
                     preprocess=PreprocessSpec(color="gray"))
    with pytest.raises(BadInputError, match="different class sub-folders"):
        resolve_data(spec, NCHW)


def test_a_subset_of_a_disk_backed_set_stays_on_disk(tmp_path):
    """A large image folder is decoded into a disk-backed array; splitting it into calibration and evaluation must
    not copy either half into memory."""
    import numpy as np

    from edgebuild.calibration.dataset import SampleSet

    data = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=(300, 3, 4, 4))
    data[:] = np.random.default_rng(0).normal(size=data.shape)
    full = SampleSet("big", {"input": data}, np.arange(300))
    idx = np.random.default_rng(1).permutation(300)[:130]
    part = full.subset(idx)
    assert isinstance(part.inputs["input"], np.memmap)
    np.testing.assert_array_equal(part.inputs["input"], np.asarray(data)[idx])
    assert (part.labels == idx).all()
    assert len(full.subset([]).inputs["input"]) == 0
