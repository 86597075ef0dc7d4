"""The ONNX backend's public contract helpers the pipeline uses: ``FakeQuant`` (per-layer sensitivity) and
``reference_runner`` (the FP32 reference)."""
from __future__ import annotations

import numpy as np


def test_fake_quant_quantizes_only_the_layers_named(demo_onnx, digits_split, tmp_path):
    import onnx

    from edgebuild.pipeline.stages.sensitivity import quantizable_layers
    from edgebuild.targets.base import reference_runner
    from edgebuild.targets.onnx import FakeQuant

    train, test = digits_split
    calib, feeds = train.subset(np.arange(32)), [test.feed(i) for i in range(16)]
    layers = quantizable_layers(demo_onnx)
    assert len(layers) >= 2
    fq = FakeQuant(demo_onnx, calib, tmp_path)
    with reference_runner(demo_onnx, 1) as ref:
        expected = [ref.run(f)[0] for f in feeds]
    for name in layers[:2]:
        with fq.runner([name]) as runner:
            got = [runner.run(f)[0] for f in feeds]
        graph = onnx.load(str(tmp_path / "fake_quant.onnx")).graph
        quantized = {n.name for n in graph.node if any(i.endswith("_DequantizeLinear_Output") for i in n.input)}
        assert quantized & set(layers) == {name}, f"of the layers, only {name} is quantized, got {quantized}"
        diff = max(float(np.abs(a - b).max()) for a, b in zip(expected, got))
        assert 0 < diff < 0.5 * max(float(np.abs(a).max()) for a in expected)  # quantized: close, not identical
    assert (tmp_path / "fake_quant_ranges.json").is_file()  # calibrated once, reused by the next layer


def test_reference_runner_is_the_fp32_model_on_onnx_runtime(demo_onnx, digits_split):
    import onnxruntime as ort

    from edgebuild.targets.base import reference_runner

    feed = digits_split[1].feed(0)
    session = ort.InferenceSession(str(demo_onnx), providers=["CPUExecutionProvider"])
    with reference_runner(demo_onnx, 1) as ref:
        np.testing.assert_allclose(ref.run(feed)[0], session.run(None, feed)[0], rtol=1e-5, atol=1e-6)
