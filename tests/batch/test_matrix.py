"""The matrix file: cells expanded and checked before any work; a bad cell is one line, exit 2, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgebuild.pipeline.batch.matrix import load_matrix
from edgebuild.targets.base import backend_info
from edgebuild.pipeline.batch.summary import batch_exit, render_html, write_summary
from edgebuild.pipeline.cli import main
from edgebuild.pipeline.errors import BadInputError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "scripts" / "examples" / "matrix.yaml"


def _matrix(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_example_matrix_is_two_demo_models_by_two_targets(tmp_path):
    m = load_matrix(EXAMPLE, tmp_path / "out")
    assert [c.name for c in m.cells] == ["demo/onnx-cpu", "demo/x86", "demo-lowrank/onnx-cpu", "demo-lowrank/x86"]
    for c in m.cells:
        assert c.spec["model"] is None  # the built-in demo: builds from a fresh clone
        assert c.spec["targets"] == [c.target]
        assert c.spec["out"] == str((tmp_path / "out" / c.model / c.target).resolve())
        assert c.spec["cache_dir"] == m.cache  # one cache for every cell
        assert c.resources.num_cpus == 1
        assert c.resources.memory_mb == backend_info(c.backend).cell_memory_mb  # the demo's file size adds nothing
    assert m.cells[2].spec["compress"] == [{"kind": "lowrank", "options": {"energy": 0.95}}]
    assert m.models == ("demo", "demo-lowrank") and m.targets == ("onnx-cpu", "x86")


def test_defaults_groups_overrides_and_paths(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.onnx").write_bytes(b"\0" * 2_000_000)  # only its size is read here
    path = _matrix(tmp_path, """
        defaults: {budgets: {max_accuracy_drop: 2.0}, calib: digits:train}
        groups: {cheap: [onnx-cpu, x86]}
        targets: [cheap]
        resources: {num_cpus: 2}
        cache: shared-cache
        retries: 1
        models:
          a: {model: models/m.onnx, budgets: {max_size_mb: 5}}
          b:
            targets: [x86]
            resources: {num_cpus: 1}
            cells: {x86: {resources: {memory_mb: 777}, budgets: {max_latency_ms: 9}}}
        """)
    m = load_matrix(path, tmp_path / "out")
    cells = {c.name: c for c in m.cells}
    assert list(cells) == ["a/onnx-cpu", "a/x86", "b/x86"]
    a = cells["a/x86"]
    assert a.spec["model"] == str(tmp_path.resolve() / "models" / "m.onnx")  # relative to the matrix file
    assert a.spec["budgets"]["max_accuracy_drop"] == 2.0 and a.spec["budgets"]["max_size_mb"] == 5  # merged
    assert a.resources.num_cpus == 2 and a.resources.memory_mb == backend_info("openvino").cell_memory_mb + 40
    b = cells["b/x86"]
    assert b.resources.num_cpus == 1 and b.resources.memory_mb == 777
    assert b.spec["budgets"]["max_latency_ms"] == 9 and b.spec["budgets"]["max_accuracy_drop"] == 2.0
    assert m.cache == str((tmp_path / "shared-cache").resolve()) and m.retries == 1


BAD = {
    "unknown target": ("models: {a: {}}\ntargets: [no-such-board]\n", r"model a: unknown target\(s\) no-such-board"),
    "unknown key": ("models: {a: {}}\ntargets: [x86]\nmodle: 1\n", r"unknown key\(s\) modle"),
    "unknown option": ("models: {a: {precison: int8}}\ntargets: [x86]\n", r"model a target x86: unknown build option"),
    "bad precision": ("models: {a: {precision: int4}}\ntargets: [x86]\n", r"model a target x86: .*precision"),
    "bad resources": ("models: {a: {resources: {num_cpus: 0}}}\ntargets: [x86]\n", r"num_cpus must be"),
    "missing model": ("models: {a: {model: nowhere.onnx}}\ntargets: [x86]\n", r"model a target x86: model: .*nowhere.onnx does not exist"),
    "other store": ("models: {a: {}}\ntargets: [x86]\ncache: az://container/cache\n", r"not a store the cache can use"),
    "not yaml": ("models: [a\n", r"not valid YAML"),
    "no targets": ("models: {a: {}}\n", r"model a: no targets"),
    "cell of no target": ("models: {a: {cells: {arm64: {}}}}\ntargets: [x86]\n", r"cells: arm64 is not one of its targets"),
    "out per model": ("models: {a: {out: x}}\ntargets: [x86]\n", r"the batch sets"),
    "bad name": ("models: {'../a': {}}\ntargets: [x86]\n", r"must be a plain name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_matrix_is_one_line_exit_2_before_any_work(case, tmp_path, capsys):
    text, message = BAD[case]
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    with pytest.raises(BadInputError, match=message):
        load_matrix(path, tmp_path / "out")
    code = main(["batch", str(path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("edgebuild: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing started


def test_batch_exit_is_the_worst_cell():
    assert batch_exit([{"exit": 0}, {"exit": 0}]) == 0
    assert batch_exit([{"exit": 0}, {"exit": 1}]) == 1
    assert batch_exit([{"exit": 1}, {"exit": 3}, {"exit": 0}]) == 3
    assert batch_exit([{"exit": 3}, {"exit": 130}]) == 130
    assert batch_exit([{"exit": 0}, {}]) == 3  # a cell without a code failed


def test_summary_grid_links_each_cell_report(tmp_path):
    m = load_matrix(EXAMPLE, tmp_path / "out")
    ok = {"verdict": "pass", "exit": 0, "precision": "int8", "artifact": "x86/model_int8.xml", "seconds": 3.0,
          "table": {"drop": "+0.10 pt", "speedup": "1.50×", "size": "0.250 MB"}}
    records = {c.name: {**ok, "model": c.model, "target": c.target} for c in m.cells}
    records["demo-lowrank/x86"] = {"model": "demo-lowrank", "target": "x86", "verdict": "error", "exit": 3,
                                   "error": "the worker died 3 time(s)"}
    records["demo/x86"]["clock_decided"] = ["a try did not fit before the search's time limit"]
    doc = write_summary(tmp_path / "out", m, {"name": "local", "cpus": 2}, records, 7.0)
    assert doc["exit"] == 3 and doc["executor"] == "local"
    assert doc["counts"]["pass"] == 3 and doc["counts"]["error"] == 1
    assert {tuple(c[k] for k in ("model", "target")) for c in doc["cells"]} == {(c.model, c.target) for c in m.cells}
    assert all({"model", "target", "exit", "verdict", "artifact", "skipped"} <= set(c) for c in doc["cells"])
    page = (tmp_path / "out" / "batch.html").read_text()
    assert page == render_html(doc, m)
    assert page.count("<a href='demo/onnx-cpu/report.html'>") == 1 and "demo-lowrank/x86/report.html" not in page
    assert "the worker died 3 time(s)" in page and "1.50×" in page and "int8" in page
    assert page.count("the search's time limit decided: a try did not fit") == 1


def test_clock_decided_reads_the_search_record():
    from edgebuild.pipeline.batch.cell import clock_decided

    hit = {"targets": {"x86": {"search": {"enabled": True, "time_limit": ["a try did not fit before the limit"]}}}}
    assert clock_decided(hit, "x86") == ["a try did not fit before the limit"]
    assert clock_decided({"targets": {"x86": {"search": {"enabled": True, "tries": []}}}}, "x86") == []
    assert clock_decided({"targets": {}}, "x86") == []


def test_batch_help_imports_no_ray_and_no_heavy_backend():
    probe = ("import sys\nfrom edgebuild.pipeline.cli import main\ncode = main(['batch', '--help'])\n"
             "print('HEAVY:' + ','.join(m for m in ('ray', 'torch', 'tensorflow', 'openvino', 'onnxruntime') "
             "if m in sys.modules))\nraise SystemExit(code)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--address" in out.stdout and "--no-resume" in out.stdout
    assert out.stdout.strip().endswith("HEAVY:")


@pytest.mark.parametrize("codes, expected", [((0, 0), 0), ((0, 1), 1), ((1, 3), 3)])
def test_cli_exits_with_the_worst_cell_in_one_line(codes, expected, tmp_path, monkeypatch, capsys):
    from edgebuild.pipeline.batch import run as run_module

    cells = [{"model": "m", "target": f"t{i}", "exit": c, "verdict": "pass" if c == 0 else "fail"}
             for i, c in enumerate(codes)]
    result = run_module.BatchResult({"exit": batch_exit(cells), "cells": cells}, tmp_path)
    monkeypatch.setattr(run_module, "run_batch", lambda *a, **k: result)
    assert main(["batch", str(EXAMPLE), "-o", str(tmp_path)]) == expected
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("edgebuild: ")]
    assert len(err) == (expected != 0)
    if expected:
        assert "m/t1 (exit" in err[0] and "batch.html" in err[0]


def test_outputs_digest_ignores_what_was_measured_not_what_was_built():
    from edgebuild.pipeline.batch.cell import outputs_digest

    base = {"created": "t0", "seconds": 3.0, "cwd": "/a", "spec": {"out": "/a/out", "cache": True, "seed": 0},
            "targets": {"x86": {"files": {"m.xml": {"sha256": "aa"}}, "precision": "int8", "latency": {"p50_ms": 1.0},
                                "notes": ["restored from the stage cache (sha256 verified)"],
                                "objective": {"shipped": "m.xml", "warnings": []},
                                "search": {"from_cache": True, "tries": [{"label": "p", "latency_p50_ms": 2}]}}}}
    measured = json.loads(json.dumps(base))
    measured.update(created="t1", seconds=9.0, cwd="/b", spec={"out": "/b/x", "cache": False, "seed": 0})
    t = measured["targets"]["x86"]
    t.update(latency={"p50_ms": 7.0}, notes=[], search={"tries": [{"label": "p", "latency_p50_ms": 5}]},
             objective={"shipped": "m.xml", "warnings": ["FP16 runs slower than the FP32 baseline on this host: 0.90x"]})
    assert outputs_digest(measured) == outputs_digest(base)
    for change in (lambda m: m["targets"]["x86"]["files"]["m.xml"].update(sha256="bb"),
                   lambda m: m["targets"]["x86"].update(precision="fp16"),
                   lambda m: m["targets"]["x86"]["objective"].update(shipped="m_fp16.xml"),
                   lambda m: m["spec"].update(seed=1),
                   lambda m: m["targets"]["x86"]["notes"].append("NNCF: a warning")):
        other = json.loads(json.dumps(base))
        change(other)
        assert outputs_digest(other) != outputs_digest(base)
