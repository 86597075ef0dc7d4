import numpy as np
import pytest

from edgebuild.targets.base import get_backend
from edgebuild.targets.onnx import OrtRunner
from edgebuild.targets.profiles import catalogue


def _accuracy(runner, data):
    pred = np.array([runner.run(f)[0].argmax() for f in data.feeds()])
    return (pred == data.labels).mean() * 100


@pytest.mark.parametrize("precision,name", [("fp32", "model_fp32.onnx"), ("fp16", "model_fp16.onnx"),
                                            ("dynamic", "model_dynamic_int8.onnx"), ("int8", "model_int8_qdq.onnx")])
def test_onnx_cpu_builds_every_precision_with_an_honest_name(model, small_sets, tmp_path, precision, name):
    import onnx

    calib, test = small_sets
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    art = backend.convert(model, profile, precision, calib, tmp_path, None)
    assert art.main == name and art.files == [name]
    graph = onnx.load(str(art.path)).graph
    ops = {n.op_type for n in graph.node}
    if precision == "int8":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert art.settings["reduce_range"] is True and art.settings["activation_type"] == "uint8"
    if precision == "dynamic":
        assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "ConvInteger" in ops
    if precision == "fp16":  # I/O stays float32 so feeds need no change
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    with OrtRunner(model.onnx_path, 1) as ref, backend.runner(art, 1) as run:
        assert abs(_accuracy(ref, test) - _accuracy(run, test)) <= 1.0


def test_tensorrt_profile_is_symmetric_s8s8_with_engine_script(model, small_sets, tmp_path):
    import onnx

    calib, _ = small_sets
    art = get_backend("tensorrt").convert(model, catalogue()["jetson-orin"], "int8", calib, tmp_path, None)
    assert art.files[:2] == ["model_int8_qdq.onnx", "build_engine.sh"]
    script = (tmp_path / "build_engine.sh").read_text()
    assert "--onnx=model_int8_qdq.onnx" in script and "--int8" in script
    zero_points = [i for i in onnx.load(str(art.path)).graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(onnx.numpy_helper.to_array(z).dtype == np.int8 and not onnx.numpy_helper.to_array(z).any()
                               for z in zero_points), "TensorRT needs symmetric int8 (zero point 0)"


def test_symmetric_s8s8_needs_unfused_host_validation(model, small_sets, tmp_path):
    """Why TensorRT profiles validate with Q/DQ unfused: ORT's fused x86 kernels (no VNNI) saturate on S8S8."""
    calib, test = small_sets
    art = get_backend("tensorrt").convert(model, catalogue()["jetson-orin"], "int8", calib, tmp_path, None)
    with OrtRunner(model.onnx_path, 1) as ref, OrtRunner(art.path, 1, simulate=True) as sim:
        assert _accuracy(ref, test) - _accuracy(sim, test) <= 0.5


def test_float_layers_keep_their_nodes_float_and_unknown_names_fail(model, small_sets, tmp_path):
    import onnx

    from edgebuild.pipeline.errors import ConversionError

    calib, _ = small_sets
    backend, profile = get_backend("onnx"), catalogue()["onnx-cpu"]
    art = backend.convert(model, profile, "int8", calib, tmp_path / "a", {"float_layers": ["/classifier/classifier.1/Gemm"]})
    assert art.main == "model_int8_mixed_qdq.onnx"
    graph = onnx.load(str(art.path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    gemm = next(n for n in graph.node if n.name == "/classifier/classifier.1/Gemm")
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in gemm.input[1:]), \
        "the float layer's weights are not quantized"
    with pytest.raises(ConversionError, match="not in the model"):
        backend.convert(model, profile, "int8", calib, tmp_path / "b", {"float_layers": ["/no/such/Conv"]})
