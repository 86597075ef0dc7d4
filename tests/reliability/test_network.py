"""No process of a build touches the network: a build for onnx, openvino and tflite under strace makes no
connect/DNS attempt to a non-local address (the ORT 1DS telemetry lookup was one)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LOCAL = re.compile(r'inet_addr\("127\.|inet_pton\(AF_INET6, "::1"')


@pytest.mark.skipif(shutil.which("strace") is None,
                    reason="strace is not installed (apt-get install strace); the network check needs it")
def test_a_build_for_three_backends_makes_no_network_attempt(tmp_path):
    log = tmp_path / "strace.log"
    exe = Path(sys.executable).parent / "edgebuild"
    env = {**os.environ, "EDGEBUILD_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(log), str(exe),
                        "--target", "onnx-cpu,x86,arm64", "--no-auto", "--max-accuracy-drop", "100", "-o", "out"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "ptrace" in r.stderr:
        pytest.skip(f"strace cannot trace here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    calls = [ln for ln in log.read_text().splitlines() if "AF_INET" in ln or "htons(53)" in ln]
    remote = [ln for ln in calls if not LOCAL.search(ln)]
    assert not remote, "\n".join(remote[:10])
