"""End-to-end builds through the CLI, as a user runs them."""
import json
from pathlib import Path

import pytest

from edgebuild.pipeline.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    """The single `edgebuild: error:` line (informational lines may precede it, no traceback)."""
    errors = [line for line in err.strip().splitlines() if line.startswith("edgebuild: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_demo_builds_int8_for_onnx_cpu_and_jetson(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["--target", "onnx-cpu,jetson-orin", "--out", str(out)], capsys)
    assert code == 0, err
    m = manifest(out)
    assert m["verdict"] == "pass" and m["model"]["accuracy"] >= 95.0
    assert m["data"]["calibration"]["name"] != m["data"]["evaluation"]["name"]
    for name in ("onnx-cpu", "jetson-orin"):
        t = m["targets"][name]
        assert t["verdict"] == "pass" and t["artifact"] == "model_int8_qdq.onnx"
        assert t["metrics"]["accuracy_drop"] <= 0.5
        assert t["ratios"]["size_vs_fp32"] <= 0.3
        assert {"p50_ms", "p90_ms", "p99_ms"} <= set(t["latency"])
        assert (out / name / "metadata.json").is_file() and (out / name / "validation.json").is_file()
        assert t["files"]["model_int8_qdq.onnx"]["sha256"]
    assert (out / "jetson-orin" / "build_engine.sh").is_file()
    assert (out / "reference" / "model_fp32.onnx").is_file() and (out / "report.md").is_file()
    assert [p.name for p in tmp_path.glob(".out.*")] in ([], [".out.lock"]), "no staging directory left behind"
    # the manifest is enough to re-run the build
    from edgebuild.pipeline.spec import BuildSpec
    assert BuildSpec.from_dict(m["spec"]).targets == ("onnx-cpu", "jetson-orin")


@pytest.mark.slow
def test_onnx_file_with_one_npz_split_for_calibration_and_evaluation(demo_onnx, digits_npz, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["--model", str(demo_onnx), "--calib", str(digits_npz), "--target", "onnx-cpu",
                             "--out", str(out), "--json"], capsys)
    assert code == 0, err
    m = json.loads(stdout)  # --json prints the manifest
    assert "split" in m["data"] and m["data"]["evaluation"]["samples"] > 800
    assert m["targets"]["onnx-cpu"]["metrics"]["accuracy_drop"] <= 0.5


@pytest.mark.slow
def test_python_reference_source_with_weights(tmp_path, capsys):
    from edgebuild.pipeline.demo_model import WEIGHTS

    out = tmp_path / "out"
    code, _, err = run(["--model", "edgebuild.pipeline.demo_model:DigitsCNN", "--weights", str(WEIGHTS),
                        "--input-shape", "1,1,8,8", "--calib", "digits:train", "--eval", "digits:test",
                        "--target", "onnx-cpu", "--out", str(out)], capsys)
    assert code == 0, err
    m = manifest(out)
    assert m["model"]["fidelity_vs_torch"]["min_cosine"] > 0.9999
    assert "TorchScript-based" in m["model"]["exporter"] and m["model"]["opset"] == 17


@pytest.mark.slow
def test_torchscript_and_exported_program_sources(tmp_path, capsys):
    import torch

    from edgebuild.pipeline.demo_model import load_demo

    model, x = load_demo(), torch.zeros(1, 1, 8, 8)
    torch.jit.trace(model, x).save(str(tmp_path / "m.pt"))
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "m.pt2"))
    code, _, err = run(["--model", str(tmp_path / "m.pt"), "--input-shape", "1,1,8,8", "--calib", "digits:train",
                        "--eval", "digits:test", "--target", "onnx-cpu", "--out", str(tmp_path / "o1")], capsys)
    assert code == 0, err
    code, _, err = run(["--model", str(tmp_path / "m.pt2"), "--calib", "digits:train", "--eval", "digits:test",
                        "--target", "onnx-cpu", "--out", str(tmp_path / "o2")], capsys)
    assert code == 0, err
    assert "dynamo" in manifest(tmp_path / "o2")["model"]["exporter"]


@pytest.mark.slow
def test_impossible_budget_exits_1_names_the_metric_and_keeps_artifacts(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["--target", "onnx-cpu", "--max-latency-ms", "0.0001", "--out", str(out)], capsys)
    assert code == 1
    line = one_error_line(err)
    assert "latency p50" in line and "max 0.0001 ms" in line
    m = manifest(out)
    assert m["verdict"] == "fail" and m["targets"]["onnx-cpu"]["verdict"] == "fail"
    assert (out / "onnx-cpu" / "model_int8_qdq.onnx").is_file()


@pytest.mark.slow
def test_cached_rerun_restores_artifacts(tmp_path, capsys):
    args = ["--target", "onnx-cpu", "--out", str(tmp_path / "out")]
    assert run(args, capsys)[0] == 0
    first = manifest(tmp_path / "out")["targets"]["onnx-cpu"]
    assert run(args, capsys)[0] == 0
    second = manifest(tmp_path / "out")["targets"]["onnx-cpu"]
    assert any(n.startswith("restored from the stage cache") for n in second["notes"])
    assert first["files"] == second["files"], "a cache hit gives the same bytes"


def test_corrupt_model_exits_2_with_one_line_and_leaves_out_untouched(tmp_path, capsys):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"edgebuild": "0.1.0", "targets": {}, "spec": {}}')  # a previous build's output
    code, _, err = run(["--model", str(bad), "--calib", "digits", "--target", "onnx-cpu", "--out", str(out)], capsys)
    assert code == 2
    assert "not a valid ONNX model" in one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert [p.name for p in tmp_path.glob(".out.*")] in ([], [".out.lock"])


@pytest.mark.parametrize("argv,needle", [
    (["--target", "no-such-board"], "unknown target"),
    (["--model", "missing.onnx", "--calib", "digits"], "model not found"),
    (["--model", "edgebuild.pipeline.demo_model:DigitsCNN", "--calib", "digits"], "input shape"),
    (["--model", "no.such.module:thing", "--calib", "digits"], "cannot import model"),
    (["--calib", "missing-dir"], "data source not found"),
    (["--input-shape", "1,x"], "--input-shape"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    code, _, err = run([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2, err
    assert needle in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_unknown_flag_is_usage_error_2(capsys):
    assert run(["--frobnicate"], capsys)[0] == 2


def test_refuses_to_replace_a_directory_that_is_not_an_edgebuild_output(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("mine")
    code, _, err = run(["--target", "onnx-cpu", "--out", str(tmp_path)], capsys)
    assert code == 2 and "refusing to replace" in err
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_interrupt_exits_130_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import edgebuild.pipeline.stages.export as export

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_onnx", interrupted)
    code, _, err = run(["--target", "onnx-cpu", "--out", str(tmp_path / "out")], capsys)
    assert code == 130
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_conversion_failure_is_exit_3_for_that_target_only(tmp_path, capsys, monkeypatch):
    from edgebuild.pipeline.errors import ConversionError
    from edgebuild.targets.tensorrt import TensorRTBackend

    def broken(self, *a, **k):
        raise ConversionError("jetson-orin: simulated converter crash")

    monkeypatch.setattr(TensorRTBackend, "convert", broken)
    out = tmp_path / "out"
    code, _, err = run(["--target", "onnx-cpu,jetson-orin", "--no-cache", "--out", str(out)], capsys)
    assert code == 3 and "simulated converter crash" in err
    m = manifest(out)
    assert m["targets"]["jetson-orin"]["verdict"] == "error" and m["targets"]["onnx-cpu"]["verdict"] == "pass"
    assert not (out / "jetson-orin").exists(), "a failed target leaves no half artifact"


@pytest.mark.slow
def test_validate_command_rechecks_an_artifact(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["--target", "onnx-cpu", "--out", str(out)], capsys)[0] == 0
    code, stdout, err = run(["validate", str(out / "onnx-cpu"), "--eval", "digits:test", "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["verdict"] == "pass" and result["metrics"]["accuracy"] > 95
    assert json.loads((out / "onnx-cpu" / "validation_host.json").read_text()) == json.loads(json.dumps(result))
    (out / "onnx-cpu" / "model_int8_qdq.onnx").unlink()
    code, _, err = run(["validate", str(out / "onnx-cpu"), "--eval", "digits:test"], capsys)
    assert code == 2 and "missing" in err


@pytest.mark.slow
def test_old_opset_onnx_with_dynamic_batch_is_upgraded_and_fixed_to_batch_1(tmp_path, capsys):
    import torch

    from edgebuild.pipeline.demo_model import load_demo

    src = tmp_path / "op11.onnx"
    torch.onnx.export(load_demo(), (torch.zeros(1, 1, 8, 8),), str(src), dynamo=False, opset_version=11,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    code, stdout, err = run(["--model", str(src), "--calib", "digits:train", "--eval", "digits:test",
                             "--target", "onnx-cpu", "--out", str(tmp_path / "out"), "--json"], capsys)
    assert code == 0, err
    m = json.loads(stdout)
    assert m["model"]["opset"] == 13 and any("opset upgraded 11 -> 13" in n for n in m["model"]["notes"])
    assert m["model"]["inputs"][0]["shape"] == [1, 1, 8, 8]


@pytest.mark.slow
def test_all_targets_build_the_demo_and_every_artifact_revalidates(tmp_path, capsys):
    from edgebuild.targets.profiles import catalogue

    out = tmp_path / "out"
    code, _, err = run(["--target", "all", "--out", str(out)], capsys)
    assert code == 0, err
    m = manifest(out)
    assert set(m["targets"]) == set(catalogue())
    for name, t in m["targets"].items():
        assert t["verdict"] == "pass", (name, t["failures"])
        if t["precision"] == "int8":
            assert t["metrics"]["accuracy_drop"] <= 0.5 and t["ratios"]["size_vs_fp32"] <= 0.3, name
    # `edgebuild validate` feeds the source layout, whatever the artifact's own (NHWC, int8 I/O)
    for name in ("arm64", "cortex-m", "x86"):
        code, stdout, err = run(["validate", str(out / name), "--eval", "digits:test", "--json"], capsys)
        assert code == 0, (name, err)
        assert json.loads(stdout)["metrics"]["accuracy_drop"] <= 0.5


@pytest.mark.slow
def test_json_stdout_holds_only_the_manifest_even_when_calibrators_print(tmp_path):
    """The accuracy search's histogram calibrators print; with --json, stdout is still one JSON document."""
    import subprocess
    import sys

    cfg = tmp_path / "edgebuild.yaml"
    cfg.write_text("auto_max_tries: 3\n")
    proc = subprocess.run([sys.executable, "-m", "edgebuild.pipeline.cli", "--model", "tests.outlier_model:outlier_demo",
                           "--input-shape", "1,1,8,8", "--calib", "digits:train", "--eval", "digits:test",
                           "--target", "onnx-cpu", "--config", str(cfg), "--out", str(tmp_path / "out"), "--json"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert proc.returncode in (0, 1), proc.stderr
    m = json.loads(proc.stdout)
    assert len(m["targets"]["onnx-cpu"]["search"]["tries"]) >= 2
    if any(w in t.get("label", "") for t in m["targets"]["onnx-cpu"]["search"]["tries"] for w in ("percentile", "entropy")):
        assert "histogram" in (tmp_path / "out" / "build.log").read_text(), "the calibrators' prints went to the log"
