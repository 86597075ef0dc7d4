"""A SampleSet never changes once made: its arrays are read-only, so its content hash (computed once) stays true."""
import numpy as np
import pytest

from edgebuild.calibration.dataset import SampleSet


def test_a_sample_set_is_read_only_and_hashes_itself_once():
    x = np.zeros((4, 3), np.float32)
    ds = SampleSet("s", {"x": x}, np.arange(4))
    first = ds.content_hash()
    with pytest.raises(ValueError):
        ds.inputs["x"][0, 0] = 1.0  # the arrays it was given cannot be changed under it
    with pytest.raises(ValueError):
        ds.labels[0] = 3
    x[0, 0] = 0.0  # the caller's own array stays writable
    assert ds.content_hash() == first == SampleSet("t", {"x": np.zeros((4, 3), np.float32)}, np.arange(4)).content_hash()
    assert SampleSet("u", {"x": np.ones((4, 3), np.float32)}, np.arange(4)).content_hash() != first
