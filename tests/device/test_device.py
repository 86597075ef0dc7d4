"""`edgebuild validate DIR --device ssh://…` against a local sshd on the loopback that plays the board."""
from __future__ import annotations

import ast
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from edgebuild.pipeline.cli import main
from edgebuild.pipeline.device import RUNNER, Board
from edgebuild.pipeline.errors import BadInputError
from tests.device import sshd


def _target_dir(tmp_path: Path, target: str, backend: str = "tflite") -> Path:
    """Enough of a target directory for the checks made before anything is copied (they read target and backend)."""
    d = tmp_path / target
    d.mkdir()
    (d / "metadata.json").write_text(json.dumps({"target": target, "backend": backend}))
    return d


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgebuild: error: "), err
    return err[0]


def test_device_url_forms():
    b = Board.parse("ssh://pi@raspberrypi.local:2222?python=/opt/venv/bin/python&arch=any")
    assert (b.user, b.host, b.port, b.python, b.arch) == ("pi", "raspberrypi.local", 2222, "/opt/venv/bin/python", "any")
    assert Board.parse("ssh://board").name == "board" and Board.parse("ssh://board").python == "python3"
    for bad in ("pi@board", "http://board", "ssh://board:notaport", "ssh://board/dir", "ssh://board?pyhton=x",
                "ssh://-oProxyCommand=touch%20pwned@board", "ssh://-oProxyCommand=x", "ssh://pi\'x@board"):
        with pytest.raises(BadInputError):
            Board.parse(bad)


def test_unreachable_host_is_one_line_exit_4(tmp_path, capsys, monkeypatch):
    port = sshd._free_port()  # nothing listens there
    monkeypatch.setenv("EDGEBUILD_SSH_CONFIG", "/dev/null")
    assert main(["validate", str(_target_dir(tmp_path, "arm64")), "--device", f"ssh://nobody@127.0.0.1:{port}"]) == 4
    assert "is unreachable" in _one_error_line(capsys)


def test_wrong_architecture_is_one_line_exit_4(tmp_path, board, capsys):
    target = "x86" if platform.machine() == "aarch64" else "arm64"  # a target whose boards are not this machine
    assert main(["validate", str(_target_dir(tmp_path, target)), "--device", board.url(python=sys.executable)]) == 4
    line = _one_error_line(capsys)
    assert f"is a {platform.machine()} machine; target {target} runs on" in line and "?arch=any" in line


def test_missing_runtime_is_one_line_exit_4(tmp_path, board, capsys):
    bare = tmp_path / "bare"  # a Python on the board without numpy or any runtime
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    url = board.url(python=str(bare / "bin" / "python"), arch="any")
    assert main(["validate", str(_target_dir(tmp_path, "arm64")), "--device", url]) == 4
    assert "the runtime is missing" in _one_error_line(capsys)


def test_no_python_on_the_board_is_one_line_exit_4(tmp_path, board, capsys):
    url = board.url(python="/nonexistent/python3", arch="any")
    assert main(["validate", str(_target_dir(tmp_path, "arm64")), "--device", url]) == 4
    assert "no working Python" in _one_error_line(capsys)


def test_runner_is_self_contained_and_probes():
    imported = set()
    for node in ast.walk(ast.parse(RUNNER.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    edgebuild = sorted(m for m in imported if m == "edgebuild" or m.startswith("edgebuild."))
    assert not edgebuild, f"the device runner may not import edgebuild: {edgebuild}"  # its own shims (edgebuild_et) may
    probe = json.loads(subprocess.run([sys.executable, str(RUNNER), "--probe"], capture_output=True, text=True,
                                      check=True, timeout=60).stdout)
    assert probe["machine"] == platform.machine() and probe["runtimes"]["numpy"] is True


@pytest.mark.slow
@pytest.mark.parametrize("target, runtime", [("arm64", "ai_edge_litert"), ("onnx-cpu", "onnxruntime")])
def test_device_end_to_end_on_the_loopback_board(board, request, capsys, target, runtime):
    """The demo's artifact on the board (here: this machine over SSH; ?arch=any for arm64), judged against the
    saved reference: the board runs the host's runtime build here, so accuracy and agreement are the build's."""
    demo_out = request.getfixturevalue("demo_out")  # built only once the board is up (no build before a skip)
    query = {"python": sys.executable, **({"arch": "any"} if target == "arm64" else {})}
    assert main(["validate", str(demo_out / target), "--device", board.url(**query), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    built = json.loads((demo_out / target / "validation.json").read_text())
    assert result["verdict"] == "pass" and result["reference"].startswith("saved")
    assert result["device"]["machine"] == platform.machine() and result["device"]["runtime"].startswith(runtime)
    assert result["metrics"]["samples"] == built["evaluation"]["samples"]
    for key in ("accuracy", "accuracy_reference", "top1_agreement"):
        assert result["metrics"][key] == pytest.approx(built["metrics"][key], abs=1e-9), key
    lat = result["latency"]
    assert lat["runs"] >= 20 and 0 < lat["p50_ms"] <= lat["p99_ms"] and lat["measured_on"].startswith(board.user)
    recorded = json.loads((demo_out / target / "validation_device.json").read_text())  # kept beside the artifact
    assert recorded["device"] == result["device"] and recorded["verdict"] == "pass"


def test_a_tensorrt_target_is_refused_before_any_connection(tmp_path, capsys):
    d = _target_dir(tmp_path, "jetson-orin", backend="tensorrt")
    assert main(["validate", str(d), "--device", f"ssh://nobody@127.0.0.1:{sshd._free_port()}"]) == 2
    assert "runs executorch, onnx, openvino, tflite artifacts, not tensorrt" in _one_error_line(capsys)
