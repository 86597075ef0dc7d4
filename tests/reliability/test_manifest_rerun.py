"""`-c out/manifest.json` re-runs a build from its manifest: a manifest edited by hand (or by someone else) is input
like any config, so every bad edit is one line and exit 2 before any work, and the earlier output stays as it was."""
from __future__ import annotations

import json

import pytest

from .conftest import listing


def _model(workdir) -> None:
    """A real one-Gemm ONNX model and calibration data, so only the edit can be wrong."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), workdir / "m.onnx")
    np.save(workdir / "x.npy", np.random.default_rng(0).standard_normal((8, 1, 4)).astype(np.float32))


def _manifest(workdir, **spec_edits) -> None:
    from edgebuild.pipeline.spec import BuildSpec

    _model(workdir)

    spec = BuildSpec().to_dict()
    spec.update(model="m.onnx", targets=["onnx-cpu"], calib="x.npy", out="out")
    spec.update(spec_edits)
    out = workdir / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"edgebuild": "0.1.0", "targets": {}, "spec": spec}))


@pytest.mark.parametrize("edit, message", [
    ({"budgets": "fast"}, r"budgets"),
    ({"targets": ["no-such-board"]}, r"no-such-board"),
    ({"budgets": {"max_accuracy_drop": -3}}, r"max_accuracy_drop"),
    ({"auto_max_tries": "many"}, r"auto_max_tries"),
    ({"auto_max_seconds": -1}, r"auto_max_seconds"),
    ({"cache": "yes"}, r"cache must be true or false"),
    ({"precision": "int3"}, r"int3"),
])
def test_an_edited_manifest_is_one_line_exit_2_before_any_work(workdir, edgebuild, edit, message):
    _manifest(workdir, **edit)
    before = listing(workdir)
    r = edgebuild("-c", workdir / "out" / "manifest.json")
    r.check(2, message)
    assert listing(workdir) == before  # nothing written, the earlier output kept


def test_a_truncated_manifest_is_one_line_exit_2(workdir, edgebuild):
    _manifest(workdir)
    path = workdir / "out" / "manifest.json"
    path.write_text(path.read_text()[:40])
    before = listing(workdir)
    edgebuild("-c", path).check(2)
    assert listing(workdir) == before
