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


def _power_lstm(tmp_path):
    """A 3-layer LSTM speaker-encoder shape, fed power (quiet frames and a loud bin, as Resemblyzer's mel frames)."""
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lstm, self.proj = nn.LSTM(12, 32, 3, batch_first=True), nn.Linear(32, 16)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.proj(h[-1])

    path = tmp_path / "power_lstm.onnx"
    torch.onnx.export(Encoder().eval(), (torch.zeros(1, 20, 12),), str(path), dynamo=False, opset_version=17,
                      input_names=["mels"], output_names=["emb"])
    return path


def _power(rng, n):
    from edgebuild.calibration.dataset import SampleSet

    x = np.exp(rng.normal(-4.0, 1.0, (n, 20, 12)))  # quiet frames ...
    x[np.arange(n), rng.integers(0, 20, n), rng.integers(0, 12, n)] = 5.0  # ... and one loud bin: 8-bit steps of 0.02
    x = x.astype(np.float32)
    return SampleSet("power", {"mels": x}, None, {}, {"mels": (1, 20, 12)})


def test_fake_quant_quantizes_a_named_lstm_as_a_conversion_does(tmp_path):
    """LSTM layers are ranked too (static QDQ has none: the fake-quant quantizes a named LSTM as a conversion does,
    DynamicQuantizeLSTM), each alone, so mixed precision can keep the one that collapses in float (Resemblyzer's
    first LSTM, fed linear mel power: the others in INT8 keep cosine 0.994 where all three give 0.44)."""
    import onnx

    from edgebuild.pipeline.stages.sensitivity import quantizable_layers
    from edgebuild.targets.base import reference_runner
    from edgebuild.targets.onnx import FakeQuant

    path = _power_lstm(tmp_path)
    rng = np.random.default_rng(0)
    calib, evalset = _power(rng, 32), _power(rng, 24)
    lstms = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "LSTM"]
    assert len(lstms) == 3 and set(lstms) <= set(quantizable_layers(path))
    feeds = [evalset.feed(i) for i in range(len(evalset))]
    with reference_runner(path, 1) as ref:
        expected = np.concatenate([ref.run(f)[0] for f in feeds])
    (tmp_path / "fq").mkdir()
    fq = FakeQuant(path, calib, tmp_path / "fq")
    err = {}
    for name in lstms:
        with fq.runner([name]) as runner:
            got = np.concatenate([runner.run(f)[0] for f in feeds])
        graph = onnx.load(str(tmp_path / "fq" / "fake_quant.onnx")).graph
        assert [n.op_type for n in graph.node].count("DynamicQuantizeLSTM") == 1  # this one, the others float
        assert [n.op_type for n in graph.node].count("LSTM") == 2
        err[name] = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    assert all(0 < e < 0.2 for e in err.values()), err  # quantized, not a float copy
