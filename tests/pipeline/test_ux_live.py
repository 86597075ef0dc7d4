"""Parallel builds: one live line per target while they run, and every finished stage stays on screen and in the log."""
import io
import threading

from rich.console import Console

from edgebuild.pipeline.buildlog import BuildLog
from edgebuild.pipeline.progress import make_progress


def test_targets_in_threads_each_have_a_live_line_and_all_stay_in_the_trail_and_the_log(tmp_path):
    buf = io.StringIO()
    log = BuildLog(tmp_path / "build.log")
    p = make_progress(Console(file=buf, force_terminal=True, width=120, color_system=None), log=log)
    both_running, release = threading.Barrier(3), threading.Event()

    def target(name):
        with p.stage(f"{name}: converting to int8"):
            both_running.wait(timeout=30)
            release.wait(timeout=30)

    threads = [threading.Thread(target=target, args=(n,)) for n in ("arm64", "x86")]
    for t in threads:
        t.start()
    both_running.wait(timeout=30)
    running = sorted(task.description for task in p.live.tasks)
    release.set()
    for t in threads:
        t.join()
    p.close()
    log.close()
    assert running == ["arm64: converting to int8", "x86: converting to int8"]  # a line per target at once
    text = buf.getvalue()
    assert "✓ arm64: converting to int8" in text and "✓ x86: converting to int8" in text
    logged = (tmp_path / "build.log").read_text()
    assert logged.count("[stage] arm64: converting to int8") == 2  # its start and its end ("done in …")
    assert "[stage] x86: converting to int8: done in" in logged


WARNS = '''
import warnings

import torch

warnings.warn("mymod warns at import")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.lin(x.flatten(1))


def make():
    torch.manual_seed(0)
    return Net()
'''


def _in_a_terminal(args, cwd, columns=80):
    """Run the CLI on a pseudo-terminal of ``columns`` x 24; everything it showed, escape codes removed."""
    import fcntl
    import os
    import pty
    import re
    import struct
    import subprocess
    import sys
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TERM")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([sys.executable, "-c", "from edgebuild.pipeline.cli import main; raise SystemExit(main())",
                             *args], cwd=cwd, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    code = proc.wait(timeout=600)
    text = b"".join(chunks).decode("utf-8", "replace")
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", text)


@__import__("pytest").mark.slow
def test_in_a_terminal_warnings_go_to_the_log_and_the_summary_fits_80_columns(tmp_path):
    """Issue 26: the live display redirected sys.stderr onto the terminal, so Python warnings (a library's, a stage's,
    the user's module's) bypassed build.log; the summary table was unreadable at 80 columns."""
    import numpy as np
    import pytest

    pytest.importorskip("torch")
    (tmp_path / "mymod.py").write_text(WARNS)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).normal(size=(32, 1, 4, 4)).astype(np.float32))
    args = ["--model", "mymod:make", "--input-shape", "1,1,4,4", "--calib", "data.npz", "-t", "onnx-cpu",
            "--no-auto", "--no-cache", "-o", "out"]
    code, shown = _in_a_terminal(args, tmp_path)
    assert code in (0, 1), shown[-3000:]
    assert "✓" in shown and "onnx-cpu" in shown  # the live progress and the summary were there
    assert "Warning" not in shown and "warns at import" not in shown, shown
    lines = [seg for line in shown.split("\n") for seg in line.split("\r")]
    assert max(len(line.rstrip()) for line in lines) <= 80, [line for line in lines if len(line.rstrip()) > 80]
    log = (tmp_path / "out" / "build.log").read_text()
    assert "[warning] UserWarning: mymod warns at import" in log
    code, shown = _in_a_terminal([*args, "--verbose", "-o", "out2"], tmp_path)
    assert code in (0, 1) and "UserWarning: mymod warns at import" in shown  # --verbose echoes them
