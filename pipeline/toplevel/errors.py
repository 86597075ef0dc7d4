"""The one error family of edgebuild (a leaf module: it imports nothing of edgebuild).

Every error a user can cause or a build can meet is an ``EdgeBuildError``; the CLI catches it once,
prints its message as one line and exits with its ``exit_code``. Anything else is a bug and keeps its
traceback. ``calibration/``, ``targets/`` and ``pipeline/`` all import it from here.
"""
from __future__ import annotations

from contextlib import contextmanager


class EdgeBuildError(Exception):
    """Base class: one line for the user, one exit code."""

    exit_code = 3


class BadInputError(EdgeBuildError):
    """Bad usage, a missing or corrupt file, an inconsistent configuration (exit 2)."""

    exit_code = 2


class IntegrityError(BadInputError):
    """A file does not have the sha256 recorded for it (tampered, swapped, truncated): exit 2, never loaded."""


class BudgetError(EdgeBuildError):
    """A build finished but at least one target missed a budget (exit 1)."""

    exit_code = 1


class ConversionError(EdgeBuildError):
    """A backend failed to convert or to run a model (exit 3)."""

    exit_code = 3


class MissingToolError(BadInputError):
    """An optional library is not installed (exit 2: the install lacks an extra, nothing was built): one line naming
    what needs it and the extra that brings it."""

    # import name -> the extra that installs it, for what the pipeline itself uses; a backend's libraries come from
    # its descriptor (targets/base.py BackendInfo.extra), through ``resolvers``
    EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "onnxslim": "onnx",
              "torch": "torch", "safetensors": "torch", "onnxscript": "torch", "torch_pruning": "torch",
              "sklearn": "torch", "ray": "batch", "matplotlib": "report", "pyarrow": "store"}
    resolvers: list = []  # functions import name -> extra (or None), added by targets/base.py: the backends' own
    DISTRIBUTIONS = {"sklearn": "scikit-learn"}  # import name -> what pip calls it, where it is not the name with '-'
    NEEDED_BY = {  # what needs a library, when the code that found it missing did not say
        "torch": "a PyTorch model (package.module:attr, .pt, .pt2), the built-in demo or --compress",
        "sklearn": "the digits data (--calib/--eval digits, the built-in demo)",
        "safetensors": "--weights .safetensors and the built-in demo",
        "onnxscript": "exporting a .pt2 model", "torch_pruning": "--compress prune:method=structured",
        "ray": "edgebuild batch on Ray", "matplotlib": "report.html's charts",
    }

    def __init__(self, target: str, package: str, needed_by: str | None = None, extra: str | None = None):
        self.package = package.split(".")[0]
        extra = extra or self.extra_of(self.package) or "all"
        dist = self.DISTRIBUTIONS.get(self.package, self.package.replace("_", "-"))
        what = needed_by or (f"target {target}" if target else self.NEEDED_BY.get(self.package, "this build"))
        super().__init__(f"{what} needs {dist}, which is not installed: install it with `pip install 'edgebuild[{extra}]'`"
                         + (" (or every backend: 'edgebuild[all]')" if extra != "all" else ""))

    @classmethod
    def extra_of(cls, package: str) -> str | None:
        """The extra that installs import name ``package`` (None: not an optional library of edgebuild)."""
        if package in cls.EXTRAS:
            return cls.EXTRAS[package]
        return next((e for e in (r(package) for r in cls.resolvers) if e), None)

    @classmethod
    def optional(cls, error: ModuleNotFoundError) -> "MissingToolError | None":
        """The one-line error for an optional library's ModuleNotFoundError; None for any other module (a bug, or a
        user's module: it keeps its traceback)."""
        name = (getattr(error, "name", None) or "").split(".")[0]
        return cls("", name) if name and cls.extra_of(name) else None


def require(module: str, needed_by: str):
    """``importlib.import_module(module)``, or a MissingToolError naming ``needed_by`` and the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != module.split(".")[0]:
            raise  # the library is there, something it imports is not: a broken install keeps its traceback
        raise MissingToolError("", module, needed_by) from None


@contextmanager
def optional_imports():
    """An optional library found missing anywhere in the block (``import torch`` deep in a stage) leaves it as the
    one-line MissingToolError (exit 2) instead of a ModuleNotFoundError traceback."""
    try:
        yield
    except ModuleNotFoundError as e:
        missing = MissingToolError.optional(e)
        if missing is None:
            raise
        raise missing from None
