"""Versions of the toolchain, read from package metadata (imports nothing heavy)."""
from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata

TOOLS = ("edgebuild", "torch", "onnx", "onnxruntime", "onnxslim", "openvino", "nncf", "tensorflow", "onnx2tf",
         "ai-edge-litert", "tf-keras", "onnx-graphsurgeon", "numpy", "tensorrt", "executorch", "torchao")


def tool_versions(names=TOOLS) -> dict[str, str | None]:
    return dict(_versions(tuple(names)))


@lru_cache(maxsize=None)  # read once per process: package metadata does not change under a running build
def _versions(names: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    out["machine"] = platform.machine()
    return out
