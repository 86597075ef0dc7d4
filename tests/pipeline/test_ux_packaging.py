"""Lean installs: the lock carries nothing the code never imports (litert-torch's tree), every lock entry's
requirements are in the lock (pip check clean on a fresh install), extras cover every backend, and a missing
backend names its extra."""
import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DROPPED = ("litert-torch", "jax", "jaxlib", "transformers", "torchao", "kagglehub", "huggingface-hub", "ai-edge-quantizer")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[")[0])] = version
    return pins


def test_lock_drops_litert_torch_and_its_tree_and_the_code_never_imports_them():
    pins = _lock()
    assert not [p for p in DROPPED if canonicalize_name(p) in pins]
    sources = [p for d in ("pipeline", "targets", "calibration", "edgebuild") for p in (ROOT / d).rglob("*.py")]
    imports = re.compile(r"^\s*(?:import|from)\s+(litert_torch|jax|transformers|torchao|kagglehub)\b", re.M)
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
    assert "pytest" not in " ".join(project["dependencies"]) and "pytest" in extras["dev"]
    pins = _lock()
    for name in [*project["dependencies"], *(d for k, v in extras.items() for d in v if not d.startswith("edgebuild"))]:
        assert canonicalize_name(Requirement(name).name) in pins, f"{name} is not in requirements.lock"
    from edgebuild.targets.base import get_backend

    for backend, extra in (("onnx", "onnx"), ("openvino", "openvino"), ("tflite", "tflite")):
        for mod in get_backend(backend).requires:
            dist = {"tf_keras": "tf-keras", "onnx_graphsurgeon": "onnx-graphsurgeon", "ai_edge_litert": "ai-edge-litert"}.get(mod, mod)
            assert dist in extras[extra] + project["dependencies"], f"{backend} needs {mod}: not in [{extra}]"


def test_a_missing_backend_names_its_extra():
    from edgebuild.pipeline.errors import MissingToolError

    assert "pip install 'edgebuild[openvino]'" in str(MissingToolError("x86", "nncf"))
    assert "pip install 'edgebuild[tflite]'" in str(MissingToolError("arm64", "tensorflow"))
