"""SIGTERM is Ctrl-C: exit 130, staging and temp directories removed, the TFLite converter child killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _converter_pids(parent: int) -> list[int]:
    """The build's TFLite converter children (targets/isolated.py names them ``convert:tflite``)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == parent and (p / "comm").read_text().strip() == "convert:tflite":
                    pids.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def test_sigterm_during_a_tflite_conversion_cleans_up_and_kills_the_converter(tmp_path):
    exe = Path(sys.executable).parent / "edgebuild"
    env = {**os.environ, "EDGEBUILD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([str(exe), "--target", "arm64", "--no-auto", "-o", "out"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    children = []
    while time.time() < deadline and proc.poll() is None:
        children = _converter_pids(proc.pid)
        if children:
            break
        time.sleep(0.2)
    assert children, "the converter child never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "edgebuild: interrupted" in err
    time.sleep(0.5)
    assert not [p for p in children if Path(f"/proc/{p}").exists()], "the converter outlived the build"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [] or \
        sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.lock"]
    assert not (tmp_path / "out").exists()
