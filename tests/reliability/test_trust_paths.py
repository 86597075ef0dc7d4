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


# ---- files beside the output and the artifact: never opened through a planted symlink -------------------------
@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim.txt"
    v.write_text("precious")
    return v


def test_validate_never_writes_through_a_planted_temp_file(received, victim, edgebuild):
    art = received / "onnx-cpu"
    for name in (".validation_outputs.json.tmp", "validation_outputs.json"):
        (art / name).unlink(missing_ok=True)
    (art / ".validation_outputs.json.tmp").symlink_to(victim)
    edgebuild("validate", art, "--outputs", received / "reference" / "outputs.npz").check(0)
    assert victim.read_text() == "precious"
    assert not (art / "validation_outputs.json").is_symlink()
    assert json.loads((art / "validation_outputs.json").read_text())["target"] == "onnx-cpu"


def test_validate_in_a_read_only_artifact_folder_is_one_line(received, edgebuild):
    if os.getuid() == 0:
        pytest.skip("root writes in read-only folders")
    art = received / "onnx-cpu"
    art.chmod(0o555)
    try:
        edgebuild("validate", art, "--outputs", received / "reference" / "outputs.npz").check(2, "cannot write")
    finally:
        art.chmod(0o755)


def test_a_planted_build_log_symlink_is_never_followed(built, workdir, victim, edgebuild):
    from edgebuild.pipeline.buildlog import log_path_for

    for f in ("tiny.onnx", "data.npz"):
        shutil.copy(built / f, workdir / f)
    log_path_for(Path("out")).symlink_to(victim)
    r = edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD)
    r.check(2, "cannot write")
    assert victim.read_text() == "precious"
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("kind", ["symlink to a file", "dangling symlink", "hard link"])
def test_a_planted_lock_is_refused_before_any_work(kind, built, workdir, tmp_path, edgebuild):
    for f in ("tiny.onnx", "data.npz"):
        shutil.copy(built / f, workdir / f)
    target = tmp_path / "elsewhere" / "created-by-edgebuild"
    target.parent.mkdir()
    if kind == "symlink to a file":
        target.write_text("")
    if kind == "hard link":
        target.write_text("")
        os.link(target, workdir / ".out.lock")
    else:
        (workdir / ".out.lock").symlink_to(target)
    before = sorted(p.name for p in workdir.iterdir())
    r = edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD)
    r.check(2, r"the lock file .*\.out\.lock is (a symbolic link|a hard link to another file) .*refusing to follow it")
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written, no log left
    assert not (kind == "dangling symlink" and target.exists())
    assert kind == "dangling symlink" or target.read_text() == ""


def test_the_lock_opened_at_the_swap_refuses_a_symlink_planted_meanwhile(tmp_path):
    from edgebuild.pipeline.output import _output_lock
    from edgebuild.pipeline.errors import BadInputError

    out = tmp_path / "out"
    (tmp_path / ".out.lock").symlink_to(tmp_path / "target")
    with pytest.raises(BadInputError, match="symbolic link"):
        with _output_lock(out):
            pass
    assert not (tmp_path / "target").exists()


def test_a_planted_old_symlink_and_a_signal_during_the_swap(built, received, workdir, victim, edgebuild, monkeypatch,
                                                            caplog):
    """A ``.out.old-<pid>`` symlink (as for a dead build, and for this pid) is never followed nor removed through;
    a SIGTERM landing in the middle of the swap is held: the swap finishes, the build reports success."""
    import signal

    for f in ("tiny.onnx", "data.npz"):
        shutil.copy(built / f, workdir / f)
    victim_dir = victim.parent / "victim-dir"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("precious")
    for pid in (999_999, os.getpid()):
        (workdir / f".out.old-{pid}").symlink_to(victim_dir)
    real, moved = os.replace, []

    def replace(a, b, **kw):
        real(a, b, **kw)
        if ".out.old-" in str(b):  # the earlier output moved away, the new one not yet in
            moved.append(b)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(os, "replace", replace)
    r = edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD)
    monkeypatch.undo()
    r.check(0)
    assert moved and "arrived while the output was being swapped in" in caplog.text
    assert sorted(p.name for p in victim_dir.iterdir()) == ["keep.txt"]
    assert (workdir / "out" / "build.log").is_file() and (workdir / "out" / "manifest.json").is_file()


# ---- what validate reads from elsewhere: one line, exit 2, never numpy's allow_pickle advice ----------------------
@pytest.mark.parametrize("what", ["a text file", "a directory", "object arrays"])
def test_validate_outputs_that_are_not_an_npz_archive(what, received, workdir, edgebuild):
    art = received / "onnx-cpu"
    if what == "a text file":
        path, message = workdir / "notes.txt", r"notes\.txt: not a \.npz archive \(not a zip"
        path.write_text("the board printed this\n")
    elif what == "a directory":
        path, message = Path("/etc"), r"/etc: is a directory, not a \.npz archive"
    else:
        path, message = workdir / "objects.npz", r"holds Python objects \(a pickle\)"
        np.savez(path, y=np.array([object()] * 3, dtype=object))
    r = edgebuild("validate", art, "--outputs", path)
    r.check(2, message)
    assert "allow_pickle" not in r.err


@pytest.mark.parametrize("garbage", ["not json", "a list", "a missing field", "object arrays", "strings"])
def test_garbage_from_a_board_is_one_line(garbage, tmp_path):
    from edgebuild.pipeline.device import read_results
    from edgebuild.pipeline.errors import BadInputError

    result = {"runtime": "onnxruntime", "runtime_version": "1", "load_s": 0.1, "samples": 2, "times_ms": [1.0],
              "warmup": 1, "machine": "aarch64", "python": "3.11", "runtimes": {}}
    outputs = {"y0": np.zeros((2, 3), np.float32)}
    if garbage == "not json":
        (tmp_path / "result.json").write_text("{{{" * 10)
    else:
        if garbage == "a list":
            result = [result]
        elif garbage == "a missing field":
            result.pop("machine")
        elif garbage == "object arrays":
            outputs = {"y0": np.array([None, None], dtype=object)}
        else:
            outputs = {"y0": np.array(["a", "b"])}
        (tmp_path / "result.json").write_text(json.dumps(result))
    np.savez(tmp_path / "outputs.npz", **outputs)
    with pytest.raises(BadInputError, match=r"device runner|outputs\.npz: member y0 holds Python objects"):
        read_results(tmp_path, 2)


def test_good_results_from_a_board_are_read(tmp_path):
    from edgebuild.pipeline.device import read_results

    (tmp_path / "result.json").write_text(json.dumps({"runtime": "onnxruntime", "runtime_version": "1", "load_s": 0.1,
                                                      "times_ms": [], "warmup": 0, "machine": "x", "python": "3"}))
    np.savez(tmp_path / "outputs.npz", y0=np.ones((2, 3), np.float32), y1=np.zeros((2,), np.int64))
    outputs, result = read_results(tmp_path, 2)
    assert len(outputs) == 2 and outputs[1][0].shape == (3,) and result["machine"] == "x"


def test_validate_judges_the_memory_budgets_a_build_judged(received, edgebuild):
    """Issue 21: a memory budget missed at build time is missed by validate too (on the memory the build measured)."""
    art = received / "onnx-cpu"
    assert json.loads((art / "validation.json").read_text())["memory"]["peak_mb"] > 0.001
    meta = json.loads((art / "metadata.json").read_text())
    meta["budgets"]["max_memory_mb"] = 0.001
    (art / "metadata.json").write_text(json.dumps(meta))
    r = edgebuild("validate", art, "--outputs", received / "reference" / "outputs.npz")
    r.check(1, r"runtime memory peak .* MB > max 0\.001 MB")


def test_a_read_only_output_folder_is_refused_before_any_work(workdir, edgebuild, monkeypatch):
    """Renaming a directory away needs write access to it: found out before any work, not after (root can, so the
    check is made to see a read-only folder whatever the user)."""
    (workdir / "out").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p).name == "out" else real(p, mode, **k))
    r = edgebuild("--target", "onnx-cpu", "--no-auto", "--no-cache")
    r.check(2, r"--out out: the output folder is read-only")
    assert sorted(p.name for p in workdir.iterdir()) == ["out"]


def test_a_flat_module_importing_its_sibling_says_how_to_fix_it(workdir, edgebuild):
    (workdir / "helpers_t27.py").write_text("WIDTH = 4\n")
    (workdir / "flatnet_t27.py").write_text("import torch\nfrom helpers_t27 import WIDTH\n"
                                            "def net():\n    return torch.nn.Linear(WIDTH, 2)\n")
    (workdir / "pkg_t27").mkdir()
    (workdir / "pkg_t27" / "__init__.py").write_text("")
    (workdir / "pkg_t27" / "helpers.py").write_text("WIDTH = 4\n")
    (workdir / "pkg_t27" / "net.py").write_text("import torch\nfrom pkg_t27.helpers import WIDTH\n"
                                                "def net():\n    return torch.nn.Linear(WIDTH, 2)\n")
    before = list(sys.path)
    try:
        r = edgebuild("--model", "flatnet_t27:net", "--input-shape", "1,4", "--target", "onnx-cpu", "--no-cache")
        r.check(2, r"No module named 'helpers_t27' \(flatnet_t27\.py is imported by its own path .* a package")
        from edgebuild.pipeline.spec import BuildSpec, InputSpec
        from edgebuild.pipeline.stages.load import load_model

        loaded = load_model(BuildSpec(model="pkg_t27.net:net", inputs=(InputSpec("input", (1, 4)),)))
        assert loaded.module.in_features == 4 and sys.path == before
    finally:
        for name in [n for n in sys.modules if n.startswith(("pkg_t27", "flatnet_t27", "helpers_t27"))]:
            sys.modules.pop(name)


def test_a_signal_just_after_the_swap_leaves_the_new_output_whole_with_its_log(built, workdir, edgebuild, monkeypatch):
    import contextlib
    import signal

    from edgebuild.pipeline import output as B

    for f in ("tiny.onnx", "data.npz"):
        shutil.copy(built / f, workdir / f)
    real_swap = B._swap_in

    def swap_then_signal(staging, out):
        real_swap(staging, out)
        os.kill(os.getpid(), signal.SIGTERM)  # lands once the swap is done (the hold is switched off here)
    monkeypatch.setattr(B, "_swap_in", swap_then_signal)
    monkeypatch.setattr(B, "_signals_held", contextlib.nullcontext)
    r = edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD)
    assert r.code == 130, r.err[-2000:]
    log = workdir / "out" / "build.log"
    assert log.is_file() and "onnx-cpu" in log.read_text()
    assert (workdir / "out" / "manifest.json").is_file()
    assert not [p.name for p in workdir.iterdir() if p.name.startswith(".out.") and p.name != ".out.lock"]


def test_an_output_that_is_a_symlink_is_refused_before_any_work(received, workdir, edgebuild):
    (workdir / "link").symlink_to(received)
    before = {p: p.read_bytes() for p in received.rglob("*") if p.is_file()}
    r = edgebuild("--target", "onnx-cpu", "--no-auto", "--no-cache", "-o", "link")
    r.check(2, r"--out link: it is a symbolic link \(to .*\); give the folder itself")
    assert {p: p.read_bytes() for p in received.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in workdir.iterdir()) == ["link", "out"]
