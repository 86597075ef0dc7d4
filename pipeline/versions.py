"""Versions of the toolchain, read from package metadata (imports nothing heavy)."""
from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata

# what the pipeline itself runs (export, the reference); each backend declares its own (BackendInfo.versions)
CORE_TOOLS = ("edgebuild", "torch", "onnx", "onnxruntime", "onnxslim", "numpy")


def all_tools() -> tuple[str, ...]:
    """The pipeline's tools and every registered backend's (the manifest's ``tools`` record)."""
    from edgebuild.targets.base import all_infos

    return tuple(dict.fromkeys([*CORE_TOOLS, *(n for info in all_infos() for n in info.versions)]))


def tool_versions(names=None) -> dict[str, str | None]:
    return dict(_versions(tuple(all_tools() if names is None else names)))


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
