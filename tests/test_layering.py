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


# ---- the whole tree: no import cycle, no upward import, no private name across modules, no named backend ----------
# Layers, lowest first: a module may import its own layer and the ones below, never one above.
#   leaf modules (pipeline/toplevel)  <  calibration/  <  targets' contract (targets/*.py that register no backend)
#   <  backends (a targets/ module or sub-package that registers one)  <  pipeline/
# The pipeline reaches backends only through the contract (targets/base.py: get_backend, BackendInfo).
TREE = {"pipeline/toplevel": "edgebuild", "pipeline": "edgebuild.pipeline", "targets": "edgebuild.targets",
        "calibration": "edgebuild.calibration"}
# Known import cycles: none is left (issue 21). A cycle not listed here fails the test; a listed one that is gone
# fails it too (take it off the list), so the list only shrinks.
KNOWN_CYCLES: set[frozenset[str]] = set()


def tree_modules() -> dict[str, Path]:
    """Every edgebuild module (name -> file): a package's ``__init__`` is the package."""
    out = {}
    for folder, package in TREE.items():
        for path in modules(folder):
            rel = path.relative_to(ROOT / folder)
            if folder == "pipeline" and rel.parts[0] == "toplevel":
                continue
            parts = rel.with_suffix("").parts
            out[".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return out


class _Imports(ast.NodeVisitor):
    """Import statements anywhere (function bodies included), ``importlib.import_module("literal")``, and the
    imported names (for private ones); ``if TYPE_CHECKING:`` blocks are not imports at run time."""

    def __init__(self, package: str):
        self.package, self.found = package, []  # (line, module or module.name, imported name or None)

    def visit_If(self, node):
        test = node.test
        if getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
            for n in node.orelse:
                self.visit(n)
            return
        self.generic_visit(node)

    def visit_Import(self, node):
        self.found += [(node.lineno, a.name, None) for a in node.names]

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join(p for p in [*parts, base] if p)
        self.found += [(node.lineno, f"{base}.{a.name}", a.name) for a in node.names] + [(node.lineno, base, None)]

    def visit_Call(self, node):
        if (getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            self.found.append((node.lineno, node.args[0].value, None))
        self.generic_visit(node)


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str, str]]]]:
    """(module -> the edgebuild modules it imports, module -> [(line, module, private name)] imported across)."""
    tree = tree_modules()
    graph, private = {}, {}
    for name, path in tree.items():
        visitor = _Imports(name if path.name == "__init__.py" else name.rpartition(".")[0])
        visitor.visit(ast.parse(path.read_text()))
        deps = set()
        for line, target, imported in visitor.found:
            while target and target not in tree:
                target = target.rpartition(".")[0]
            if not target or target == name or target == "edgebuild":
                continue
            deps.add(target)
            if imported and imported.startswith("_") and not imported.startswith("__") and f"{target}.{imported}" not in tree:
                private.setdefault(name, []).append((line, target, imported))
        graph[name] = deps
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(frozenset(component))
    return out


def test_the_cycle_finder_finds_cycles_through_function_level_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    visitor = _Imports("edgebuild.pipeline")
    visitor.visit(ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import edgebuild.x\n"
                            "def f():\n    from edgebuild.pipeline import cli\n    from .memory import _private\n"))
    names = {n for _, n, _ in visitor.found}
    assert "edgebuild.pipeline.cli" in names and "edgebuild.pipeline.memory._private" in names
    assert "edgebuild.x" not in names


def test_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 80 and "edgebuild.targets.tflite.backend" in graph
    found = set(cycles(graph))
    new = [sorted(c) for c in found - KNOWN_CYCLES]
    assert not new, "import cycles (function-level imports count):\n" + "\n".join(
        f"{c}: " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c))) for c in new)
    gone = [sorted(c) for c in KNOWN_CYCLES - found]
    assert not gone, f"these cycles are gone: take them off KNOWN_CYCLES: {gone}"


def layer(module: str, backends: set[str]) -> int:
    if module.startswith("edgebuild.pipeline"):
        return 4
    if module.startswith("edgebuild.targets."):
        return 3 if module.split(".")[2] in backends else 2
    if module.startswith("edgebuild.calibration"):
        return 1
    return 0


def test_no_upward_import_and_the_pipeline_names_no_backend():
    from edgebuild.targets.base import known_backends

    backends = set(known_backends())
    assert {"tflite", "onnx", "openvino"} <= backends
    graph, _ = import_graph()
    up = [f"{m} (layer {layer(m, backends)}) imports {d} (layer {layer(d, backends)})"
          for m, deps in sorted(graph.items()) for d in sorted(deps) if layer(d, backends) > layer(m, backends)]
    assert not up, "upward imports:\n" + "\n".join(up)
    direct = [f"{m} imports {d}" for m, deps in sorted(graph.items()) if layer(m, backends) == 4
              for d in sorted(deps) if layer(d, backends) == 3]
    assert not direct, "the pipeline imports a backend (use the contract, targets/base.py):\n" + "\n".join(direct)
    named = []  # get_backend("tflite") / backend_info("onnx") in the pipeline: a backend known by name
    for name, path in tree_modules().items():
        if layer(name, backends) != 4:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in
                    ("get_backend", "backend_info") and node.args and isinstance(node.args[0], ast.Constant)):
                named.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not named, "the pipeline names a backend:\n" + "\n".join(named)


def test_no_private_name_imported_across_modules():
    _, private = import_graph()
    new = sorted({(m, t, n) for m, hits in private.items() for _, t, n in hits})
    assert not new, "private names imported from another module (make them public or move them):\n" + "\n".join(
        f"{m} imports {t}.{n}" for m, t, n in new)
