"""A DB-style text detector (issue 15: FPN, nearest upsampling, a transposed-conv head and a sigmoid probability
map) through the accuracy search on onnx-cpu: the build ends with exit 0 or an honest 1, never 3, and the chosen
artifact is no collapse (a real PP-OCRv4 detector ended at cosine 0.74 before). Built here, random weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgebuild.pipeline.cli import main

SAMPLES = 120


def detector_module(width: int = 16):
    import torch
    from torch import nn

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

    class DBNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = block(3, width, 2), block(width, 2 * width, 2), block(2 * width, 4 * width, 2)
            self.l1, self.l2, self.l3 = (nn.Conv2d(c, width, 1) for c in (width, 2 * width, 4 * width))
            self.head = nn.Sequential(block(3 * width, width, 1), nn.ConvTranspose2d(width, width, 2, 2),
                                      nn.ReLU(), nn.Conv2d(width, 1, 1))

        def forward(self, x):
            f1 = self.c1(x)
            f2 = self.c2(f1)
            f3 = self.c3(f2)
            up = lambda t, s: nn.functional.interpolate(t, scale_factor=s, mode="nearest")  # noqa: E731
            p3 = self.l3(f3)
            p2 = self.l2(f2) + up(p3, 2)
            p1 = self.l1(f1) + up(p2, 2)
            fused = torch.cat([p1, up(p2, 2), up(p3, 4)], 1)
            return torch.sigmoid(self.head(fused))  # probability map at the input's size

    torch.manual_seed(0)
    return DBNet().eval()


def make_detector(folder: Path, size: int = 32) -> tuple[Path, Path]:
    """Light pages with dark strokes ("text lines"), as a DB text detector sees them."""
    import torch

    path = folder / "detector.onnx"
    torch.onnx.export(detector_module(), torch.zeros(1, 3, size, size), str(path), dynamo=False, opset_version=13,
                      input_names=["x"], output_names=["prob"])
    rng = np.random.default_rng(2)
    x = rng.normal(0.8, 0.05, (SAMPLES, 3, size, size))
    for i in range(SAMPLES):
        for _ in range(int(rng.integers(1, 4))):
            r, c, w = int(rng.integers(0, size - 4)), int(rng.integers(0, size // 2)), int(rng.integers(4, size // 2))
            x[i, :, r:r + 3, c:c + w] = rng.normal(0.1, 0.05)
    data = folder / "detector.npz"
    np.savez(data, x=((x - 0.45) / 0.25).astype(np.float32))
    return path, data


@pytest.mark.slow
def test_fpn_detector_search_ends_honestly_with_a_non_collapsed_choice(tmp_path, capsys):
    model, data = make_detector(tmp_path)
    out = tmp_path / "out"
    code = main(["--model", str(model), "--calib", str(data), "--target", "onnx-cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code in (0, 1) and "Traceback" not in err, err
    t = json.loads((out / "manifest.json").read_text())["targets"]["onnx-cpu"]
    assert t["verdict"] in ("pass", "fail") and (t["verdict"] == "pass") == (code == 0)
    assert t["metrics"]["outputs"]["prob"]["cosine_mean"] > 0.95, t.get("search")
    search = t.get("search") or {"tries": [1]}
    assert len(search["tries"]) <= 12
