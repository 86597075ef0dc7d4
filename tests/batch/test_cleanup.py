"""A batch's SIGTERM that lands just after a cell's output swapped in, while its build removes its scratch beside
the output (found by test_batch_ray's SIGTERM test: a `.onnx-cpu.tmp-*` folder was left in a finished cell)."""
from __future__ import annotations

import shutil

import pytest

from edgebuild.pipeline import output as build_module


def test_workdirs_are_removed_to_the_end_and_the_interrupt_raised_after(tmp_path, monkeypatch):
    dirs = [tmp_path / ".out.staging-1-x", tmp_path / ".out.tmp-1-y"]
    for d in dirs:
        (d / "inner").mkdir(parents=True)
        (d / "inner" / "f").write_bytes(b"x" * 100)
    real, calls = shutil.rmtree, []

    def interrupted_once(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt  # SIGTERM -> terminate_as_interrupt, in the middle of the first removal
        return real(path, *args, **kwargs)

    monkeypatch.setattr(build_module.shutil, "rmtree", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        build_module.remove_workdirs(*dirs)
    assert not any(d.exists() for d in dirs) and len(calls) == 3
