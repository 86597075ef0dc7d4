"""A signal is never a SIGSEGV: OpenVINO's CPU plugin leaves a thread's alternate signal stack pointing at unmapped
memory when two compiled models go in the order they were made, and every Python handler runs on that stack
(SA_ONSTACK), so the next SIGTERM or Ctrl-C killed the process with SIGSEGV before any handler ran (why
tests/reliability/test_trust_paths.py's signal-during-the-swap case crashed pytest after tests/targets had run
OpenVINO in its process). ``edgebuild.procs.safe_signal_stack`` disables such a stack; the swap's held signals, the
CLI's handlers and the OpenVINO runner's ``close`` call it. Each case runs in a fresh process (it poisons its own)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("openvino")

POISON = """
    import gc, os, signal, sys
    import numpy as np
    import openvino as ov

    def model():
        p = ov.opset13.parameter([1, 4], np.float32, name="x")
        return ov.Model([ov.opset13.relu(p)], [p])

    def poison():  # two compiled models released in the order they were made
        c1 = ov.Core(); k1 = c1.compile_model(model(), "CPU")
        c2 = ov.Core(); k2 = c2.compile_model(model(), "CPU")
        del k1, c1; gc.collect(); del k2, c2; gc.collect()
"""


def _run(body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(POISON) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_a_dangling_alternate_stack_is_disabled_and_the_signal_reaches_its_handler():
    r = _run("""
        from edgebuild.procs import safe_signal_stack
        assert not safe_signal_stack()  # nothing to repair yet
        poison()
        print("repaired", safe_signal_stack())
        signal.signal(signal.SIGTERM, lambda s, f: print("handled", s))
        os.kill(os.getpid(), signal.SIGTERM)
        print("survived")
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-1500:])
    assert r.stdout.split() == ["repaired", "True", "handled", "15", "survived"]


def test_a_signal_during_the_output_swap_is_held_after_openvino_ran_in_the_process():
    r = _run("""
        from edgebuild.pipeline.output import _signals_held
        poison()
        with _signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
        print("held and survived")
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-1500:])
    assert "held and survived" in r.stdout and "arrived while the output was being swapped in" in r.stderr


def test_the_openvino_runner_leaves_no_dangling_stack(tmp_path):
    r = _run(f"""
        from pathlib import Path
        from edgebuild.procs import safe_signal_stack
        from edgebuild.targets.openvino import OpenVinoRunner
        ov.save_model(model(), {str(tmp_path / "m.xml")!r})
        runners = [OpenVinoRunner(Path({str(tmp_path / "m.xml")!r}), "fp32", 1) for _ in range(2)]
        for r in runners:  # closed in the order they were made
            r.close()
        print("left to repair", safe_signal_stack())
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-1500:])
    assert r.stdout.split() == ["left", "to", "repair", "False"]
