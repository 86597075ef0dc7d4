"""OpenVINO backend: IR names and contents per precision, NNCF settings, ignored scope, runner, no telemetry."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
from edgebuild.targets.onnx import OrtRunner
from edgebuild.targets.profiles import catalogue

pytest.importorskip("openvino")
pytest.importorskip("nncf")

ONNX_CONV = "/features/features.3/Conv"  # the demo's second convolution, as the ONNX export names it


@pytest.fixture(scope="module")
def backend():
    return get_backend("openvino")


@pytest.fixture(scope="module")
def x86():
    return catalogue()["x86"]


@pytest.fixture(scope="module")
def built(model, small_sets, backend, x86, tmp_path_factory):
    """The demo converted once per precision with the x86 profile's settings."""
    calib, _ = small_sets
    return {p: backend.convert(model, x86, p, calib, tmp_path_factory.mktemp(p), None)
            for p in ("fp32", "fp16", "int8")}


def _ir(art):
    from edgebuild.targets.openvino import import_without_telemetry

    return import_without_telemetry("openvino").Core().read_model(str(art.path))


def _accuracy(runner, data):
    pred = np.array([runner.run(f)[0].argmax() for f in data.feeds()])
    return (pred == data.labels).mean() * 100


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_each_precision_is_an_xml_bin_pair_with_an_honest_name(built, precision):
    art = built[precision]
    assert art.backend == "openvino" and art.precision == precision
    assert art.main == f"model_{precision}.xml" and art.files == [f"model_{precision}.xml", f"model_{precision}.bin"]
    assert all((art.directory / f).stat().st_size > 0 for f in art.files)
    assert art.io["inputs"][0]["name"] == "input" and art.io["outputs"][0]["name"] == "logits"


def test_weights_are_stored_in_the_precision_the_name_says(built):
    def element_types(art):
        ir = _ir(art)
        ops = list(ir.get_ops())
        return ({op.get_output_element_type(0).get_type_name() for op in ops if op.get_type_name() == "Constant"},
                {op.get_type_name() for op in ops})

    consts32, ops32 = element_types(built["fp32"])
    consts16, _ = element_types(built["fp16"])
    consts8, ops8 = element_types(built["int8"])
    assert "f16" not in consts32 and "i8" not in consts32 and "FakeQuantize" not in ops32
    assert "f16" in consts16
    assert "i8" in consts8 and "FakeQuantize" in ops8 and "f16" not in consts8  # float parts stay FP32
    sizes = {p: a.size_bytes for p, a in built.items()}
    assert sizes["fp16"] < 0.55 * sizes["fp32"]
    assert sizes["int8"] <= 0.3 * sizes["fp32"]


def test_settings_record_the_nncf_options_and_runtime_config(built, small_sets):
    calib, _ = small_sets
    s = built["int8"].settings
    assert {k: s[k] for k in ("preset", "target_device", "fast_bias_correction", "overflow_fix", "subset_size")} == {
        "preset": "performance", "target_device": "CPU", "fast_bias_correction": True,
        "overflow_fix": "auto", "subset_size": None}  # 7-bit weights where the host has no VNNI/AMX
    from edgebuild.targets.isa import host_isa

    vnni = host_isa()["vnni"]
    assert s["applied"]["overflow_fix"] == ("disable" if vnni else "enable") and s["applied"]["isa"]["vnni"] is vnni
    assert s["ignored_scope"] == {"names": [], "types": [], "patterns": []} and s["float_layers"] == []
    assert s["applied"]["calibration_samples"] == len(calib)  # every sample the build chose (calibration/budget.py)
    # f32 for the float parts too: the plugin's default is bf16 on AVX512-BF16/AMX CPUs (this host: AMD EPYC, Zen 4)
    assert s["applied"]["compile_config"] == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    assert built["fp32"].settings["compress_to_fp16"] is False and built["fp16"].settings["compress_to_fp16"] is True
    # the FP32 baseline must really run in f32 (the CPU plugin defaults to bf16 on AMX / AVX512-BF16 CPUs)
    assert built["fp32"].settings["applied"]["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    json.dumps(built["int8"].to_dict())  # recorded in metadata.json


def test_fp32_runner_matches_onnxruntime_and_runs_in_f32(built, model, small_sets, backend):
    _, test = small_sets
    feeds = list(test.subset(np.arange(50)).feeds())
    with OrtRunner(model.onnx_path, 1) as ref, backend.runner(built["fp32"], 2) as run:
        assert str(run.property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")
        assert int(run.property("INFERENCE_NUM_THREADS")) >= 1
        assert "LATENCY" in str(run.property("PERFORMANCE_HINT"))
        for feed in feeds:
            want, got = ref.run(feed), run.run(feed)
            assert got[0].dtype == np.float32 and got[0].shape == want[0].shape
            np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    for precision in ("fp16", "int8"):  # never the plugin's bf16 default (AVX512-BF16/AMX hosts)
        with backend.runner(built[precision], 2) as run:
            assert str(run.property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32"), precision


def test_int8_and_fp16_keep_accuracy(built, model, small_sets, backend):
    _, test = small_sets
    with OrtRunner(model.onnx_path, 1) as ref:
        reference = _accuracy(ref, test)
    for precision in ("fp16", "int8"):
        with backend.runner(built[precision], 2) as run:
            assert reference - _accuracy(run, test) <= 0.5, precision


@pytest.mark.parametrize("scope,expect_float", [
    ({"names": [ONNX_CONV]}, [ONNX_CONV + "/WithoutBiases"]),  # an ONNX node name
    ({"names": [ONNX_CONV + "/WithoutBiases"]}, [ONNX_CONV + "/WithoutBiases"]),  # an OpenVINO operation name
    ({"types": ["Gemm"]}, ["/classifier/classifier.1/Gemm/WithoutBiases",  # an ONNX type: every MatMul
                           "/classifier/classifier.4/Gemm/WithoutBiases"]),
])
def test_ignored_scope_keeps_the_named_layers_float(model, small_sets, backend, x86, tmp_path, scope, expect_float):
    calib, _ = small_sets
    art = backend.convert(model, x86, "int8", calib, tmp_path, {"ignored_scope": scope})
    assert art.main == "model_int8_mixed.xml", "an IR with float layers is not called plain _int8"
    ops = {op.get_friendly_name(): op for op in _ir(art).get_ops()}
    weighted = [op for op in ops.values() if op.get_type_name() in ("Convolution", "MatMul")]

    from edgebuild.targets.openvino_weight_only import SUFFIX

    def is_float(op):  # float activations; weights f32, or int8 behind a decompression (weight-only INT8)
        activation, weights = (op.input(i).get_source_output().get_node() for i in (0, 1))
        if weights.get_type_name() == "Multiply" and weights.input_value(0).get_node().get_type_name() == "Convert":
            weights = weights.input_value(0).get_node().input_value(0).get_node()
            return weights.get_friendly_name().endswith(SUFFIX)  # written by weight-only, not NNCF's int8 weights
        return (activation.get_type_name() != "FakeQuantize" and weights.get_type_name() == "Constant"
                and weights.get_output_element_type(0).get_type_name() == "f32")

    assert sorted(op.get_friendly_name() for op in weighted if is_float(op)) == sorted(expect_float)
    assert set(expect_float) <= set(art.settings["applied"]["ignored_scope"]["names"]) | {
        n for n in expect_float if ops[n].get_type_name() in art.settings["applied"]["ignored_scope"]["types"]}


def test_float_layers_from_the_accuracy_search_use_onnx_names(model, small_sets, backend, x86, tmp_path):
    calib, _ = small_sets
    art = backend.convert(model, x86, "int8", calib, tmp_path, {"float_layers": [ONNX_CONV, "/no/such/Conv"]})
    assert art.main == "model_int8_mixed.xml"
    assert ONNX_CONV + "/WithoutBiases" in art.settings["applied"]["ignored_scope"]["names"]
    assert any("/no/such/Conv" in n and "skipped" in n for n in art.notes)


def test_recorded_settings_can_be_fed_back_and_candidates_are_valid(built, model, small_sets, backend, x86, tmp_path):
    from edgebuild.targets.openvino import _int8_settings

    settings = built["int8"].settings  # what the accuracy search starts from: includes the "applied" record
    from edgebuild.targets.isa import host_isa

    labels = [label for label, _ in backend.recovery_candidates(x86, settings)]
    seven_bit = ["7-bit weights in every layer (overflow_fix=enable)"] if host_isa()["vnni"] else []  # else already
    assert labels == ["full bias correction", "asymmetric activations (preset=mixed)",  # VNNI: 7-bit weights last
                      "preset=mixed with full bias correction", "NNCF model_type=transformer (SmoothQuant)",
                      "activation ranges from 1e-4 quantiles (NNCF mean_quantile)", *seven_bit]
    n100 = backend.recovery_candidates(catalogue()["intel-n100"], {**settings, "overflow_fix": "first_layer_only"})
    label, variant = n100[0]  # a new frozen Settings (dataclasses.replace), the rest as asked
    assert label == "7-bit weights in every layer (overflow_fix=enable)" and variant.overflow_fix == "enable"
    assert variant.replace(overflow_fix="first_layer_only") == backend.requested_settings(
        catalogue()["intel-n100"], {**settings, "overflow_fix": "first_layer_only"})
    for _, variant in n100:
        _int8_settings({**settings, **variant.to_dict()}, "x86")  # a record is a dict; Settings are not
    calib, _ = small_sets
    again = backend.convert(model, x86, "int8", calib, tmp_path, {**settings, "fast_bias_correction": False})
    assert again.settings["fast_bias_correction"] is False and again.main == "model_int8.xml"
    assert again.settings["applied"]["algorithm"].endswith("+ bias correction")
    quantiles = backend.convert(model, x86, "int8", calib, tmp_path / "q", {**settings, "activation_ranges": "mean_quantile"})
    assert "quantile ranges" in quantiles.settings["applied"]["algorithm"]
    plain = built["int8"].path.with_suffix(".bin").read_bytes()
    assert quantiles.path.with_suffix(".bin").read_bytes() != plain, "the range estimator changed nothing in the IR"


@pytest.mark.parametrize("settings,error,match", [
    ({"fast_bias_corection": False}, BadInputError, "unknown openvino quant setting"),
    ({"preset": "fastest"}, BadInputError, "preset must be one of"),
    ({"ignored_scope": {"names": ["/not/in/the/model"]}}, ConversionError, "not in the model"),
    ({"ignored_scope": {"types": ["LSTM"]}}, ConversionError, "type LSTM"),
])
def test_bad_settings_fail_with_one_clear_line(model, small_sets, backend, x86, tmp_path, settings, error, match):
    calib, _ = small_sets
    with pytest.raises(error, match=match):
        backend.convert(model, x86, "int8", calib, tmp_path, settings)


def test_an_unsupported_operator_is_a_conversion_error_naming_it(tmp_path, backend, x86):
    import onnx
    from onnx import TensorProto, helper

    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y"))
    graph = helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")], "g", [x], [y])
    path = tmp_path / "fancy.onnx"
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    model = ExportedModel(path, (TensorInfo("x", (1, 4), "float32"),), (TensorInfo("y", (1, 4), "float32"),), 17)
    with pytest.raises(ConversionError, match=r"x86: OpenVINO fp32 conversion failed: .*com\.example\.FancyOp"):
        backend.convert(model, x86, "fp32", None, tmp_path / "out", None)


def test_isolated_runner_gives_the_same_outputs(built, small_sets, backend):
    from edgebuild.pipeline.stages.per_target import open_runner

    assert backend.isolate_runner
    _, test = small_sets
    feed = test.feed(0)
    with backend.runner(built["int8"], 2) as here, open_runner(backend, built["int8"], 2) as there:
        np.testing.assert_array_equal(here.run(feed)[0], there.run(feed)[0])
        assert len(there.time_ms(feed, 2, 5, 1.0)) == 5


def test_no_telemetry_no_network_and_lazy_imports(demo_onnx, tmp_path):
    """In a fresh process (nothing imported yet): importing the backend imports no OpenVINO/NNCF; an INT8
    conversion and a run resolve no host name, open no socket and write no telemetry files under $HOME.

    Without the opt-out, ``openvino.convert_model`` alone looks up www.google-analytics.com (13 times for
    the demo) from *forked* processes, where an in-process socket guard neither sees nor stops it; so the
    patched socket functions here append to a file, which forked children inherit.
    """
    log = tmp_path / "network.log"
    script = textwrap.dedent(f"""
        import json, socket, sys, time

        def record(what):
            with open({str(log)!r}, "a") as f:
                f.write(what + "\\n")

        real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
        def connect(self, address):
            record(f"connect {{address}}")
            return real_connect(self, address)
        def getaddrinfo(host, *args, **kwargs):
            record(f"getaddrinfo {{host}}")
            return real_getaddrinfo(host, *args, **kwargs)
        socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo

        import numpy as np
        from pathlib import Path
        from edgebuild.calibration.sources import digits
        from edgebuild.targets.base import ExportedModel, TensorInfo, get_backend
        from edgebuild.targets.profiles import catalogue
        backend = get_backend("openvino")
        lazy = not any(m in sys.modules for m in ("openvino", "nncf", "torch"))
        model = ExportedModel(Path({str(demo_onnx)!r}), (TensorInfo("input", (1, 1, 8, 8), "float32"),),
                           (TensorInfo("logits", (1, 10), "float32"),), 17)
        calib = digits("train").subset(np.arange(32))
        art = backend.convert(model, catalogue()["x86"], "int8", calib, Path({str(tmp_path)!r}), None)
        with backend.runner(art, 1) as r:
            r.run(calib.feed(0))
        time.sleep(1)  # telemetry is sent from a thread pool: give it the time it would take
        print(json.dumps({{"lazy": lazy, "telemetry": repr(sys.modules.get("openvino_telemetry"))}}))
    """)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NNCF_CI")} | {"HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["lazy"], "importing the openvino backend must not import openvino, nncf or torch"
    assert not log.exists(), f"network attempted: {log.read_text()[:500]}"
    assert result["telemetry"] == "None", "openvino_telemetry must not be importable once the backend ran"
    assert not (home / "intel").exists(), "telemetry client-id/stats files were written under $HOME/intel"


@pytest.mark.slow
def test_x86_and_x86_fp16_build_end_to_end(tmp_path):
    from edgebuild.pipeline.build import build
    from edgebuild.pipeline.spec import BuildSpec

    result = build(BuildSpec(targets=("x86", "x86-fp16"), out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache")))
    assert result.exit_code == 0, result.manifest["targets"]
    x86, fp16 = tmp_path / "out" / "x86", tmp_path / "out" / "x86-fp16"
    assert (x86 / "model_int8.xml").is_file() and (x86 / "model_int8.bin").is_file()
    assert (fp16 / "model_fp16.xml").is_file() and (fp16 / "model_fp16.bin").is_file()
    v = json.loads((x86 / "validation.json").read_text())
    assert v["verdict"] == "pass" and v["metrics"]["accuracy_drop"] <= 0.5
    assert {"p50_ms", "p90_ms", "p99_ms"} <= set(v["latency"])
    assert v["baseline_fp32"]["artifact"] == "model_fp32.xml" and v["threads"] == 4
    assert v["ratios"]["size_vs_fp32"] <= 0.3 and v["ratios"]["speedup_vs_fp32"] > 0
    meta = json.loads((x86 / "metadata.json").read_text())
    assert set(meta["files"]) == {"model_int8.xml", "model_int8.bin"} and meta["settings"]["preset"] == "performance"
    v16 = json.loads((fp16 / "validation.json").read_text())
    assert v16["verdict"] == "pass" and 0.45 < v16["ratios"]["size_vs_fp32"] < 0.55
