"""Layering: the pipeline depends on the backends and the data, never the other way round.

    edgebuild.pipeline  ->  edgebuild.targets, edgebuild.calibration  ->  leaf modules (edgebuild.errors, .specs,
                                                                          .procs, .refs: pipeline/toplevel/)

``calibration/`` and ``targets/`` must not import ``edgebuild.pipeline`` (not even lazily inside a function), and
the leaf modules import nothing of edgebuild but each other. Checked on the source (ast), and by importing every
module of both packages in a fresh interpreter.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAF_DIR = ROOT / "pipeline" / "toplevel"
PACKAGES = {"calibration": "edgebuild.calibration", "targets": "edgebuild.targets"}


def imported_modules(source: str, package: str = "") -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``source``, wherever it is (function bodies
    included); ``from edgebuild import pipeline`` counts as ``edgebuild.pipeline``; relative imports are
    resolved against ``package``; ``importlib.import_module("...")`` with a literal name counts too."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(path: Path, package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: imports {name}"
            for line, name in imported_modules(path.read_text(), package)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(folder: str, path: Path) -> str:
    """``targets/tflite/convert.py`` -> ``edgebuild.targets.tflite.convert``; a package's ``__init__`` is its name."""
    parts = path.relative_to(ROOT / folder).with_suffix("").parts
    return ".".join([PACKAGES[folder], *(parts[:-1] if parts[-1] == "__init__" else parts)])


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_no_pipeline_import(folder):
    files = modules(folder)
    assert len(files) >= 3, f"no modules found under {folder}/"
    bad = [v for f in files for v in violations(f, PACKAGES[folder], ("edgebuild.pipeline",))]
    assert not bad, f"{folder}/ must not import edgebuild.pipeline (move what it needs to a leaf module):\n" + "\n".join(bad)


def test_leaf_modules_import_no_package():
    files = [p for p in modules("pipeline/toplevel") if p.name != "__init__.py"]
    assert {p.stem for p in files} >= {"errors", "specs", "procs", "refs", "similarity"}
    bad = [v for f in files for v in violations(f, "edgebuild", ("edgebuild.pipeline", "edgebuild.targets",
                                                                  "edgebuild.calibration"))]
    assert not bad, "leaf modules import nothing of edgebuild but each other:\n" + "\n".join(bad)


def test_the_check_sees_every_form_of_import():
    source = ("import edgebuild.pipeline.cache\n"
              "from edgebuild import pipeline\n"
              "def f():\n    from edgebuild.pipeline.stages.per_target import open_runner\n"
              "from ..pipeline import memory\n"
              "import importlib\nimportlib.import_module('edgebuild.pipeline.build')\n"
              "from edgebuild.errors import BadInputError\nfrom edgebuild.targets.base import Artifact\n")
    names = {n for _, n in imported_modules(source, "edgebuild.targets")}
    hits = {n for n in names if n == "edgebuild.pipeline" or n.startswith("edgebuild.pipeline.")}
    assert hits >= {"edgebuild.pipeline.cache", "edgebuild.pipeline", "edgebuild.pipeline.stages.per_target",
                    "edgebuild.pipeline.memory", "edgebuild.pipeline.build"}
    assert {"edgebuild.errors", "edgebuild.targets.base"} <= names - hits


def test_importing_targets_and_calibration_loads_no_pipeline_module():
    names = [module_name(folder, p) for folder in PACKAGES for p in modules(folder)]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('edgebuild.pipeline')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"importing targets/ and calibration/ loaded {out.stdout.strip()}"
