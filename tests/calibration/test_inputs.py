"""Inputs of every kind: 0-d scalars, batch not on axis 0, integer and bool inputs, several inputs.

The contract: ``feed(i)`` gives every input in the model's exact shape and dtype, whatever layout the
data came in; data that fits no layout is one BadInputError saying which shapes would work."""
import numpy as np
import pytest

from edgebuild.calibration.dataset import SampleSet, batch_axis, sample_shape
from edgebuild.calibration.sources import load_source
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import InputSpec, PreprocessSpec

VAD = (InputSpec("input", (1, 576), "float32", "ANY"), InputSpec("state", (2, 1, 128), "float32", "ANY"),
       InputSpec("sr", (), "int64", "ANY"))
BERT = (InputSpec("input_ids", (1, 16), "int64", "ANY"), InputSpec("attention_mask", (1, 16), "int64", "ANY"))
N = 6
rng = np.random.default_rng(0)


def load(tmp_path, inputs, **arrays):
    np.savez(tmp_path / "d.npz", **arrays)
    return load_source(str(tmp_path / "d.npz"), inputs, PreprocessSpec())


def assert_exact_feeds(data: SampleSet, inputs):
    for feed in data.feeds():
        assert list(feed) == [i.name for i in inputs]
        for spec in inputs:
            assert isinstance(feed[spec.name], np.ndarray)
            assert feed[spec.name].shape == spec.shape and feed[spec.name].dtype == np.dtype(spec.dtype), spec


def test_batch_axis_is_the_first_axis_of_size_one():
    assert batch_axis((1, 3, 8, 8)) == 0 and batch_axis((2, 1, 128)) == 1 and batch_axis(()) is None
    assert batch_axis((576,)) is None and sample_shape((2, 1, 128)) == (2, 128) and sample_shape(()) == ()


@pytest.mark.parametrize("state", [(N, 2, 128), (N, 2, 1, 128), (2, 1, 128), (2, 128)])
@pytest.mark.parametrize("sr", [(N,), (), (N, 1), (1,)])
def test_vad_layouts_all_give_exact_feeds(tmp_path, state, sr):
    st = rng.standard_normal(state).astype(np.float32)
    data = load(tmp_path, VAD, input=rng.standard_normal((N, 576)).astype(np.float32), state=st,
                sr=np.full(sr, 16000, np.int64))
    assert len(data) == N
    assert_exact_feeds(data, VAD)
    feed = data.feed(N - 1)
    assert feed["sr"].ndim == 0 and int(feed["sr"]) == 16000
    want = st[N - 1] if len(state) == 3 and state[0] == N or len(state) == 4 else st
    assert np.array_equal(feed["state"].reshape(2, 128), want.reshape(2, 128))


def test_state_layout_that_fits_nothing_says_what_would(tmp_path):
    with pytest.raises(BadInputError) as e:
        load(tmp_path, VAD, input=np.zeros((N, 576), np.float32), state=np.zeros((N, 1, 128), np.float32),
             sr=np.int64(16000))
    msg = str(e.value)
    assert "\n" not in msg and "state" in msg and "(N, 2, 128)" in msg and "(N, 2, 1, 128)" in msg


@pytest.mark.parametrize("ids", [(N, 16), (N, 1, 16)])
def test_integer_sequence_inputs_keep_their_values(tmp_path, ids):
    x = rng.integers(0, 1000, ids)
    data = load(tmp_path, BERT, input_ids=x, attention_mask=np.ones(ids, np.int32))
    assert_exact_feeds(data, BERT)
    assert np.array_equal(data.feed(2)["input_ids"].ravel(), x[2].ravel())  # never normalised


def test_float_data_for_an_integer_input_must_be_whole_numbers(tmp_path):
    data = load(tmp_path, BERT, input_ids=np.full((N, 16), 7.0), attention_mask=np.ones((N, 16)))
    assert data.inputs["input_ids"].dtype == np.int64
    with pytest.raises(BadInputError, match="whole numbers"):
        load(tmp_path, BERT, input_ids=np.full((N, 16), 0.5), attention_mask=np.ones((N, 16)))


def test_bool_input(tmp_path):
    spec = (InputSpec("x", (1, 4), "float32", "ANY"), InputSpec("flag", (1,), "uint8", "ANY"))
    data = load(tmp_path, spec, x=np.zeros((3, 4)), flag=np.array([True, False, True]))
    assert [int(f["flag"][0]) for f in data.feeds()] == [1, 0, 1]


def test_batch_groups_samples_along_each_inputs_batch_axis(tmp_path):
    data = load(tmp_path, VAD, input=np.zeros((N, 576)), state=rng.standard_normal((N, 2, 128)), sr=np.int64(8000))
    b = data.batch([0, 1, 2])
    assert b["input"].shape == (3, 576) and b["state"].shape == (2, 3, 128) and b["sr"].shape == ()
    assert np.array_equal(b["state"][:, 1], data.feed(1)["state"][:, 0])
    stacked = data.stacked_feeds(4)
    assert stacked["state"].shape == (4, 2, 1, 128) and np.array_equal(stacked["state"][3], data.feed(3)["state"])


def test_subset_and_describe_keep_the_model_shapes(tmp_path):
    data = load(tmp_path, VAD, input=np.zeros((N, 576)), state=np.zeros((N, 2, 128)), sr=np.int64(8000))
    sub = data.subset([1, 3])
    assert_exact_feeds(sub, VAD)
    assert sub.describe()["inputs"]["state"]["shape"] == [2, 1, 128] and data.origin["broadcast"] == ["sr"]


def test_sample_counts_must_agree(tmp_path):
    with pytest.raises(BadInputError, match="different sample counts"):
        load(tmp_path, BERT, input_ids=np.zeros((5, 16)), attention_mask=np.zeros((4, 16)))


def test_npz_with_some_inputs_missing_names_them(tmp_path):
    with pytest.raises(BadInputError, match="attention_mask"):
        load(tmp_path, BERT, input_ids=np.zeros((5, 16)))


# ---- data validation: never silently wrong ---------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_bad_input_naming_source_and_input(tmp_path, bad):
    x = np.zeros((N, 1, 8, 8), np.float32)
    x[3, 0, 2, 2] = bad
    with pytest.raises(BadInputError, match=r"d\.npz: input input has 1 NaN/Inf value\(s\) \(first in sample 3\)"):
        load(tmp_path, (InputSpec("input", (1, 1, 8, 8)),), x=x)


def test_nan_in_a_npy(tmp_path):
    x = np.zeros((N, 64))
    x[0, 0] = np.nan
    np.save(tmp_path / "d.npy", x)
    with pytest.raises(BadInputError, match="NaN/Inf"):
        load_source(str(tmp_path / "d.npy"), (InputSpec("input", (1, 1, 8, 8)),), PreprocessSpec())


def test_overflow_to_float16_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="overflows float16"):
        load(tmp_path, (InputSpec("x", (1, 4), "float16", "ANY"),), x=np.full((3, 4), 1e6))


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_complex_data_is_never_cast(tmp_path, suffix):
    x = np.zeros((N, 64), np.complex64)
    path = tmp_path / f"d{suffix}"
    np.save(path, x) if suffix == ".npy" else np.savez(path, x=x)
    with pytest.raises(BadInputError, match="complex"):
        load_source(str(path), (InputSpec("input", (1, 1, 8, 8)),), PreprocessSpec())


def test_strings_are_bad_input(tmp_path):
    np.save(tmp_path / "d.npy", np.array(["a", "b", "c", "d"]))
    with pytest.raises(BadInputError, match="not numbers"):
        load_source(str(tmp_path / "d.npy"), (InputSpec("input", (1, 1, 8, 8)),), PreprocessSpec())


def test_object_npy_is_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "d.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(BadInputError, match="not a readable .npy"):
        load_source(str(tmp_path / "d.npy"), (InputSpec("input", (1, 1, 8, 8)),), PreprocessSpec())


def test_image_folder_for_an_integer_input_keeps_raw_pixels(tmp_path):
    from PIL import Image

    for i in range(2):
        Image.new("L", (8, 8), 200).save(tmp_path / f"{i}.png")
    pre = PreprocessSpec(color="gray", mean=(0.5,), std=(0.25,))
    data = load_source(str(tmp_path), (InputSpec("img", (1, 1, 8, 8), "uint8"),), pre)
    assert data.inputs["img"].dtype == np.uint8 and int(data.inputs["img"].max()) == 200
    flt = load_source(str(tmp_path), (InputSpec("img", (1, 1, 8, 8)),), pre)
    assert flt.inputs["img"].max() == pytest.approx((200 / 255 - 0.5) / 0.25)
    with pytest.raises(BadInputError, match="image folder gives one input"):
        load_source(str(tmp_path), BERT, pre)
