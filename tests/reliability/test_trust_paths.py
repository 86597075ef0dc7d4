"""Code is imported only when the user names it: never from the working directory put on ``sys.path`` for the
whole process, never because a received artifact folder's metadata names it (issue 27)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BUILD = ("--calib", "data.npz", "--no-auto", "--max-accuracy-drop", "100", "--no-cache")
MARKER_MODULE = "import pathlib\npathlib.Path(__file__).with_name('pwned').write_text('ran')\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny ONNX classifier built for onnx-cpu (once for the module): the folder and its data."""
    import torch

    from edgebuild.pipeline.cli import main

    d = tmp_path_factory.mktemp("built")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 4, 4),), str(d / "tiny.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"])
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.random((24, 1, 4, 4), dtype=np.float32), y=rng.integers(0, 4, 24))
    cwd = Path.cwd()
    os.chdir(d)
    try:
        assert main(["--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD, "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    return d


@pytest.fixture
def received(built, workdir):
    """The built output as received from someone: copied into the working directory."""
    shutil.copytree(built / "out", workdir / "out")
    return workdir / "out"


def _name_evaluator(art: Path, ref: str) -> None:
    meta = json.loads((art / "metadata.json").read_text())
    meta.setdefault("judging", {})["evaluator"] = ref
    (art / "metadata.json").write_text(json.dumps(meta))


def test_validate_never_imports_an_evaluator_named_by_the_artifact_metadata(received, workdir, edgebuild):
    art = received / "onnx-cpu"
    _name_evaluator(art, "evilval:score")
    for folder in (art, workdir):  # beside the artifact and in the current directory
        (folder / "evilval.py").write_text(MARKER_MODULE + "def score(*a):\n    return {'s': 1.0}\n")
    r = edgebuild("validate", art, "--outputs", received / "reference" / "outputs.npz")
    r.check(2, r"judged by the evaluator 'evilval:score' named in its metadata\.json; validate never imports")
    assert not (art / "pwned").exists() and not (workdir / "pwned").exists()
    assert "evilval" not in sys.modules


def test_validate_imports_the_users_own_evaluator_by_its_file(received, workdir, edgebuild):
    art = received / "onnx-cpu"
    _name_evaluator(art, "myeval_t27:score")
    (workdir / "myeval_t27.py").write_text("def score(outputs, labels, reference=None):\n    return {'agree': 1.0}\n")
    before = list(sys.path)
    try:
        r = edgebuild("validate", art, "--outputs", received / "reference" / "outputs.npz",
                      "--evaluator", "myeval_t27:score", "--json")
        r.check(0)
        assert sys.modules["myeval_t27"].__file__ == str(workdir / "myeval_t27.py")
        assert sys.path == before
    finally:
        sys.modules.pop("myeval_t27", None)


def test_a_model_module_is_imported_by_its_file_and_sys_path_is_untouched(workdir):
    from edgebuild.pipeline.spec import BuildSpec, InputSpec
    from edgebuild.pipeline.stages.load import load_model

    (workdir / "mynet_t27.py").write_text("import torch\nclass Net(torch.nn.Linear):\n"
                                          "    def __init__(self):\n        super().__init__(4, 2)\n")
    before = list(sys.path)
    try:
        loaded = load_model(BuildSpec(model="mynet_t27:Net", inputs=(InputSpec("input", (1, 4)),)))
        assert type(loaded.module).__module__ == "mynet_t27"
        assert sys.modules["mynet_t27"].__file__ == str(workdir / "mynet_t27.py")
        assert sys.path == before
    finally:
        sys.modules.pop("mynet_t27", None)


@pytest.mark.slow
def test_a_module_in_the_working_directory_never_shadows_a_library(built, workdir):
    """A plain ONNX build in a folder holding ``ml_dtypes.py`` (onnx imports ml_dtypes): the real console script,
    so its own process and its converter children are what is checked."""
    for f in ("tiny.onnx", "data.npz"):
        shutil.copy(built / f, workdir / f)
    (workdir / "ml_dtypes.py").write_text(MARKER_MODULE + "raise ImportError('shadowed')\n")
    exe = Path(sys.executable).with_name("edgebuild")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(exe), "--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD, "--quiet"], cwd=workdir,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (workdir / "pwned").exists()
