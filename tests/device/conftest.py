"""Fixtures of the device checks: the demo built for arm64 (once per session) and the loopback board."""
from __future__ import annotations

import pytest

from tests.device import sshd


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory):
    """The built-in demo built for arm64 (TFLite) and onnx-cpu (first INT8 configuration, no search): the output."""
    from edgebuild.pipeline.build import build
    from edgebuild.pipeline.spec import BuildSpec

    out = tmp_path_factory.mktemp("demo") / "out"
    result = build(BuildSpec.from_dict({"targets": ["arm64", "onnx-cpu"], "auto": False, "out": str(out)}))
    for name, t in result.manifest["targets"].items():
        assert t["verdict"] == "pass", (name, t)
    return out


@pytest.fixture(scope="session")
def arm64_demo(demo_out):
    return demo_out / "arm64"


@pytest.fixture(scope="session")
def _loopback(tmp_path_factory):
    why = sshd.unavailable()
    if why:
        pytest.skip(f"no loopback SSH board: {why}")
    proc, board = sshd.start(tmp_path_factory.mktemp("sshd"))
    yield board
    sshd.stop(proc)


@pytest.fixture
def board(_loopback, monkeypatch):
    """A local sshd on 127.0.0.1 playing the board; edgebuild's ssh/scp use its throwaway key via ssh -F."""
    monkeypatch.setenv("EDGEBUILD_SSH_CONFIG", str(_loopback.ssh_config))
    return _loopback
