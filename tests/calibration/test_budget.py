"""The calibration sample count is scaled to the model's cost, in one place (calibration/budget.py)."""
from __future__ import annotations

import numpy as np
import pytest

from edgebuild.calibration import budget as B
from edgebuild.calibration.dataset import SampleSet


def conv_model(path, size: int, channels: int = 8):
    """Conv -> Relu on a [1, 3, size, size] input: 2 * channels * size^2 float activation elements."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((channels, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_activation_elements_sums_every_float_tensor_the_nodes_write(tmp_path):
    assert B.activation_elements(conv_model(tmp_path / "m.onnx", 16, channels=8)) == 2 * 8 * 16 * 16


def test_activation_elements_counts_a_tensor_once_when_the_graph_lists_its_value_info(tmp_path):
    import onnx

    path = conv_model(tmp_path / "m.onnx", 16, channels=8)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    model.graph.value_info.extend(list(model.graph.value_info))  # each listed twice, as edgebuild's export left ResNet-50
    onnx.save(model, str(path))
    assert B.activation_elements(path) == 2 * 8 * 16 * 16


def test_activation_elements_unknown_when_shape_inference_knows_nothing(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    assert B.activation_elements(tmp_path / "bad.onnx") is None


def test_tiny_model_gets_the_requested_count(tmp_path):
    elements = B.activation_elements(conv_model(tmp_path / "m.onnx", 8))
    c = B.choose_samples(1000, None, elements)
    assert (c.used, c.requested, c.explicit) == (B.DEFAULT_SAMPLES, B.DEFAULT_SAMPLES, False)
    assert "fit the calibration budget" in c.reason


def test_big_activation_model_gets_fewer_samples_but_not_fewer_than_the_floor(tmp_path):
    small = B.choose_samples(1000, None, B.ELEMENT_BUDGET // 100)
    assert small.used == 100 and "budget" in small.reason and "set calib_samples" in small.reason
    big = B.activation_elements(conv_model(tmp_path / "big.onnx", 512, channels=64))  # 33.5 M per sample
    c = B.choose_samples(1000, None, big)
    assert c.used == max(B.MIN_SAMPLES, B.ELEMENT_BUDGET // big) < B.DEFAULT_SAMPLES
    huge = B.choose_samples(1000, None, B.ELEMENT_BUDGET)  # one sample would fill the budget
    assert huge.used == B.MIN_SAMPLES and "the floor" in huge.reason


def test_more_activation_never_means_more_samples():
    counts = [B.choose_samples(300, None, e).used for e in (10**3, 10**6, 10**7, 3 * 10**7, 10**8, 10**9)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 300 and counts[-1] == B.MIN_SAMPLES


def test_an_explicit_request_wins_over_the_budget_and_the_default():
    c = B.choose_samples(1000, 500, B.ELEMENT_BUDGET)  # would be the floor without the request
    assert (c.used, c.explicit) == (500, True) and "given" in c.reason
    assert B.choose_samples(1000, 10, 1).used == 10  # below the floor too: the user asked


def test_never_more_than_the_data_holds():
    assert B.choose_samples(20, None, B.ELEMENT_BUDGET).used == 20  # below the floor: all there is
    c = B.choose_samples(120, 500, 1)
    assert c.used == 120 and "holds 120" in c.reason


def test_unknown_cost_keeps_the_requested_count():
    c = B.choose_samples(1000, None, None)
    assert c.used == B.DEFAULT_SAMPLES and "unknown" in c.reason
    assert c.to_dict()["activation_elements"] is None


def test_at_most_is_a_random_part_not_the_first_samples():
    data = SampleSet("d", {"x": np.arange(200, dtype=np.float32)[:, None]})
    assert B.at_most(data, None) is data and B.at_most(data, 500) is data
    part = B.at_most(data, 50)
    values = part.inputs["x"][:, 0]
    assert len(part) == 50 and values.max() > 100  # spread over the data, not its first 50
    assert np.array_equal(values, B.at_most(data, 50).inputs["x"][:, 0])  # deterministic


@pytest.mark.parametrize("requested", [None, 64])
def test_budget_calibration_records_the_choice(tmp_path, requested):
    from edgebuild.pipeline.spec import BuildSpec
    from edgebuild.pipeline.stages.data import budget_calibration

    model = conv_model(tmp_path / "m.onnx", 512, channels=64)
    data = SampleSet("d", {"x": np.zeros((300, 3, 4, 4), np.float32)})
    record: dict = {}
    calib = budget_calibration(data, model, BuildSpec(calib_samples=requested), record)
    choice = record["calibration_samples"]
    expected = requested or max(B.MIN_SAMPLES, B.ELEMENT_BUDGET // choice["activation_elements"])
    assert len(calib) == choice["used"] == record["calibration"]["samples"] == expected
    assert choice["explicit"] is (requested is not None) and choice["reason"]
