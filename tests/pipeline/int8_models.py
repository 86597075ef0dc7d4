"""Tiny data helpers for the INT8 tests (issue 28): samples made here, no download."""
from __future__ import annotations

import numpy as np


def sample_set(rng, n: int, shape: tuple, name: str = "x"):
    """``n`` normal samples of one float input ``name`` of shape ``[1, *shape]``, as the pipeline's SampleSet."""
    from edgebuild.calibration.dataset import SampleSet

    return SampleSet("samples", {name: rng.normal(0, 1, (n, *shape)).astype(np.float32)}, shapes={name: (1, *shape)})
