"""Shared fixtures: no network, a private stage cache, tiny models and data built here."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """Tests run offline: any attempt to open a non-local connection fails loudly."""
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            raise OSError(f"network access attempted during tests: {address}")
        return real(self, address)

    socket.socket.connect = guarded
    yield
    socket.socket.connect = real


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_CACHE", str(tmp_path_factory.getbasetemp() / "stage-cache"))


@pytest.fixture(scope="session")
def digits_split():
    from edgebuild.calibration.sources import digits

    return digits("train"), digits("test")


@pytest.fixture(scope="session")
def demo_onnx(tmp_path_factory) -> Path:
    """The demo model exported to FP32 ONNX (opset 17), input 'input' [1, 1, 8, 8]."""
    import torch

    from edgebuild.pipeline.demo_model import load_demo

    path = tmp_path_factory.mktemp("demo") / "demo.onnx"
    torch.onnx.export(load_demo(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    return path


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory, digits_split) -> Path:
    """All digits as one .npz (x, y): a single source that the build must split itself."""
    train, test = digits_split
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=np.concatenate([train.inputs["input"], test.inputs["input"]]),
             y=np.concatenate([train.labels, test.labels]))
    return path


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # tests that use ONNX Runtime directly stay offline too
