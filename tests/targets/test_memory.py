"""Runtime memory (pipeline/memory.py): measured in a child of its own, judged as a `memory` budget."""
import json
from pathlib import Path

import numpy as np
import pytest

from edgebuild.pipeline import memory
from edgebuild.pipeline.cli import main
from edgebuild.pipeline.stages.validate import Budget, memory_checks
from edgebuild.targets.base import Artifact


def _matmul_onnx(path: Path, rows: int, cols: int) -> Path:
    """x[1, rows] @ W[rows, cols]: a model whose weights take rows * cols * 4 bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _measure(path: Path, rows: int) -> dict:
    art = Artifact("t", "onnx", "fp32", path.parent, path.name, [path.name])
    return memory.measure("onnx", art, 1, {"x": np.ones((1, rows), np.float32)})


def test_peak_memory_grows_with_the_weights_the_runtime_holds(tmp_path):
    small = _measure(_matmul_onnx(tmp_path / "small.onnx", 16, 16), 16)
    big = _measure(_matmul_onnx(tmp_path / "big.onnx", 2000, 3000), 2000)
    assert big["peak_mb"] >= 24.0 > small["peak_mb"] + 10  # 24 MB of float weights are resident in the runtime
    assert big["peak_mb"] >= big["load_mb"] > 0 and big["baseline_mb"] > 0
    assert big["runs"] == memory.RUNS and "VmHWM" in big["method"]


def test_memory_budget_is_a_memory_check():
    mem = {"peak_mb": 5.0, "micro": {"arena_kb": 12.0, "flash_kb": 240.0}}
    failed = [c for c in memory_checks(mem, Budget(None, None, None, None, max_memory_mb=1.0, max_arena_kb=8,
                                                   max_flash_kb=1024)) if not c.ok]
    assert [(c.metric, c.kind) for c in failed] == [("memory_peak_mb", "memory"), ("arena_kb", "memory")]
    assert str(failed[0]) == "runtime memory peak 5.00 MB > max 1.0 MB"
    assert memory_checks(mem, Budget(None, None, None, None)) == []  # no budget, no check
    assert Budget.from_dict(Budget(0.5, None, None, None, max_memory_mb=2.0).to_dict()).max_memory_mb == 2.0


@pytest.mark.slow
def test_too_small_memory_budget_fails_the_build_with_exit_1(tmp_path, capsys):
    cfg = tmp_path / "edgebuild.yaml"
    cfg.write_text("budgets:\n  max_memory_mb: 0.01\n")
    out = tmp_path / "out"
    args = ["--target", "onnx-cpu", "--config", str(cfg), "--out", str(out), "--no-auto", "-q"]
    assert main(args) == 1
    assert "runtime memory peak" in capsys.readouterr().err
    v = json.loads((out / "onnx-cpu" / "validation.json").read_text())
    assert [c["metric"] for c in v["failed_checks"]] == ["memory_peak_mb"]
    assert v["failed_checks"][0]["kind"] == "memory" and v["failed_checks"][0]["limit"] == 0.01
    assert v["memory"]["peak_mb"] > 0.01 and v["baseline_fp32"]["memory"]["peak_mb"] > 0  # INT8 and FP32
    assert "| memory |" in (out / "report.md").read_text()
    # a warm re-run takes the numbers from the stage cache
    assert main(args) == 1
    m = json.loads((out / "manifest.json").read_text())["targets"]["onnx-cpu"]
    assert m["cache"]["memory"] == {"memory": True} and m["memory"] == v["memory"]
