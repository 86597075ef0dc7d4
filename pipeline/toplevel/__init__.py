"""edgebuild: turn a trained model into validated edge artifacts.

    from edgebuild import build, BuildSpec
    result = build(model=net, input_shape=(1, 1, 8, 8), calib=x, eval=(x_val, y_val), targets=["onnx-cpu"])
    result.exit_code, result.manifest["targets"]["onnx-cpu"]["verdict"]

(This file is the ``edgebuild`` package root; it lives in ``pipeline/toplevel/`` because the repository's
top level is fixed — pyproject.toml maps it.) Importing this package is cheap: ``build`` and ``BuildSpec`` are loaded on first use (no torch, no backend).
"""
from __future__ import annotations


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("edgebuild")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


__version__ = _version()
__all__ = ["build", "BuildSpec", "BuildResult", "EdgeBuildError", "__version__"]

_LAZY = {
    "build": ("edgebuild.pipeline.api", "build"),
    "BuildSpec": ("edgebuild.pipeline.spec", "BuildSpec"),
    "BuildResult": ("edgebuild.pipeline.build", "BuildResult"),
    "EdgeBuildError": ("edgebuild.errors", "EdgeBuildError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edgebuild' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
