"""TensorFlow Lite Micro fit (targets/tflite/tflm.py): arena and flash from TFLM itself, named missing ops."""
import json

import pytest

from edgebuild.pipeline.cli import main
from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.targets.tflite import tflm
from edgebuild.targets.base import Artifact

pytest.importorskip("tflite_micro", reason="tflite-micro is in the tflite extra (requirements.lock)")


def _gelu_tflite(path):
    """A float .tflite with a GELU op: TFLM has no GELU kernel."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    def f(x):
        return tf.nn.gelu(x * 2.0, approximate=False)

    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert())
    return path


def test_an_op_without_a_tflm_kernel_is_a_conversion_error_naming_it(tmp_path):
    from edgebuild.targets.served import IsolatedRunner

    model = _gelu_tflite(tmp_path / "gelu.tflite")
    art = Artifact("cortex-m", "tflite", "fp32", tmp_path, model.name, [model.name])
    with pytest.raises(ConversionError, match="TensorFlow Lite Micro has no kernel for op GELU in gelu.tflite"):
        IsolatedRunner("tflite", art, 1, opener=tflm.OPENER, memory=True)


def test_missing_ops_are_read_from_tflms_own_messages():
    log = ["Didn't find op for builtin opcode 'GELU'", "Failed to get registration from op code GELU",
           "Didn't find op for builtin opcode 'TOPK_V2'", "Didn't find op for builtin opcode 'GELU'"]
    assert tflm.missing_ops(log) == ["GELU", "TOPK_V2"]


def test_flash_counts_the_model_and_checks_the_c_array(tmp_path):
    from edgebuild.targets.tflite.tflm import write_c_array

    model = tmp_path / "model_int8.tflite"
    model.write_bytes(bytes(range(256)) * 5)
    files = [model.name, *write_c_array(model)]
    f = tflm.flash(Artifact("cortex-m", "tflite", "int8", tmp_path, model.name, files))
    assert f["flash_bytes"] == f["model_bytes"] == 1280 and f["flash_kb"] == 1.25
    assert f["c_array"]["array_bytes"] == 1280 and f["c_array"]["source_bytes"] > 1280


def test_micro_needs_the_tflite_backend(tmp_path):
    from edgebuild.targets.profiles import load_profile

    p = tmp_path / "p.yaml"
    p.write_text("name: mcu\nbackend: onnx\ndescription: d\nmicro: true\n")
    with pytest.raises(BadInputError, match=r"micro: true needs a backend with a microcontroller check \(tflite"):
        load_profile(p)


@pytest.mark.slow
def test_cortex_m_demo_reports_arena_and_flash_from_tflm_and_fails_a_small_arena_budget(tmp_path, capsys):
    cfg = tmp_path / "edgebuild.yaml"
    cfg.write_text("budgets:\n  max_arena_kb: 1\n")
    out = tmp_path / "out"
    assert main(["--target", "cortex-m", "--config", str(cfg), "--out", str(out), "--no-auto", "-q"]) == 1
    assert "TFLM tensor arena" in capsys.readouterr().err
    v = json.loads((out / "cortex-m" / "validation.json").read_text())
    micro = v["memory"]["micro"]
    assert micro["runtime"].startswith("tflite-micro") and 1 < micro["arena_kb"] < 192
    assert micro["arena_bytes"] == micro["arena_detail"]["arena_head_bytes"] + micro["arena_detail"]["arena_tail_bytes"]
    assert micro["flash_bytes"] == (out / "cortex-m" / "model_int8.tflite").stat().st_size
    assert [c["metric"] for c in v["failed_checks"]] == ["arena_kb"]  # flash (768 KB budget) and the rest hold
    agree = micro["agreement_with_litert"]
    assert agree["samples"] == 8 and all(o["top1_agreement"] >= 87.5 for o in agree["outputs"].values())
    assert v["memory"]["peak_mb"] > 0 and v["baseline_fp32"]["memory"]["peak_mb"] > 0
    assert "tensor arena" in (out / "report.md").read_text()
