"""Latency: warm-up then timed runs at batch 1; artifacts compared with each other are timed interleaved.

Speed-ups are taken per round of an interleaved timing (``latency_interleaved`` + ``speedup``), so the load
of a shared machine hits both sides alike; the spread of the per-round ratios is reported with the median.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.targets.base import Runner

WARMUP, MAX_RUNS, TIME_BUDGET_S = 10, 300, 3.0  # one window (pipeline/device.py times a board this way)
ROUNDS, ROUND_S, MAX_ROUND_RUNS = 12, 0.2, 20  # interleaved timing: rounds; seconds and runs per artifact per round
MAX_ROUNDS = 36  # an undecided comparison (slower by the median, not beyond the noise) gets up to this many rounds
SLOWER_P = 0.05  # "slower than the baseline": a one-sided sign test over the rounds at this level overall, split
LOOKS = MAX_ROUNDS // ROUNDS  # over the looks an extended timing takes (Bonferroni), so more rounds never add false calls


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
                        round_s: float = ROUND_S, more: Callable[[dict[str, list[float]]], bool] | None = None,
                        max_rounds: int = MAX_ROUNDS) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """Time several artifacts in one process, interleaved in rounds (the order alternates), so that the load of a
    shared machine hits them alike (as scripts/benchmark_int8.py does). Returns each one's latency and its p50
    per round (speed-ups are taken per round: see ``speedup``). While ``more(p50s)`` says the rounds so far decide
    nothing, another ``rounds`` are timed, up to ``max_rounds``."""
    per_round = {}
    for name, r in runners.items():
        probe = r.time_ms(feed, WARMUP, 3, 0.0)  # warm-up, then three runs size this artifact's rounds
        per_round[name] = int(min(MAX_ROUND_RUNS, max(3, round_s * 1e3 / max(float(np.median(probe)), 1e-3))))
    samples: dict[str, list[float]] = {n: [] for n in runners}
    p50s: dict[str, list[float]] = {n: [] for n in runners}
    done, wanted = 0, rounds
    while done < wanted:
        for name in (list(runners) if done % 2 == 0 else list(reversed(runners))):
            t = runners[name].time_ms(feed, 0, per_round[name], 0.0)
            samples[name] += t
            p50s[name].append(float(np.median(t)))
        done += 1
        if done == wanted and more is not None and wanted + rounds <= max_rounds and more(p50s):
            wanted += rounds
    rounds = done
    out = {}
    for name, r in runners.items():
        out[name] = {**_percentiles(samples[name]), "warmup": WARMUP, "rounds": rounds,
                     "runs_per_round": per_round[name], "interleaved_with": [n for n in runners if n != name],
                     "threads_used": r.threads_used()}
    return out, p50s


def speedup(base_p50s: list[float], p50s: list[float]) -> dict:
    """Speed-up over the baseline with its spread: the median of the per-round ratios, their quartiles and IQR, and
    the sign test of "slower": ``p_slower`` is the chance of so few rounds at or above 1x if the artifact were as
    fast as the baseline (each round a fair coin)."""
    ratios = np.asarray(base_p50s) / np.maximum(np.asarray(p50s), 1e-9)
    q1, med, q3 = (float(np.percentile(ratios, q)) for q in (25, 50, 75))
    n, k = int(len(ratios)), int((ratios >= 1.0).sum())
    return {"median": round(med, 4), "p25": round(q1, 4), "p75": round(q3, 4), "iqr": round(q3 - q1, 4),
            "min": round(float(ratios.min()), 4), "max": round(float(ratios.max()), 4), "rounds": n,
            "rounds_not_slower": k, "p_slower": round(sign_test(k, n), 6)}


def sign_test(k: int, n: int) -> float:
    """P(at most k of n fair coin flips come up heads): the one-sided sign test's p-value."""
    return float(sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def slower(s: dict | None) -> bool:
    """Slower than the baseline beyond the timing's noise: the median ratio below 1 and the sign test over the rounds
    at ``SLOWER_P`` over the ``LOOKS`` an extended timing may take (records from before the test: three quarters of
    the rounds slower, p75 < 1); where the record holds a single-threaded second timing (``single_thread``), it must
    say slower too."""
    s = s or {}
    if s.get("median") is None or s["median"] >= 1.0:
        return False
    if s.get("single_thread") is not None and not slower(s["single_thread"]):
        return False  # slower at the profile's threads only: the host's load, not the artifact (per_target.py)
    if s.get("p_slower") is not None:
        return s["p_slower"] < SLOWER_P / LOOKS
    return s.get("p75", s["median"]) < 1.0


def undecided(base: str, other: str) -> Callable[[dict[str, list[float]]], bool]:
    """For ``latency_interleaved(more=...)``: the rounds so far put ``other`` below ``base`` by the median but not
    beyond the noise, so more rounds are worth timing (a systematic 5-7 % slowdown is lost in 12 loaded rounds)."""
    def more(p50s: dict[str, list[float]]) -> bool:
        s = speedup(p50s[base], p50s[other])
        return s["median"] < 1.0 and not slower(s)
    return more
