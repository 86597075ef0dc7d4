"""The input and preprocessing specs, budget and objective checks: leaf types that ``calibration/`` and
``targets/`` use without importing the pipeline (``edgebuild.pipeline.spec`` builds the BuildSpec from them and
re-exports them). Validated in ``__post_init__``; a bad value is a ``BadInputError`` (exit 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from edgebuild.errors import BadInputError

DTYPES = ("float32", "float16", "int64", "int32", "uint8", "int8", "bool")
LAYOUTS = ("NCHW", "NHWC", "NC", "NCW", "NTC", "ANY")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # PIL's resize filters


class Precision(str, Enum):
    """What an artifact computes in. A ``str`` enum: equal (and hashing equal) to its value, printed as it,
    so profiles, JSON and comparisons with plain strings keep working."""

    INT8 = "int8"  # full-integer: weights and activations int8 (calibrated)
    FP16 = "fp16"  # FP16 weights (and arithmetic where the runtime does it)
    FP32 = "fp32"  # the source's precision
    DYNAMIC = "dynamic"  # weight-only INT8: activations stay float

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(p.value for p in cls)


PRECISIONS = Precision.values()  # ("int8", "fp16", "fp32", "dynamic")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise BadInputError(msg)


@dataclass(frozen=True)
class InputSpec:
    """One model input. For ONNX sources it is read from the graph; torch sources need it given."""

    name: str = "input"
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    layout: str = "NCHW"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        check(self.dtype in DTYPES, f"input {self.name}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.layout in LAYOUTS, f"input {self.name}: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        check(all(d > 0 for d in self.shape), f"input {self.name}: shape must be positive integers, got {list(self.shape)}")


@dataclass(frozen=True)
class PreprocessSpec:
    """How image files become input tensors (used by image-folder data sources)."""

    resize: tuple[int, int] | None = None  # (height, width)
    color: str = "rgb"  # rgb | bgr | gray
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    layout: str = "NCHW"
    dtype: str = "float32"
    crop: float | None = None  # centre crop: this fraction of the shorter side, at the output's aspect ratio, before resize
    interpolation: str = "bicubic"  # resize filter: one of INTERPOLATIONS

    def __post_init__(self):
        if self.crop is not None:
            check(isinstance(self.crop, (int, float)) and not isinstance(self.crop, bool) and 0 < self.crop <= 1,
                  f"preprocess.crop must be a fraction of the shorter side in (0, 1], e.g. 0.875, got {self.crop!r}")
            object.__setattr__(self, "crop", float(self.crop))
        check(self.interpolation in INTERPOLATIONS,
              f"preprocess.interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resize is not None:
            object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
            check(len(self.resize) == 2, "preprocess.resize must be [height, width]")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        check(self.color in ("rgb", "bgr", "gray"), f"preprocess.color must be rgb, bgr or gray, got {self.color!r}")
        check(self.layout in ("NCHW", "NHWC"), f"preprocess.layout must be NCHW or NHWC, got {self.layout!r}")
        check(all(s != 0 for s in self.std), "preprocess.std must not contain 0")


MEMORY_BUDGETS = ("max_memory_mb", "max_arena_kb", "max_flash_kb")


def check_budget(name: str, value, positive: bool = False) -> float:
    """A budget is a finite number, >= 0 (> 0 for latency and size): NaN would switch its gate off."""
    check(isinstance(value, (int, float)) and not isinstance(value, bool),
          f"{name} must be a number, got {value!r}")
    check(math.isfinite(value), f"{name} must be a finite number, got {value!r}")
    check(value > 0 if positive else value >= 0, f"{name} must be {'positive' if positive else '>= 0'}, got {value!r}")
    return float(value)


OBJECTIVES = ("precision", "latency", "size", "accuracy")  # what a target ships: pipeline/stages/objective.py


def check_objective(value, where: str) -> str:
    if value not in OBJECTIVES:
        raise BadInputError(f"{where}: objective must be one of {', '.join(OBJECTIVES)}, got {value!r}")
    return value
