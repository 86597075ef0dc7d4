"""Cosine similarity, the one definition every comparison uses (validation, the export check, the TFLite
converter's FP32 check, benchmarks): a leaf module, so ``targets/`` uses it without importing the pipeline."""
from __future__ import annotations

import numpy as np


def cosine(r: np.ndarray, o: np.ndarray, zero_atol: float = 1e-8) -> float:
    """Cosine of two tensors taken as flat vectors, in float64. A zero vector has no direction: 1.0 when the two
    are equal within ``zero_atol`` (both zero), else 0.0."""
    r, o = np.asarray(r).astype(np.float64).ravel(), np.asarray(o).astype(np.float64).ravel()
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    return float(r @ o / denom) if denom else float(np.allclose(r, o, atol=zero_atol))


def per_sample_cosine(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``cosine`` of each sample (leading axis) of two stacked tensors."""
    r = ref.reshape(len(ref), -1).astype(np.float64)
    o = out.reshape(len(out), -1).astype(np.float64)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    same = np.all(np.isclose(r, o), axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (r * o).sum(1) / np.where(denom > 0, denom, 1.0), same)
