"""One model input or output of a .tflite: its tensor, layout permutation and quantization (LiteRT's and TFLM's
runners feed and read the model through it, in the source model's layout and dtype)."""
from __future__ import annotations

import numpy as np


class Port:
    """One model input or output: its tensor, layout permutation and quantization (read from the model)."""

    def __init__(self, spec: dict, details: dict):
        self.name, self.index = spec["name"], details["index"]
        self.dtype = np.dtype(details["dtype"])
        self.perm = tuple(spec["perm"]) if spec.get("perm") else None  # inputs: source -> tflite; outputs: tflite -> source
        scale, zero_point = details["quantization"]
        self.quantized = self.dtype.kind in "iu" and scale != 0.0
        self.scale, self.zero_point = float(scale), int(zero_point)

    def to_tensor(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if self.perm:
            x = x.transpose(self.perm)
        if x.ndim == 0:  # a 0-d source input is [1] in the .tflite (onnx2tf makes scalar inputs rank 1)
            x = x.reshape(1)
        if self.quantized and x.dtype.kind == "f":
            info = np.iinfo(self.dtype)
            x = np.clip(np.round(x / self.scale) + self.zero_point, info.min, info.max)
        return np.ascontiguousarray(x, dtype=self.dtype)

    def from_tensor(self, y: np.ndarray) -> np.ndarray:
        y = (y.astype(np.float32) - self.zero_point) * np.float32(self.scale) if self.quantized else y.astype(np.float32)
        return np.ascontiguousarray(y.transpose(self.perm) if self.perm else y)
