"""INT8 that is fast on LiteRT with XNNPACK (issue 22, item 5), and XNNPACK's coverage in every arm64 artifact.

The PReLU two-head CNN (MTCNN R-Net shape) ran INT8 at 0.13x the FP32 speed: XNNPACK has no int8 PRELU kernel (each
PReLU fell back to LiteRT's kernels and cut the model into another partition) and no MIRROR_PAD (the MaxPool
ceil-mode edge pad). Measured here (1 thread, median of 200 invoke()): FP32 0.239 -> 0.051 ms, INT8 0.307 ->
0.027 ms; INT8 partitions 6 -> 2 (the int8 SOFTMAX stays on LiteRT's kernels)."""
from __future__ import annotations

import pytest

pytest.importorskip("onnx2tf")
pytest.importorskip("ai_edge_litert")

from tests.targets.test_tflite_conformance import calibration, convert, fidelity, model_input, prelu_onnx  # noqa: E402,F401


@pytest.mark.slow
def test_prelu_cnn_int8_runs_on_xnnpack(prelu_onnx, tmp_path):  # noqa: F811
    mi = model_input(prelu_onnx)
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)
    cov = art.settings["xnnpack_coverage"]
    assert cov["partitions"] <= 2 and set(cov["fallback"]) <= {"SOFTMAX"}, cov  # before: PRELU x4, MIRROR_PAD x2; 6
    assert cov["delegated"] == cov["ops"] - sum(cov["fallback"].values())
    assert any("PRelu as x + (1 - slope)" in r for r in art.settings["onnx_rewrites"])
    assert any(n.startswith("XNNPACK runs ") for n in art.notes)
    assert "PRELU" not in {op.split()[0] for op in art.settings["device_requires"]["builtin_ops"]}
    assert fidelity(art, mi, calib) > 0.99


def test_weight_counts_of_a_tflite(tmp_path):
    """targets/tflite/weights.py (pipeline/stages/weights.py's TFLite reader): a Dense and a Conv2D, FP32 and INT8."""
    tf = pytest.importorskip("tensorflow")
    import numpy as np

    from edgebuild.targets.tflite.weights import weight_counts

    keras = pytest.importorskip("tf_keras")
    inp = keras.Input((8, 8, 3), batch_size=1)
    out = keras.layers.Dense(5)(keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(inp)))
    km = keras.Model(inp, out)
    fp32 = tmp_path / "fp32.tflite"
    fp32.write_bytes(tf.lite.TFLiteConverter.from_keras_model(km).convert())
    conv = tf.lite.TFLiteConverter.from_keras_model(km)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([np.random.rand(1, 8, 8, 3).astype(np.float32)] for _ in range(4))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    int8 = tmp_path / "int8.tflite"
    int8.write_bytes(conv.convert())
    want = sorted([3 * 3 * 3 * 4, 6 * 6 * 4 * 5])  # biases are not weights
    assert sorted(n for n, q, _ in weight_counts(fp32)) == want and not any(q for _, q, _ in weight_counts(fp32))
    assert sorted(n for n, q, _ in weight_counts(int8)) == want and all(q for _, q, _ in weight_counts(int8))


@pytest.mark.slow
def test_hardswish_se_block_int8_runs_on_xnnpack(tmp_path):
    """PP-LCNet/MobileNetV3 shape (HardSwish, a HardSigmoid squeeze-excite): XNNPACK has no int8 HARD_SWISH or
    RELU_0_TO_1, and TFLite's converter folds x * relu6(x + 3) / 6 back into HARD_SWISH; (x / 6) * relu6(x + 3) stays
    ADD/RELU6/MUL. Measured on the real PP-LCNet document-orientation model: 28 HARD_SWISH fell back, 32 partitions,
    INT8 at 0.38x FP32."""
    torch = pytest.importorskip("torch")
    from tests.targets.test_tflite_conformance import export

    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish(), nn.Conv2d(16, 16, 3, 1, 1, groups=16),
                                   nn.Hardswish(), nn.Conv2d(16, 32, 1), nn.Hardswish())
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1),
                                    nn.Hardsigmoid())
            self.fc = nn.Linear(32, 4)

        def forward(self, x):
            h = self.b(x)
            return torch.softmax(self.fc((h * self.se(h)).mean((2, 3))), 1)

    torch.manual_seed(0)
    mi = model_input(export(Block(), (torch.zeros(1, 3, 32, 32),), ["x"], ["p"], tmp_path / "hs.onnx"))
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)
    cov = art.settings["xnnpack_coverage"]
    assert cov["partitions"] <= 2 and set(cov["fallback"]) <= {"SOFTMAX"}, cov
    # each x / 6 of a rewritten HardSwish is the first input of a MUL: TF's calibrator logged it with the product's
    # range (targets/tflite/ranges.py), narrowed to its own (the real PP-LCNet: 28 narrowed, top-1 96.2 -> 100 %)
    assert art.settings["ranges_narrowed"] >= 3 and any("range(s) narrowed" in n for n in art.notes)
    assert fidelity(art, mi, calib) > 0.99


@pytest.mark.slow
def test_fpn_with_affine_blocks_and_nearest_upsampling_int8_runs_on_xnnpack(tmp_path):
    """PP-OCRv4 detector shape: scalar affine blocks (s * x + b, a shift far below the range) and nearest upsampling
    added back (an FPN). XNNPACK refused the int8 ADD of such a shift and has no RESIZE_NEAREST_NEIGHBOR: on the
    real detector 4 ADD + 6 RESIZE_NEAREST_NEIGHBOR fell back, 8 partitions."""
    torch = pytest.importorskip("torch")
    from tests.targets.test_tflite_conformance import export

    nn = torch.nn

    class Fpn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 2, 1)
            self.s, self.b = nn.Parameter(torch.tensor([1.3])), nn.Parameter(torch.tensor([-8.8e-5]))
            self.head = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            a = torch.relu(self.c1(x))
            low = torch.relu(self.c2(a)) * self.s + self.b
            return torch.sigmoid(self.head(a + nn.functional.interpolate(low, scale_factor=2.0, mode="nearest")))

    torch.manual_seed(0)
    mi = model_input(export(Fpn(), (torch.zeros(1, 3, 16, 16),), ["x"], ["p"], tmp_path / "fpn.onnx"))
    calib = calibration(mi)
    art = convert(mi, calib, tmp_path)
    cov = art.settings["xnnpack_coverage"]
    assert cov["partitions"] == 1 and not cov["fallback"], cov
    rewrites = " ".join(art.settings["onnx_rewrites"])
    assert "1x1 depthwise Conv" in rewrites and "Concat + DepthToSpace" in rewrites, rewrites
    assert fidelity(art, mi, calib) > 0.99

