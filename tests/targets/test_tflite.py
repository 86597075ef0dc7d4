"""The TFLite backend on the demo model: profiles, honest names, settings, INT8 accuracy and size, int8 I/O,
the runner's layout and quantization handling, crash isolation, and end-to-end builds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.pipeline.stages import validate as V
from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
from edgebuild.targets.profiles import catalogue

pytest.importorskip("onnx2tf")
pytest.importorskip("ai_edge_litert")

TFLITE_PROFILES = ("arm64", "android-arm64", "cortex-m")
CALIB_SAMPLES = 100


@pytest.fixture(scope="module")
def backend():
    return get_backend("tflite")


@pytest.fixture(scope="module")
def profiles():
    return catalogue()


def demo_model(path) -> ExportedModel:
    return ExportedModel(path, (TensorInfo("input", (1, 1, 8, 8), "float32", "NCHW"),),
                      (TensorInfo("logits", (1, 10), "float32"),), 17)


@pytest.fixture(scope="module")
def reference(demo_onnx, digits_split):
    from edgebuild.targets.onnx import OrtRunner

    return V.collect(OrtRunner(demo_onnx, 2), digits_split[1])


@pytest.fixture(scope="module")
def built(tmp_path_factory, backend, profiles, demo_onnx, digits_split):
    """``built(profile, precision, **settings)``: the demo converted once per combination in this module."""
    calib = digits_split[0].subset(np.arange(CALIB_SAMPLES))
    done = {}

    def get(profile: str, precision: str, **settings):
        key = (profile, precision, tuple(sorted(settings.items())))
        if key not in done:
            workdir = tmp_path_factory.mktemp(f"{profile}-{precision}")
            done[key] = backend.convert(demo_model(demo_onnx), profiles[profile], precision, calib, workdir, settings)
        return done[key]

    return get


def evaluate(backend, art, reference, evalset, threads=2) -> dict:
    with backend.runner(art, threads) as runner:
        outputs = V.collect(runner, evalset)
    return V.compare(reference, outputs, evalset.labels).to_dict()  # as manifest.json has it


def float_tensors(path) -> tuple[int, int]:
    """(float32 tensors, of which model inputs/outputs) in a .tflite."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    io = {d["index"] for d in it.get_input_details() + it.get_output_details()}
    floats = [t["index"] for t in it.get_tensor_details() if t["dtype"] == np.float32]
    return len(floats), len(set(floats) & io)


# ---- profiles, names, settings (no conversion) ----------------------------------------------------------
@pytest.mark.parametrize("name", TFLITE_PROFILES)
def test_tflite_profiles(name, profiles):
    p = profiles[name]
    assert p.backend == "tflite" and p.precision == "int8" and p.layout == "NHWC"
    assert p.budgets.max_accuracy_drop == 0.5 and (p.advice.max_size_mb or p.budgets.max_size_mb)  # advice (MCU: flash)
    assert p.devices and p.host_runtime and p.device_runtime and p.host_validation
    assert get_backend(p.backend).default_settings(p, "int8")["io_dtype"] == p.io_dtype


def test_profile_choices(profiles):
    assert profiles["arm64"].threads == 4 and profiles["arm64"].io_dtype == "float32"
    assert "fp16" in profiles["android-arm64"].precisions and "GPU" in profiles["android-arm64"].description
    mcu = profiles["cortex-m"]
    assert mcu.io_dtype == "int8" and mcu.threads == 1 and mcu.precisions == ("int8",)
    assert mcu.quant["host_kernels"] == "reference"


def test_honest_artifact_names(backend):
    assert backend.artifact_name("int8") == "model_int8.tflite"
    assert backend.artifact_name("dynamic") == "model_dynamic_int8.tflite"
    assert backend.artifact_name("fp16") == "model_fp16.tflite"
    assert backend.artifact_name("fp32") == "model_fp32.tflite"
    assert backend.artifact_name("int8", {"float_layers": ["/features/features.3/Conv"]}) == "model_int8_mixed.tflite"
    assert backend.artifact_name("int8", {"float_layers": []}) == "model_int8.tflite"
    with pytest.raises(BadInputError):
        backend.artifact_name("int4")


def test_accuracy_search_hooks(backend, profiles):
    assert backend.supports_float_layers and not profiles["cortex-m"].allow_float_layers
    settings = backend.default_settings(profiles["arm64"], "int8")
    assert settings["float_layers"] == [] and settings["calibrate_method"] == "minmax"
    variants = backend.recovery_candidates(profiles["arm64"], settings)  # histogram calibration before float layers
    assert [(s.calibrate_method, s.rounding) for _, s in variants] == [
        ("mean_minmax", "nearest"), ("percentile", "nearest"), ("entropy", "nearest"),
        ("minmax", "adaround")]  # AdaRound, the costliest, last
    assert [label for label, _ in variants][1:3] == ["percentile calibration (99.999)", "entropy calibration"]
    legacy = backend.recovery_candidates(profiles["arm64"], settings | {"quantizer": "legacy"})  # no ranges hook
    assert [s.rounding for _, s in legacy] == ["adaround"]
    assert len(backend.recovery_candidates(profiles["arm64"], settings | {"calibrate_method": "entropy"})) == 1
    closest = backend.requested_settings(profiles["arm64"], {"calibrate_method": "entropy"})
    refined = backend.on_best_variant(variants[-1][1], closest)  # AdaRound on the variant that came closest
    assert (refined.calibrate_method, refined.rounding) == ("entropy", "adaround")


def test_histogram_calibration_needs_the_mlir_quantizer(backend, profiles, tmp_path):
    with pytest.raises(BadInputError, match="needs the MLIR quantizer"):
        backend.convert_family(None, profiles["arm64"], "int8", None, tmp_path,  # refused before the model is read
                               {"calibrate_method": "percentile", "quantizer": "legacy"})


def test_default_settings(backend, profiles):
    int8 = backend.default_settings(profiles["cortex-m"], "int8")
    assert int8["io_dtype"] == "int8" and int8["per_channel"] and int8["host_kernels"] == "reference"
    fp32 = backend.default_settings(profiles["cortex-m"], "fp32")
    assert "io_dtype" not in fp32 and "per_channel" not in fp32 and fp32["host_kernels"] == "reference"
    assert backend.default_settings(profiles["arm64"], "fp16")["input_layout"] == "NHWC"


def test_bad_setting_is_bad_input(backend, profiles, demo_onnx, digits_split, tmp_path):
    with pytest.raises(BadInputError, match="io_dtype"):
        backend.convert(demo_model(demo_onnx), profiles["arm64"], "int8", digits_split[0], tmp_path, {"io_dtype": "int16"})
    with pytest.raises(BadInputError, match="float_layers"):
        backend.convert(demo_model(demo_onnx), profiles["arm64"], "int8", digits_split[0], tmp_path, {"float_layers": "/a/Conv"})
    with pytest.raises(BadInputError, match="integer-only"):
        backend.convert(demo_model(demo_onnx), profiles["cortex-m"], "int8", digits_split[0], tmp_path,
                        {"float_layers": ["/features/features.3/Conv"]})


def test_port_layout_and_quantization():
    from edgebuild.targets.tflite.port import Port as _Port

    x = np.random.default_rng(0).random((1, 3, 4, 5), dtype=np.float32)
    port = _Port({"name": "x", "perm": [0, 2, 3, 1]}, {"index": 0, "dtype": np.int8, "quantization": (1 / 255, -128)})
    q = port.to_tensor(x)
    assert q.dtype == np.int8 and q.shape == (1, 4, 5, 3) and q.flags.c_contiguous
    np.testing.assert_array_equal(q, np.round(x.transpose(0, 2, 3, 1) * 255) - 128)
    assert port.to_tensor(np.full((1, 3, 4, 5), 7.0, np.float32)).max() == 127  # saturates, never wraps
    out = _Port({"name": "y", "perm": [0, 3, 1, 2]}, {"index": 1, "dtype": np.int8, "quantization": (0.5, 3)})
    y = out.from_tensor(np.full((1, 4, 5, 3), 5, np.int8))
    assert y.dtype == np.float32 and y.shape == (1, 3, 4, 5) and np.all(y == 1.0)
    u8 = _Port({"name": "u"}, {"index": 0, "dtype": np.uint8, "quantization": (0.1, 10)})
    np.testing.assert_array_equal(u8.to_tensor(np.array([[-5.0, 0.0, 0.26, 99.0]])), [[0, 10, 13, 255]])
    plain = _Port({"name": "f"}, {"index": 0, "dtype": np.float32, "quantization": (0.0, 0)})
    np.testing.assert_array_equal(plain.to_tensor(x), x)


def test_converter_crash_is_a_conversion_error(tmp_path, monkeypatch):
    from edgebuild.targets.isolated import FAULT_ENV
    from edgebuild.targets.tflite.family import run_child as _run_child

    with pytest.raises(ConversionError, match=r"arm64: TFLite int8: FileNotFoundError: .*job\.json"):
        _run_child(tmp_path, "arm64: TFLite int8", 60)  # no job.json: an error in the child, one line
    monkeypatch.setenv(FAULT_ENV, "crash:convert:tflite")  # the child kills itself with SIGSEGV
    with pytest.raises(ConversionError, match=r"arm64: TFLite int8: the converter crashed \(SIGSEGV\) during start-up"):
        _run_child(tmp_path, "arm64: TFLite int8", 60)


# ---- conversions of the demo ----------------------------------------------------------------------------
def test_int8_demo_accuracy_size_and_full_integer(backend, built, reference, digits_split):
    art, fp32 = built("arm64", "int8"), built("arm64", "fp32")
    assert art.main == "model_int8.tflite" and art.files == ["model_int8.tflite"]
    assert fp32.main == "model_fp32.tflite"
    floats, io_floats = float_tensors(art.path)
    assert floats == io_floats == 2  # full integer: float only at the float32 input and output
    m = evaluate(backend, art, reference, digits_split[1], threads=4)
    assert m["accuracy_drop"] <= 0.5 and m["top1_agreement"] >= 99
    assert art.size_bytes <= 0.3 * fp32.size_bytes
    (inp,), (out,) = art.io["inputs"], art.io["outputs"]
    assert inp["layout"] == "NHWC" and inp["shape"] == [1, 8, 8, 1] and inp["perm"] == [0, 2, 3, 1]
    assert inp["dtype"] == "float32" and inp["scale"] is None and inp["source_shape"] == [1, 1, 8, 8]
    assert out["name"] == "logits" and out["shape"] == [1, 10] and out["perm"] is None
    requires = art.settings["device_requires"]
    assert requires["min_runtime_version"] and any(op.startswith("CONV_2D") for op in requires["builtin_ops"])
    assert any("min_runtime_version" in n for n in art.notes)
    assert art.settings["calibration_samples_used"] == CALIB_SAMPLES and art.settings["io_dtype"] == "float32"


def test_float_layers_stay_float_and_nothing_else(backend, built, reference, digits_split):
    """Mixed precision: the ops of the named ONNX layers (here a middle Conv and the output Gemm, whose TFLite
    tensor is named after the signature) compute in float; every other op stays int8."""
    from ai_edge_litert.interpreter import Interpreter

    layers = ("/features/features.3/Conv", "/classifier/classifier.4/Gemm")
    art = built("arm64", "int8", float_layers=layers)
    assert art.main == "model_int8_mixed.tflite" and art.settings["quantizer_used"] == "mlir"
    kept = art.settings["float_layers_kept"]
    assert list(kept) == list(layers) and [len(v) for v in kept.values()] == [1, 1]
    assert kept[layers[0]][0].startswith("CONV_2D ") and kept[layers[1]][0].startswith("FULLY_CONNECTED ")
    it = Interpreter(model_path=str(art.path))
    dtype = {t["index"]: t["dtype"] for t in it.get_tensor_details()}
    compute = [(op["op_name"], [dtype[i] for i in op["inputs"] if i >= 0])
               for op in it._get_ops_details() if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")]
    floating = [i for i, (_, ins) in enumerate(compute) if all(d == np.float32 for d in ins)]  # input, weights, bias
    assert floating == [1, len(compute) - 1]  # features.3 is the 2nd conv; the output Gemm the last op
    assert compute[1][0] == "CONV_2D" and compute[-1][0] == "FULLY_CONNECTED"
    assert all(np.float32 not in ins for i, (_, ins) in enumerate(compute) if i not in floating)
    assert any(layers[0] in n for n in art.notes) and any(n.startswith("mixed INT8") for n in art.notes)
    assert evaluate(backend, art, reference, digits_split[1])["accuracy_drop"] <= 0.5


def test_float_layer_not_in_the_model_fails(backend, profiles, demo_onnx, digits_split, tmp_path):
    calib = digits_split[0].subset(np.arange(20))
    with pytest.raises(ConversionError, match="not in the model: /no/such/Conv"):
        backend.convert(demo_model(demo_onnx), profiles["arm64"], "int8", calib, tmp_path, {"float_layers": ["/no/such/Conv"]})


def test_int8_io_profile(backend, built, reference, digits_split):
    art = built("cortex-m", "int8")
    (inp,), (out,) = art.io["inputs"], art.io["outputs"]
    assert inp["dtype"] == "int8" and out["dtype"] == "int8"
    assert inp["scale"] == pytest.approx(1 / 255, rel=1e-3) and inp["zero_point"] == -128  # digits are in [0, 1]
    assert out["scale"] > 0 and -128 <= out["zero_point"] <= 127
    assert float_tensors(art.path) == (0, 0)
    m = evaluate(backend, art, reference, digits_split[1], threads=1)
    assert m["accuracy_drop"] <= 0.5
    assert any("real =" in n for n in art.notes)


def test_runner_matches_a_hand_driven_interpreter(backend, built, digits_split):
    """Feed NCHW floats to the runner == quantize + transpose by hand, invoke, dequantize (same kernels)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    art = built("cortex-m", "int8")
    feeds = [digits_split[1].feed(i) for i in range(5)]
    with backend.runner(art, 1) as runner:
        got = [runner.run(f)[0] for f in feeds]
    assert art.settings["host_kernels"] == "reference"  # XNNPACK rounds differently: up to 1 LSB apart
    it = Interpreter(model_path=str(art.path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    it.allocate_tensors()
    (i,), (o,) = it.get_input_details(), it.get_output_details()
    for feed, g in zip(feeds, got):
        s, z = i["quantization"]
        it.set_tensor(i["index"], np.clip(np.round(feed["input"].transpose(0, 2, 3, 1) / s) + z, -128, 127).astype(np.int8))
        it.invoke()
        s, z = o["quantization"]
        want = (it.get_tensor(o["index"]).astype(np.float32) - z) * s
        assert g.dtype == np.float32 and g.shape == (1, 10)
        np.testing.assert_array_equal(g, want)


def test_float_precisions(backend, built, reference, digits_split):
    fp32 = built("arm64", "fp32")
    fp16, dynamic = built("android-arm64", "fp16"), built("android-arm64", "dynamic")
    assert (fp16.main, dynamic.main) == ("model_fp16.tflite", "model_dynamic_int8.tflite")
    assert 0.45 < fp16.size_bytes / fp32.size_bytes < 0.55
    assert dynamic.size_bytes < 0.3 * fp32.size_bytes
    assert float_tensors(dynamic.path)[0] > 2  # weight-only: activations stay float, so not "_int8"
    for art in (fp32, fp16, dynamic):
        assert art.io["inputs"][0]["dtype"] == "float32" and art.settings["io_dtype"] == "float32"
        assert evaluate(backend, art, reference, digits_split[1])["accuracy_drop"] <= 0.5
    assert evaluate(backend, fp32, reference, digits_split[1])["max_abs_error"] < 1e-4


def test_source_layout_keeps_nchw(backend, built, reference, digits_split):
    art = built("arm64", "int8", input_layout="source")
    (inp,) = art.io["inputs"]
    assert inp["shape"] == [1, 1, 8, 8] and inp["perm"] is None and inp["layout"] == "NCHW"
    assert evaluate(backend, art, reference, digits_split[1])["accuracy_drop"] <= 0.5


def test_isolated_runner_and_invoke_timing(backend, built, digits_split):
    from edgebuild.targets.served import IsolatedRunner

    art = built("arm64", "int8")
    feed = digits_split[1].feed(0)
    with backend.runner(art, 2) as direct:
        want = direct.run(feed)
    assert backend.isolate_runner
    with IsolatedRunner("tflite", art, 2) as runner:
        np.testing.assert_array_equal(runner.run(feed)[0], want[0])
        times = runner.time_ms(feed, 2, 30, 1.0)
    assert len(times) >= 20 and all(t > 0 for t in times)


def test_c_array_for_microcontrollers(built, tmp_path):
    from edgebuild.targets.tflite.tflm import write_c_array

    model = tmp_path / "model_int8.tflite"
    shutil.copyfile(built("cortex-m", "int8").path, model)
    assert write_c_array(model) == ["model_int8_data.cc", "model_int8_data.h"]
    source = (tmp_path / "model_int8_data.cc").read_text()
    body = source[source.index("{") + 1:source.index("};")]
    assert bytes(int(v, 16) for v in body.replace(",", " ").split()) == model.read_bytes()
    assert "alignas(16)" in source and "g_model_int8_len" in (tmp_path / "model_int8_data.h").read_text()


# ---- end to end ----------------------------------------------------------------------------------------
def _cli(*args) -> int:
    from edgebuild.pipeline.cli import main

    return main(list(args))


@pytest.mark.slow
def test_demo_build_for_arm64(tmp_path):
    out = tmp_path / "out"
    assert _cli("--target", "arm64", "--out", str(out)) == 0
    validation = json.loads((out / "arm64" / "validation.json").read_text())
    assert validation["verdict"] == "pass"
    assert validation["metrics"]["accuracy_drop"] <= 0.5
    assert validation["ratios"]["size_vs_fp32"] <= 0.3
    assert validation["baseline_fp32"]["artifact"] == "model_fp32.tflite"
    assert sorted(p.name for p in (out / "arm64").iterdir()) == ["metadata.json", "model_int8.tflite", "validation.json"]
    meta = json.loads((out / "arm64" / "metadata.json").read_text())
    assert meta["io"]["inputs"][0]["layout"] == "NHWC" and meta["runtime"]["threads"] == 4


@pytest.mark.slow
def test_onnx_file_with_npz_calibration(tmp_path, demo_onnx, digits_npz):
    out = tmp_path / "out"
    assert _cli("--target", "cortex-m", "--model", str(demo_onnx), "--calib", str(digits_npz),
                "--calib-samples", "100", "--out", str(out)) == 0
    meta = json.loads((out / "cortex-m" / "metadata.json").read_text())
    assert meta["artifact"] == "model_int8.tflite" and meta["io"]["inputs"][0]["dtype"] == "int8"


@pytest.mark.slow
def test_torch_module_source(tmp_path):
    out = tmp_path / "out"
    # the same ONNX and calibration as the demo build: its conversions come from the stage cache when it ran first
    assert _cli("--target", "arm64", "--model", "edgebuild.pipeline.demo_model:load_demo", "--input-shape", "1,1,8,8",
                "--calib", "digits:train", "--eval", "digits:test", "--out", str(out)) == 0
    validation = json.loads((out / "arm64" / "validation.json").read_text())
    assert validation["metrics"]["accuracy_drop"] <= 0.5


def _weights_int8(path) -> list[np.ndarray]:
    """The int8 weight tensors (4-D conv filters, 2-D fully-connected) of a .tflite, largest first."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(Path(path).read_bytes()), 0)
    out = []
    for t in m.subgraphs[0].tensors:
        data = m.buffers[t.buffer].data if t.buffer < len(m.buffers) else None
        if t.type == schema.TensorType.INT8 and data is not None and len(t.shape) in (2, 4):
            out.append(np.frombuffer(bytes(bytearray(data)), np.int8).reshape([int(d) for d in t.shape]))
    return sorted(out, key=lambda a: -a.size)


def test_adaround_weights_land_on_tfs_int8_grid(backend, built, digits_split, demo_onnx, tmp_path):
    """``rounding: adaround``: the weights are rounded by AdaRound onto the grid TF's quantizer derives (symmetric
    +-127 per output channel) before onnx2tf, so the .tflite stores AdaRound's integers, not nearest rounding's."""
    import onnx
    from onnx import numpy_helper

    from edgebuild.targets.onnx_adaround import adaround, grid

    art = built("arm64", "int8", rounding="adaround")
    assert art.settings["rounding"] == "adaround" and any("AdaRound weight rounding" in n for n in art.notes)
    nearest = _weights_int8(built("arm64", "int8").path)
    learned = _weights_int8(art.path)
    calib = digits_split[0].subset(np.arange(CALIB_SAMPLES))
    adaround(demo_onnx, tmp_path / "adj.onnx", calib, tmp_path, per_channel=True)  # what the backend ran, seed 0
    adjusted = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "adj.onnx")).graph.initializer}
    conv = max((w for w in adjusted.values() if w.ndim == 4), key=lambda w: w.size)  # [O, I, kh, kw]
    want = np.round(conv / grid(conv, 0, 127)).astype(np.int8).transpose(0, 2, 3, 1)  # TFLite: [O, kh, kw, I]
    got, = [w for w in learned if w.shape == want.shape]
    before, = [w for w in nearest if w.shape == want.shape]
    assert (got == want).mean() > 0.99  # AdaRound's integers (bar a tie at a rounding edge)
    assert (got != before).mean() > 0.02  # ... which are not nearest rounding's
