"""The one error family of edgebuild (a leaf module: it imports nothing of edgebuild).

Every error a user can cause or a build can meet is an ``EdgeBuildError``; the CLI catches it once,
prints its message as one line and exits with its ``exit_code``. Anything else is a bug and keeps its
traceback. ``calibration/``, ``targets/`` and ``pipeline/`` all import it from here.
"""
from __future__ import annotations


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


class MissingToolError(ConversionError):
    """A backend's library is not installed: says which and how to install it."""

    EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "openvino": "openvino", "nncf": "openvino",
              "tensorflow": "tflite", "tf_keras": "tflite", "onnx2tf": "tflite", "onnx_graphsurgeon": "tflite",
              "ai_edge_litert": "tflite", "tflite_micro": "tflite",
              "torch": "torch"}  # import name -> the pyproject extra that installs it

    def __init__(self, target: str, package: str):
        extra = self.EXTRAS.get(package, "all")
        super().__init__(
            f"target {target} needs {package}; install it with `pip install 'edgebuild[{extra}]'`, or the whole "
            f"tested toolchain with `bash scripts/bootstrap.sh` (or `pip install -r requirements.lock`)"
        )
