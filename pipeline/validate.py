"""Validation: run the reference and an artifact on the same evaluation feeds, measure, judge budgets.

Running (``collect``) and comparing (``compare``) are separate, so reference outputs saved by one build
can be compared later (e.g. with outputs produced on the device).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgebuild.calibration.dataset import CalibrationSet
from edgebuild.targets.base import Runner

WARMUP, MAX_RUNS, TIME_BUDGET_S = 10, 300, 3.0
QUALITY_FAILURES = ("accuracy drop", "top-1 disagreement", "cosine similarity")  # how quality failures begin
DEFAULT_MIN_COSINE = 0.99  # for outputs that are not class scores, when the profile sets none


@dataclass(frozen=True)
class Budget:
    max_accuracy_drop: float | None
    max_latency_ms: float | None
    max_size_mb: float | None
    min_cosine: float | None


def collect(runner: Runner, evalset: CalibrationSet) -> list[list[np.ndarray]]:
    return [runner.run(feed) for feed in evalset.feeds()]


def is_classifier(outputs: list[list[np.ndarray]]) -> bool:
    first = outputs[0][0]
    return first.ndim == 2 and first.shape[0] == 1 and first.shape[1] > 1


def accuracy(outputs: list[list[np.ndarray]], labels: np.ndarray) -> float:
    pred = np.array([o[0].reshape(-1).argmax() for o in outputs])
    return float((pred == labels).mean() * 100)


def compare(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]], labels: np.ndarray | None) -> dict:
    """Accuracy (when labels exist), and fidelity of ``outputs`` to ``reference``.

    Cosine similarity is per sample for vector outputs and, for each output, over the whole evaluation set
    (so scalar outputs are judged too); ``cosine_min`` is the worst of both. Non-finite values fail it.
    """
    if len(reference) != len(outputs):
        raise ValueError(f"{len(outputs)} artifact results for {len(reference)} reference samples")
    cos, err, finite = [], 0.0, True
    n_out = len(reference[0])
    for ref, out in zip(reference, outputs):
        if len(out) != len(ref):
            raise ValueError(f"artifact has {len(out)} outputs, the reference {len(ref)}")
        for r, o in zip(ref, out):
            r, o = r.astype(np.float64).ravel(), o.astype(np.float64).ravel()
            if r.shape != o.shape:
                raise ValueError(f"artifact output has {o.size} values, reference {r.size}")
            finite = finite and bool(np.isfinite(o).all())
            err = max(err, float(np.abs(r - o).max(initial=0.0))) if finite else float("inf")
            if r.size > 1:
                cos.append(_cosine(r, o))
    whole = [_cosine(np.concatenate([s[j].astype(np.float64).ravel() for s in reference]),
                     np.concatenate([s[j].astype(np.float64).ravel() for s in outputs])) for j in range(n_out)]
    cos_min = min(cos + whole) if finite else 0.0
    m: dict = {"samples": len(outputs), "cosine_mean": float(np.mean(cos or whole)) if finite else 0.0,
               "cosine_min": float(cos_min), "max_abs_error": err, "finite": finite,
               "classifier": is_classifier(reference)}
    if m["classifier"]:
        ref_top = np.array([o[0].reshape(-1).argmax() for o in reference])
        out_top = np.array([o[0].reshape(-1).argmax() for o in outputs])
        m["top1_agreement"] = float((ref_top == out_top).mean() * 100) if finite else 0.0
        if labels is not None:
            m["accuracy_reference"] = accuracy(reference, labels)
            m["accuracy"] = accuracy(outputs, labels) if finite else 0.0
            m["accuracy_drop"] = m["accuracy_reference"] - m["accuracy"]
    return m


def _cosine(r: np.ndarray, o: np.ndarray) -> float:
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    return float(r @ o / denom) if denom else float(np.allclose(r, o))


def latency(runner: Runner, evalset: CalibrationSet) -> dict:
    times = np.array(runner.time_ms(evalset.feed(0), WARMUP, MAX_RUNS, TIME_BUDGET_S))
    return {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
            "p99_ms": float(np.percentile(times, 99)), "runs": int(len(times)), "warmup": WARMUP,
            "threads_used": runner.threads_used()}


def quality_metric(m: dict) -> tuple[str, float]:
    """The number the accuracy budget applies to: accuracy drop, or top-1 disagreement without labels."""
    if "accuracy_drop" in m:
        return "accuracy_drop", m["accuracy_drop"]
    if "top1_agreement" in m:
        return "top1_disagreement", 100.0 - m["top1_agreement"]
    return "cosine_min", m["cosine_min"]


def judge(m: dict, size_bytes: int, lat: dict | None, budget: Budget) -> list[str]:
    """Every budget the artifact misses, each as one readable line with the number and the limit."""
    failures = []
    if not m.get("finite", True):
        failures.append("cosine similarity 0: the artifact produces NaN/Inf outputs")
    name, value = quality_metric(m)
    if name == "cosine_min":
        floor = budget.min_cosine if budget.min_cosine is not None else DEFAULT_MIN_COSINE
        if value < floor:
            failures.append(f"cosine similarity {value:.4f} < min {floor}")
    elif budget.max_accuracy_drop is not None and value > budget.max_accuracy_drop + 1e-9:
        what = "accuracy drop" if name == "accuracy_drop" else "top-1 disagreement with FP32 (no labels)"
        failures.append(f"{what} {value:.2f} pt > max {budget.max_accuracy_drop} pt")
    if name != "cosine_min" and budget.min_cosine is not None and m["cosine_min"] < budget.min_cosine:
        failures.append(f"cosine similarity {m['cosine_min']:.4f} < min {budget.min_cosine}")
    if budget.max_latency_ms is not None and lat is not None and lat["p50_ms"] > budget.max_latency_ms:
        failures.append(f"latency p50 {lat['p50_ms']:.3f} ms > max {budget.max_latency_ms} ms")
    size_mb = size_bytes / 1e6
    if budget.max_size_mb is not None and size_mb > budget.max_size_mb:
        failures.append(f"size {size_mb:.3f} MB > max {budget.max_size_mb} MB")
    return failures
