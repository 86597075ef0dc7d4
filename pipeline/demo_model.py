"""The built-in demo model: a small CNN for scikit-learn's 8x8 digits (imports torch; load lazily)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).parent / "assets" / "demo_cnn.safetensors"
INPUT_SHAPE = (1, 1, 8, 8)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """conv-bn-relu x3 with two max-pools, then a two-layer classifier (~226k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_block(1, 32), *_block(32, 64), nn.MaxPool2d(2), *_block(64, 128), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 2 * 2, 256), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_demo() -> nn.Module:
    """The trained demo model in eval mode (weights shipped with the package)."""
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()
