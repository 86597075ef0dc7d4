"""The reliability harness: run the CLI in-process, check exit code, one-line message, no traceback, disk."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("edgebuild: ")]

    def check(self, code: int, message: str | None = None) -> "Outcome":
        """Exit ``code``; no traceback; exactly one ``edgebuild: ...`` line matching ``message``."""
        assert "Traceback" not in self.err + self.out, self.err[-3000:]
        assert self.code == code, f"exit {self.code}, expected {code}\n{self.err[-2000:]}"
        if code != 0:
            assert len(self.error_lines) == 1, self.err[-2000:]
            if message:
                assert re.search(message, self.error_lines[0]), self.error_lines[0]
        return self


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty current directory for the case (relative paths and the default `out` land here)."""
    d = tmp_path / "work"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


@pytest.fixture
def edgebuild(capsys):
    from edgebuild.pipeline.cli import main

    def run(*argv: str) -> Outcome:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return run


def listing(root: Path) -> set[str]:
    """Every path under ``root`` (relative), for "what is left on disk" checks."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny conv classifier as ONNX, another model (different weights), and random labelled data."""
    import torch

    d = tmp_path_factory.mktemp("assets")
    for seed, name in ((0, "tiny.onnx"), (1, "other.onnx")):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 8 * 8, 10)).eval()
        torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(d / name), dynamo=False, opset_version=17,
                          input_names=["input"])
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.random((48, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 48))
    return d


@pytest.fixture
def here(workdir, assets):
    for f in assets.iterdir():
        shutil.copy(f, workdir / f.name)
    return workdir


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())
