"""No process of a build touches the network: every runtime's telemetry is switched off.

Environment variables are set in the build's own process before any runtime starts, so every child (the TFLite
converter, isolated runners) inherits them. ONNX Runtime's native 1DS telemetry looks up its events host from a
background thread (seen under strace from plain ORT processes and the TFLite child): ``ORT_DISABLE_TELEMETRY``
stops it, and ``disable_telemetry_events()`` covers a process that loaded onnxruntime before edgebuild ran.
OpenVINO and NNCF telemetry is replaced by their no-op stubs (targets/openvino.py ``import_without_telemetry``);
TensorFlow sends nothing by itself; the Hugging Face hub (reachable through some converters) is kept offline.
"""
from __future__ import annotations

import os
import sys

OFFLINE_ENV = {
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


def no_telemetry() -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ[k] = v
    ort = sys.modules.get("onnxruntime")
    if ort is not None and hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
