"""Latency: warm-up then timed runs at batch 1; artifacts compared with each other are timed interleaved.

Speed-ups are taken per round of an interleaved timing (``latency_interleaved`` + ``speedup``), so the load
of a shared machine hits both sides alike; the spread of the per-round ratios is reported with the median.
"""
from __future__ import annotations

import os

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.targets.base import Runner

WARMUP, MAX_RUNS, TIME_BUDGET_S = 10, 300, 3.0  # one window (pipeline/device.py times a board this way)
ROUNDS, ROUND_S, MAX_ROUND_RUNS = 12, 0.2, 20  # interleaved timing: rounds; seconds and runs per artifact per round


def latency(runner: Runner, evalset: SampleSet) -> dict:
    """One artifact alone (``edgebuild validate``), timed as a build times it: warm-up, then ``ROUNDS`` rounds of
    up to ``ROUND_S`` seconds (``latency_interleaved`` with one runner); the spread of the rounds' p50s is kept,
    so a loaded host shows as a wide spread rather than as one unlucky window."""
    lat, p50s = latency_interleaved({"artifact": runner}, evalset.feed(0))
    out = lat["artifact"]
    out.pop("interleaved_with", None)
    p = np.asarray(p50s["artifact"])
    out["round_p50_ms"] = {"min": float(p.min()), "max": float(p.max()),
                           "iqr": float(np.percentile(p, 75) - np.percentile(p, 25))}
    return out


def host_cores() -> int:
    """Cores this process may use: its CPU affinity, at most ``$EDGEBUILD_THREADS`` (a batch cell's ``num_cpus``:
    pipeline/batch/cell.py), so every runtime's thread count follows the cores a scheduler gave the build."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = os.environ.get("EDGEBUILD_THREADS", "")
    return max(1, min(cores, int(limit))) if limit.isdigit() and int(limit) > 0 else cores


def _percentiles(times) -> dict:
    t = np.asarray(times)
    return {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "runs": int(len(t))}


def latency_interleaved(runners: dict[str, Runner], feed: dict[str, np.ndarray], rounds: int = ROUNDS,
                        round_s: float = ROUND_S) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """Time several artifacts in one process, interleaved in rounds (the order alternates), so that the load of a
    shared machine hits them alike (as scripts/benchmark_int8.py does). Returns each one's latency and its p50
    per round (speed-ups are taken per round: see ``speedup``)."""
    per_round = {}
    for name, r in runners.items():
        probe = r.time_ms(feed, WARMUP, 3, 0.0)  # warm-up, then three runs size this artifact's rounds
        per_round[name] = int(min(MAX_ROUND_RUNS, max(3, round_s * 1e3 / max(float(np.median(probe)), 1e-3))))
    samples: dict[str, list[float]] = {n: [] for n in runners}
    p50s: dict[str, list[float]] = {n: [] for n in runners}
    for i in range(rounds):
        for name in (list(runners) if i % 2 == 0 else list(reversed(runners))):
            t = runners[name].time_ms(feed, 0, per_round[name], 0.0)
            samples[name] += t
            p50s[name].append(float(np.median(t)))
    out = {}
    for name, r in runners.items():
        out[name] = {**_percentiles(samples[name]), "warmup": WARMUP, "rounds": rounds,
                     "runs_per_round": per_round[name], "interleaved_with": [n for n in runners if n != name],
                     "threads_used": r.threads_used()}
    return out, p50s


def speedup(base_p50s: list[float], p50s: list[float]) -> dict:
    """Speed-up over the baseline with its spread: the median of the per-round ratios, their quartiles and IQR."""
    ratios = np.asarray(base_p50s) / np.maximum(np.asarray(p50s), 1e-9)
    q1, med, q3 = (float(np.percentile(ratios, q)) for q in (25, 50, 75))
    return {"median": round(med, 4), "p25": round(q1, 4), "p75": round(q3, 4), "iqr": round(q3 - q1, 4),
            "min": round(float(ratios.min()), 4), "max": round(float(ratios.max()), 4), "rounds": int(len(ratios))}
