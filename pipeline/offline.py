"""No process of a build touches the network: every runtime's telemetry is switched off.

A build changes nothing process-wide for it: its child processes (the TFLite converter, isolated runners) get
``OFFLINE_ENV`` in their own environment (``edgebuild.procs.Scope.child_env``; ``HF_HUB_OFFLINE`` and
``DO_NOT_TRACK`` for the Hugging Face hub some converters reach, ``ORT_DISABLE_TELEMETRY``). ONNX Runtime's native
1DS telemetry looks up its events host from a background thread (seen under strace from plain ORT processes and the
TFLite child): in the build's own process, where the FP32 reference and the ONNX targets run, it is stopped by
``runtime_telemetry_off`` — the one switch a build flips in its process, one-way and the same for every build
(telemetry off changes no result). OpenVINO and NNCF telemetry is replaced by their no-op stubs, declared as patches
applied inside every child of a build (targets/isolated.py ``NO_TELEMETRY``); TensorFlow sends nothing by itself.

The CLI (and a batch cell), which own their process, set ``OFFLINE_ENV`` in it as well (``no_telemetry``).
"""
from __future__ import annotations

import os
import sys

from edgebuild.procs import OFFLINE_ENV  # noqa: F401 (re-exported)


def runtime_telemetry_off() -> None:
    """ONNX Runtime's telemetry off in this process: read from the environment when its native library starts, and
    switched off in one already started."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    ort = sys.modules.get("onnxruntime")
    if ort is not None and hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()


def no_telemetry() -> None:
    """For a process edgebuild owns (the CLI, a batch cell): the offline environment in the process itself."""
    for k, v in OFFLINE_ENV.items():
        os.environ[k] = v
    runtime_telemetry_off()
