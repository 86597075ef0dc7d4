"""Train the built-in demo model on the digits train split, deterministically.

    .venv/bin/python scripts/train_demo_model.py      # writes pipeline/assets/demo_cnn.safetensors

The held-out digits test split (the demo's evaluation data) is never seen in training.
"""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from edgebuild.calibration.sources import digits
from edgebuild.pipeline.demo_model import WEIGHTS, DigitsCNN

SEED, EPOCHS, BATCH, LR = 0, 40, 32, 2e-3


def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean() * 100)


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    train, test = digits("train"), digits("test")
    x, y = torch.from_numpy(train.inputs["input"]), torch.from_numpy(train.labels)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(BATCH):
            xb = x[idx]
            # small random shifts: the 8x8 digits are tiny, this is the augmentation that helps
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}  test accuracy {evaluate(model, test.inputs['input'], test.labels):.2f} %")
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
    print(f"wrote {WEIGHTS} ({WEIGHTS.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
