"""Which architectures the TFLite backend converts to full-integer INT8, within the arm64 budget, offline.

Each tiny model is built and briefly trained here on a learnable synthetic task (one fixed random pattern
per class plus noise), exported through the pipeline's own ONNX export, converted for ``arm64`` and judged
with the pipeline's validation (accuracy drop vs the FP32 ONNX reference <= the profile's 0.5 pt).

Outcomes on this toolchain (onnx2tf 1.28.8, TensorFlow 2.21, LiteRT 2.3): every model below converts to a
full-integer INT8 model within budget (accuracy drop on 300 samples: 0.33 pt for GAP + linear, <= 0 for the
rest), except the hand-made LpPool graph, which fails with a ConversionError naming LpPool.

    architecture                          notes
    conv + BN + ReLU6                     BN folded, ReLU6 fused into CONV_2D
    depthwise-separable + residual add    MobileNetV2 inverted-residual block
    3-channel image (tiny MobileNetV2)    onnx2tf's sample-image download replaced by our samples (offline)
    global average pool + linear          MEAN + FULLY_CONNECTED
    two inputs (image + vector)           inputs matched by name (LiteRT orders them differently)
    LSTM                                  unrolled by onnx2tf (the TF calibrator segfaults on the loop form),
                                          quantized by TF's legacy quantizer (the MLIR one left float SPLITs
                                          in ~half of the runs of the same inputs)
    attention (MatMul + Softmax)          BATCH_MATMUL + SOFTMAX in int8
    ONNX opset 11                         torch's raw export (Constant nodes, not simplified) given as is
    ONNX LpPool                           fails: onnx2tf has no LpPool converter

litert-torch 0.10 (torch.export + PT2E) converted the same seven torch models with the same accuracy, but
left float ops in the MobileNetV2 block, the LSTM and attention, needs the torch module (no ONNX sources),
and was slower per conversion: see targets/tflite/backend.py.
"""
from __future__ import annotations

import json
import socket
from contextlib import contextmanager

import numpy as np
import pytest

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline.errors import ConversionError
from edgebuild.pipeline.spec import BuildSpec, InputSpec
from edgebuild.pipeline.stages import validate as V
from edgebuild.pipeline.stages.per_target import budget_for
from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
from edgebuild.targets.profiles import catalogue

torch = pytest.importorskip("torch")
nn = torch.nn
pytest.importorskip("onnx2tf")

CALIB, EVAL, CLASSES = 64, 300, 10


# ---- tiny models ---------------------------------------------------------------------------------
def cbr6(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class ConvBnRelu6(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbr6(1, 16), cbr6(16, 32, s=2))
        self.head = nn.Linear(32 * 8 * 8, CLASSES)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual add."""

    def __init__(self, c: int, t: int = 4):
        super().__init__()
        self.block = nn.Sequential(cbr6(c, c * t, 1), cbr6(c * t, c * t, 3, groups=c * t),
                                   nn.Conv2d(c * t, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


class MBv2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = cbr6(8, 16), InvertedResidual(16), nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class TinyMobileNetV2(nn.Module):
    """A 3-channel image classifier shaped like MobileNetV2 (stride-2 stem, inverted residuals, GAP)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbr6(3, 16, s=2), InvertedResidual(16), cbr6(16, 32, 1),
                                      cbr6(32, 32, 3, 2, groups=32), InvertedResidual(32), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class GapLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(4, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES))

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.meta = cbr6(1, 8), nn.Linear(4, 8)
        self.head = nn.Linear(8 * 8 * 8 + 8, CLASSES)

    def forward(self, image, meta):
        return self.head(torch.cat([self.conv(image).flatten(1), torch.relu(self.meta(meta))], 1))


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, CLASSES)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


class TinyAttention(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.qkv, self.out, self.head, self.d = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, CLASSES), d

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        attention = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, -1)
        return self.head((x + self.out(attention @ v)).mean(1))


# name: (model class, {input name: (shape, layout)}, ONNX opset)
ZOO = {
    "conv_bn_relu6": (ConvBnRelu6, {"input": ((1, 1, 16, 16), "NCHW")}, 17),
    "mbv2_block": (MBv2Block, {"input": ((1, 8, 8, 8), "NCHW")}, 17),
    "mobilenetv2_rgb": (TinyMobileNetV2, {"input": ((1, 3, 32, 32), "NCHW")}, 17),
    "gap_linear": (GapLinear, {"input": ((1, 4, 8, 8), "NCHW")}, 17),
    "two_inputs": (TwoInputs, {"image": ((1, 1, 8, 8), "NCHW"), "meta": ((1, 4), "NC")}, 17),
    "lstm": (TinyLSTM, {"input": ((1, 12, 8), "NTC")}, 17),
    "attention": (TinyAttention, {"input": ((1, 16, 32), "NTC")}, 17),
    "opset11_cnn": (ConvBnRelu6, {"input": ((1, 1, 16, 16), "NCHW")}, 11),
}


def task(inputs: dict, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Samples of a learnable task: a fixed random pattern per class (and per-channel offsets), plus noise."""
    proto = np.random.default_rng(1234)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = {}
    for name, (shape, _) in inputs.items():
        template = proto.standard_normal((CLASSES, *shape[1:]), dtype=np.float32)
        if len(shape) == 4:  # channel offsets too, so that global pooling sees the class
            template += 1.5 * proto.standard_normal((CLASSES, shape[1], 1, 1), dtype=np.float32)
        v = template[y] + rng.standard_normal((n, *shape[1:]), dtype=np.float32)
        x[name] = np.clip(0.5 + 0.2 * v, 0, 1).astype(np.float32) if len(shape) == 4 else v.astype(np.float32)
    return x, y


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)  # 2 threads on 2 busy cores made training 25x slower than 1
    try:
        yield
    finally:
        torch.set_num_threads(old)


def trained(name: str, steps: int = 100):
    cls, inputs, _ = ZOO[name]
    torch.manual_seed(0)
    model = cls()
    x, y = task(inputs, 2048, 100)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    pick = np.random.default_rng(0)
    with _torch_threads(1):
        model.train()
        for _ in range(steps):
            i = pick.integers(0, len(y), 32)
            loss = nn.functional.cross_entropy(model(*[torch.from_numpy(v[i]) for v in x.values()]), torch.from_numpy(y[i]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def datasets(name: str) -> tuple[SampleSet, SampleSet]:
    inputs = ZOO[name][1]
    calib = SampleSet(f"{name}[calib]", task(inputs, CALIB, 3)[0])
    x, y = task(inputs, EVAL, 7)
    return calib, SampleSet(f"{name}[eval]", x, y)


def exported(name: str, workdir) -> ExportedModel:
    """Opset 17: the model through the pipeline's own export (checked against torch, simplified).
    Other opsets: torch's raw export at that opset (Constant nodes, nothing folded) straight to the backend."""
    from edgebuild.pipeline.stages.export import export_onnx
    from edgebuild.pipeline.stages.load import LoadedModel

    _, inputs, opset = ZOO[name]
    model = trained(name)
    if opset != 17:
        path = workdir / f"{name}.onnx"
        with _torch_threads(1):
            torch.onnx.export(model, tuple(torch.zeros(s) for s, _ in inputs.values()), str(path), dynamo=False,
                              opset_version=opset, input_names=list(inputs), output_names=["logits"])
        return ExportedModel(path, tuple(TensorInfo(k, s, "float32", layout) for k, (s, layout) in inputs.items()),
                          (TensorInfo("logits", (1, CLASSES), "float32"),), opset)
    specs = tuple(InputSpec(k, shape, "float32", layout) for k, (shape, layout) in inputs.items())
    with _torch_threads(1):
        model_input, _ = export_onnx(LoadedModel("torch", name, specs, module=model), datasets(name)[1], workdir)
    return model_input


def validate(model: ExportedModel, art, evalset: SampleSet, threads: int = 2) -> tuple[dict, list[str]]:
    from edgebuild.targets.onnx import OrtRunner

    reference = V.collect(OrtRunner(model.onnx_path, threads), evalset)
    with get_backend("tflite").runner(art, threads) as runner:
        outputs = V.collect(runner, evalset)
    metrics = V.compare(reference, outputs, evalset.labels)
    arm64 = catalogue()["arm64"]
    return metrics, V.judge(metrics, art.size_bytes, None, budget_for(arm64, BuildSpec()))


def is_full_integer(path) -> bool:
    """Every tensor is integer except the float model inputs/outputs themselves."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    io = {d["index"] for d in it.get_input_details() + it.get_output_details()}
    return all(np.dtype(t["dtype"]).kind in "iu" or t["index"] in io for t in it.get_tensor_details())


# ---- the matrix ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_architecture_converts_to_int8_within_budget(name, tmp_path):
    model = exported(name, tmp_path)
    calib, evalset = datasets(name)
    # attention keeps LayerNorm/Softmax/its products float by default (transformer_float, test_tflite_transformer.py);
    # here: that the converter can still make it all-int8
    settings = {"transformer_float": False} if name == "attention" else None
    art = get_backend("tflite").convert(model, catalogue()["arm64"], "int8", calib, tmp_path / "out", settings)
    assert art.main == "model_int8.tflite" and is_full_integer(art.path)
    metrics, failures = validate(model, art, evalset)
    assert failures == [], (name, metrics)
    assert art.settings["quantizer_used"] == ("legacy" if name == "lstm" else "mlir")
    if ZOO[name][2] != 17:
        import onnx

        assert onnx.load(str(model.onnx_path)).opset_import[0].version == ZOO[name][2]
    assert metrics.accuracy_reference > 80, "the tiny model should have learned the task"
    in_layouts = {p["name"]: p["layout"] for p in art.io["inputs"]}
    for spec in model.inputs:  # 4-D NCHW inputs become NHWC; the others keep their shape
        assert in_layouts[spec.name] == ("NHWC" if spec.layout == "NCHW" else spec.layout)


def test_unsupported_onnx_op_is_a_conversion_error_naming_it(tmp_path):
    """LpPool has no onnx2tf converter: the build gets one clear ConversionError naming the op."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("LpPool", ["input"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2], p=2, name="lp"),
             helper.make_node("Flatten", ["pooled"], ["logits"], name="flatten")]
    graph = helper.make_graph(nodes, "lppool", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 16])])
    path = tmp_path / "lppool.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = ExportedModel(path, (TensorInfo("input", (1, 1, 8, 8), "float32", "NCHW"),),
                       (TensorInfo("logits", (1, 16), "float32"),), 17)
    calib = SampleSet("x", {"input": np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)})
    with pytest.raises(ConversionError, match="LpPool") as err:
        get_backend("tflite").convert(model, catalogue()["arm64"], "int8", calib, tmp_path / "out")
    assert err.value.unsupported_op == "LpPool"
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "model_int8.tflite").exists()


# ---- offline ---------------------------------------------------------------------------------------
@contextmanager
def _record_network():
    """Record (and refuse) every name lookup and connection to a non-local host in this process."""
    attempts: list = []
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo
    local = ("127.0.0.1", "localhost", "::1", None, "")

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in local and not host.startswith("/"):
            attempts.append(address)
            raise OSError(f"network access attempted: {address}")
        return real_connect(self, address)

    def lookup(host, *args, **kwargs):
        if host not in local:
            attempts.append(host)
            raise socket.gaierror(f"network access attempted: {host}")
        return real_lookup(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = connect, lookup
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.getaddrinfo = real_connect, real_lookup


def test_onnx2tf_would_download_for_three_channel_inputs(tmp_path, monkeypatch):
    """The trap exists: onnx2tf's sample-image helper goes to GitHub when the file is not in the cwd."""
    import onnx2tf.utils.common_functions as common

    monkeypatch.chdir(tmp_path)
    with _record_network() as attempts, pytest.raises(Exception):
        common.download_test_image_data()
    assert any("github.com" in str(a) for a in attempts)


@pytest.mark.slow
def test_three_channel_conversion_attempts_no_network(tmp_path, monkeypatch):
    """The real conversion code, run in this process under a recorder: a 3-channel INT8 build stays offline."""
    import onnx2tf.onnx2tf as o2t_main
    import onnx2tf.utils.common_functions as o2t_common

    from edgebuild.targets.tflite import backend as tflite, convert as tflite_convert, onnx2tf_run

    # the conversion patches onnx2tf's module globals; let pytest put them back afterwards
    monkeypatch.setattr(o2t_main, "download_test_image_data", o2t_main.download_test_image_data)
    monkeypatch.setattr(o2t_common, "download_test_image_data", o2t_common.download_test_image_data)
    monkeypatch.chdir(tmp_path)
    asked = []
    real_sampler = onnx2tf_run.offline_sample_images

    def counting_sampler(calib, job):
        sample = real_sampler(calib, job)
        return lambda: asked.append(1) or sample()

    monkeypatch.setattr(onnx2tf_run, "offline_sample_images", counting_sampler)
    model = exported("mobilenetv2_rgb", tmp_path)
    calib, _ = datasets("mobilenetv2_rgb")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    np.savez(job_dir / "calib.npz", **calib.stacked_feeds(len(calib)))  # each sample a whole feed
    settings = {**tflite.DEFAULTS, **tflite.INT8_DEFAULTS}
    job = {"onnx": str(model.onnx_path), "precision": "int8", "settings": settings,
           "inputs": [tflite._input_plan(t, "NHWC") for t in model.inputs],
           "outputs": [{"name": o.name, "shape": list(o.shape)} for o in model.outputs]}
    (job_dir / "job.json").write_text(json.dumps(job))
    with _record_network() as attempts:
        result = tflite_convert.run(job_dir)
    assert result["ok"], result.get("message")
    assert asked, "onnx2tf did not ask for sample images: the download path was not exercised"
    assert attempts == []
    assert result["inputs"][result["keras_inputs"][0]]["shape"] == [1, 32, 32, 3]
    assert not list(tmp_path.glob("calibration_image_sample_data*"))


def test_converter_child_refuses_network():
    """The conversion child process cannot open a connection even if a converter tries."""
    import subprocess
    import sys

    code = ("from edgebuild.targets.tflite.convert import block_network, NetworkBlocked\n"
            "import socket\nblock_network()\n"
            "for call in (lambda: socket.create_connection(('github.com', 443), timeout=1),\n"
            "             lambda: socket.socket().connect(('140.82.112.3', 443))):\n"
            "    try:\n        call()\n    except NetworkBlocked:\n        print('blocked')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["blocked", "blocked"], out.stderr
