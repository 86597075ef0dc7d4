"""Tiny models for the reliability cases (imported by the CLI as ``tests.reliability.models:<name>``)."""
import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def tiny():
    return Tiny()


def raising_factory():
    raise RuntimeError("factory exploded")


def not_a_module():
    return 42
