"""Validation: run the reference and an artifact on the same evaluation feeds, measure, judge budgets.

Running (``collect``) and comparing (``compare``) are separate (both in ``pipeline/stages/compare.py``, re-exported
here), so reference outputs saved by one build can be compared later (e.g. with outputs produced on the device).

Every output is judged on its own (``pipeline/metrics.py``), a task evaluator or a user's evaluator adds
scores of what the outputs mean (``pipeline/tasks.py``), and ``judge`` turns all of it into typed checks:
each budget is a ``Check(metric, value, limit)``; the failures are the checks that do not hold.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgebuild.pipeline import metrics as M
from edgebuild.pipeline import tasks as T
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.results import Check  # one budget applied to one number; a failure is a Check that fails
from edgebuild.pipeline.results import Metrics, OutputMetrics
from edgebuild.pipeline.stages.compare import (Judging, collect, compare, output_kind, resolve,  # noqa: F401
                                               stacked)  # (re-exported: validation's entry points)
from edgebuild.targets.profiles import Budget  # noqa: F401 (the one budget type; judged here)

DEFAULT_MIN_COSINE = 0.99  # fidelity floor of every output that is not class scores (worst sample / group)
CLASS_MIN_COSINE = 0.9  # floor of class-score outputs (mean over samples): uniform or zero scores fail it
# When a task metric decides, the per-output checks only guard against collapse: the energy-weighted mean cosine and
# the SQNR over the whole set (never the single worst sample, never a channel without energy) must reach these.
GUARD_MIN_COSINE = 0.9
GENERIC, TASK = "generic per-output checks", "task metric"


# ---- judging ----------------------------------------------------------------------------------------------
def decided_by(m: Metrics, task: str = "auto") -> str | None:
    """The task metric that gates this build (its name), or None when only the generic per-output checks can.

    A task metric exists with labels on a class-score output (accuracy), a built-in task's scores (detection,
    segmentation, embedding, sequence), a user's evaluator, or ``task: classification`` (top-1 agreement)."""
    scores = m.task
    if scores is not None and scores.evaluator_scores:
        return f"evaluator {scores.name} ({scores.evaluator_scores[0]})"
    if scores is not None and scores.name in T.DEFAULT_GATES:
        return f"task {scores.name} ({', '.join(T.DEFAULT_GATES[scores.name])})"
    labelled = [n for n, o in _outputs(m).items() if o.accuracy_drop is not None]
    if labelled:
        return f"accuracy on labels (output {labelled[0]})"
    if task == "classification" and any(o.kind == "class_scores" for o in _outputs(m).values()):
        first = next(n for n, o in _outputs(m).items() if o.kind == "class_scores")
        return f"task classification (top-1 agreement of output {first})"
    return None


def _outputs(m: Metrics) -> dict[str, OutputMetrics]:
    return m.outputs or {}


def gate(m: Metrics, budget: Budget, task: str = "auto") -> dict:
    """What decided the verdict (for the manifest and report): the task metric, or the generic per-output checks."""
    by = decided_by(m, task)
    if by is None:
        return {"decided_by": GENERIC, "detail": f"worst cosine (per sample, over the set, per channel group) and SQNR "
                                                  f"of every output >= {_floor(budget)}"}
    guard = _floor(budget) if budget.min_cosine is not None else GUARD_MIN_COSINE
    return {"decided_by": TASK, "metric": by,
            "guard": (f"collapse guard on every other output: energy-weighted mean cosine >= {guard} and SQNR over the set "
                      f">= {M.sqnr_floor_db(guard):.1f} dB, each channel group too" + (" (cosine_min as budgeted)" if budget.min_cosine is not None else ""))}


def _floor(budget: Budget) -> float:
    return budget.min_cosine if budget.min_cosine is not None else DEFAULT_MIN_COSINE


def checks(m: Metrics, size_bytes: int | None, lat: dict | None, budget: Budget, task: str = "auto",
           memory: dict | None = None) -> list[Check]:
    """Every budget that applies to these measurements, each as a Check (passing or not).

    With a task metric (``decided_by``), it gates; the other outputs are checked only against collapse (energy-
    weighted mean cosine and SQNR over the set, or the user's own ``cosine_min``), so a generic check never vetoes
    an artifact that keeps the task. Without one, every output is gated by its worst cosine and SQNR."""
    out: list[Check] = []
    if m.finite is False:
        out.append(Check("finite", 0.0, 1.0, "min", what="outputs finite (the artifact produces NaN/Inf)", fmt=".0f"))
    drop = budget.max_accuracy_drop
    by = decided_by(m, task)
    step = percent_step(m)
    for name, o in _outputs(m).items():
        label = f"output {name}: " if len(_outputs(m)) > 1 else ""
        if o.kind == "class_scores":
            floor = budget.min_cosine if budget.min_cosine is not None else CLASS_MIN_COSINE
            out.append(Check(f"{name}.cosine", o.cosine, floor, "min", what=f"{label}cosine similarity", output=name))
            if drop is not None and o.accuracy_drop is not None:
                out.append(Check(f"{name}.accuracy_drop", o.accuracy_drop, drop, what=f"{label}accuracy drop",
                                 unit=" pt", fmt=".2f", output=name, resolution=step))
            elif drop is not None and (by is None or by.endswith(f"output {name})")):
                out.append(Check(f"{name}.top1_disagreement", 100.0 - o.top1_agreement, drop, unit=" pt", fmt=".2f",
                                 what=f"{label}top-1 disagreement with FP32 (no labels)", output=name, resolution=step))
        elif by is not None and budget.min_cosine is None:
            out += _guard_checks(name, o, label)
        else:
            floor = _floor(budget)
            worst = _worst_group(o)
            where = f" (channel group {worst['slices']} on axis {worst['axis']})" if worst else ""
            out.append(Check(f"{name}.cosine", o.cosine, floor, "min", what=f"{label}cosine similarity{where}",
                             output=name))
            worst = _worst_group(o, "sqnr_db", "sqnr_min_db")
            where = f" (channel group {worst['slices']} on axis {worst['axis']})" if worst else ""
            out.append(Check(f"{name}.sqnr_min_db", o.sqnr_min_db, round(M.sqnr_floor_db(floor), 2), "min",
                             what=f"{label}SQNR{where}", unit=" dB", fmt=".1f", output=name))
    out += _score_checks(m, budget, task)
    if budget.max_latency_ms is not None and lat:
        out.append(Check("latency_p50_ms", lat["p50_ms"], budget.max_latency_ms, kind="latency", what="latency p50",
                         unit=" ms", fmt=".3f"))
    if budget.max_size_mb is not None and size_bytes is not None:
        out.append(Check("size_mb", size_bytes / 1e6, budget.max_size_mb, kind="size", what="size", unit=" MB", fmt=".3f"))
    return out + memory_checks(memory, budget)


PERCENT_ROOM = 1.0  # a percentage score's room is at least 1 pt: 7 pt of 200 samples is 7, a collapse is tens


def percent_step(m: Metrics) -> float:
    """The resolution of a percentage over the samples: one sample's worth, at least ``PERCENT_ROOM``."""
    return max(100.0 / max(int(m.samples or 1), 1), PERCENT_ROOM)


def _guard_checks(name: str, o: OutputMetrics, label: str) -> list[Check]:
    """Collapse guards of an output the task metric does not score, over the set (low-energy samples count by their
    weight, channels without energy not at all), and per channel group (scores collapsed next to box pixels)."""
    cos = next(v for v in (o.get("cosine_energy"), o.cosine_mean, o.cosine) if v is not None)
    sqnr = o.sqnr_db if o.sqnr_db is not None else o.sqnr_min_db
    where_cos = where_sqnr = ""
    for g in (g for g in o.groups or () if g["judged"]):
        if g["cosine"] < cos:
            cos, where_cos = g["cosine"], f" (channel group {g['slices']} on axis {g['axis']})"
        if g["sqnr_db"] < sqnr:
            sqnr, where_sqnr = g["sqnr_db"], f" (channel group {g['slices']} on axis {g['axis']})"
    return [Check(f"{name}.cosine_energy", cos, GUARD_MIN_COSINE, "min", output=name,
                  what=f"{label}collapse guard: energy-weighted mean cosine{where_cos}"),
            Check(f"{name}.sqnr_db", sqnr, round(M.sqnr_floor_db(GUARD_MIN_COSINE), 2), "min", unit=" dB", fmt=".1f",
                  what=f"{label}collapse guard: SQNR over the set{where_sqnr}", output=name)]


def memory_checks(memory: dict | None, budget: Budget) -> list[Check]:
    """Runtime memory (peak above the runner's baseline) and, on a microcontroller, TFLM's arena and the flash."""
    out, micro = [], (memory or {}).get("micro") or {}
    if budget.max_memory_mb is not None and memory and memory.get("peak_mb") is not None:
        out.append(Check("memory_peak_mb", memory["peak_mb"], budget.max_memory_mb, kind="memory",
                         what="runtime memory peak", unit=" MB", fmt=".2f"))
    if budget.max_arena_kb is not None and micro.get("arena_kb") is not None:
        out.append(Check("arena_kb", micro["arena_kb"], budget.max_arena_kb, kind="memory",
                         what="TFLM tensor arena", unit=" KB", fmt=".1f"))
    if budget.max_flash_kb is not None and micro.get("flash_kb") is not None:
        out.append(Check("flash_kb", micro["flash_kb"], budget.max_flash_kb, kind="memory",
                         what="model flash", unit=" KB", fmt=".1f"))
    return out


def _worst_group(o: OutputMetrics, key: str = "cosine", overall: str = "cosine") -> dict | None:
    groups = [g for g in o.groups or () if g["judged"]]
    worst = min(groups, key=lambda g: g[key], default=None)
    return worst if worst is not None and worst[key] <= o.get(overall) + 1e-12 else None


def _score_checks(m: Metrics, budget: Budget, task: str) -> list[Check]:
    """Task/evaluator defaults plus the build's ``<score>_drop|_min|_max`` budgets on any measured number."""
    scores = m.task
    wanted = dict(T.DEFAULT_GATES.get(scores.name if scores is not None and scores.name is not None else task, {}))
    if scores is not None and "mAP50" in (scores.artifact or {}) and budget.max_accuracy_drop is not None:
        wanted["mAP50_drop"] = budget.max_accuracy_drop  # ground-truth boxes: mAP@0.5 like accuracy
    if scores is not None and scores.evaluator_scores and budget.max_accuracy_drop is not None:
        wanted[f"{scores.evaluator_scores[0]}_drop"] = budget.max_accuracy_drop
    given = dict(budget.metrics)
    named = {k.rsplit("_", 1)[0] for k in given}
    wanted = {k: v for k, v in wanted.items() if k.rsplit("_", 1)[0] not in named}
    out = []
    step = percent_step(m)
    for key, limit in {**wanted, **given}.items():
        base, _, op = key.rpartition("_")
        found = _find_score(m, base)
        if not found:
            raise BadInputError(f"budget {key}: no measured score is called {base!r} (scores: {', '.join(available(m))})")
        for metric, ref_value, value in found:
            if op == "drop":
                if ref_value is None:
                    raise BadInputError(f"budget {key}: {base} has no reference value to drop from; use {base}_min")
                out.append(Check(f"{metric}_drop", ref_value - value, limit, "max", what=f"{metric} drop vs FP32", fmt=".3f",
                                 resolution=_resolution(base, ref_value, step)))
            else:
                out.append(Check(metric, value, limit, op, what=metric, fmt=".4g",
                                 resolution=_resolution(base, ref_value if ref_value is not None else value, step)))
    return out


PERCENT_SCORES = ("accuracy", "agreement", "f1", "precision", "recall", "miou", "map50", "mAP50_vs_fp32")


def _resolution(base: str, value: float | None, step: float) -> float:
    """One sample's worth of a score in percent over the samples (its own resolution), else 0."""
    metric = base.rpartition(".")[2].lower()
    percent = any(metric.endswith(p.lower()) for p in PERCENT_SCORES) and (value is None or abs(value) > 1.0)
    return step if percent else 0.0


def _find_score(m: Metrics, base: str) -> list[tuple[str, float | None, float]]:
    scores = m.task
    if scores is not None and base in (scores.artifact or {}):
        return [(base, (scores.reference or {}).get(base), scores.artifact[base])]
    out_name, _, metric = base.rpartition(".")
    found = []
    for name, o in _outputs(m).items():
        if (not out_name or out_name == name) and isinstance(o.get(metric), (int, float)):
            ref_value = o.get(f"{metric}_reference") if metric == "accuracy" else (
                1.0 if metric == "cosine" else 100.0 if metric.endswith("agreement") else None)
            found.append((f"{name}.{metric}", ref_value, float(o.get(metric))))
    value = m.get(base)
    if not found and isinstance(value, (int, float)) and not isinstance(value, bool):
        found.append((base, None, float(value)))
    return found


def available(m: Metrics) -> list[str]:
    names = list((m.task.artifact if m.task is not None else None) or {})
    for o in _outputs(m).values():
        names += [k for k, v in o.to_dict().items() if isinstance(v, float) and k not in names]
    return names


@dataclass(frozen=True)
class Assessment:
    """Every check of one candidate against its budget — quality, latency, size and memory — computed in one place
    (``assess``), for a build's candidates and for ``edgebuild validate`` alike."""

    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        """Every budget the candidate misses, each a Check whose ``str`` is one readable line with value and limit."""
        return [c for c in self.checks if not c.ok]

    @property
    def loss(self) -> float:
        """One number to rank candidates, lower is better: the worst relative excess over the quality budgets."""
        return max((c.excess for c in self.checks if c.kind == "quality"), default=0.0)


# ``validate --emulate``: the emulated runtime's outputs against the host's on the same feeds, (metric, limit, op).
# Same runtime, another ISA: float reassociation may flip a near-tie now and then, nothing more. max_abs_error_relative
# is the max abs error over the largest |host output| (per output).
HOST_AGREEMENT = (("top1_agreement", 99.5, "min"), ("cosine_min", 0.999, "min"), ("max_abs_error_relative", 0.01, "max"))


def agreement_checks(vs_host: dict | None) -> list[Check]:
    """The ``HOST_AGREEMENT`` checks of outputs produced elsewhere (emulated) against the host's own."""
    return [Check(f"emulated_vs_host_{k}", vs_host[k], limit, op, what=f"emulated vs host {k}")
            for k, limit, op in HOST_AGREEMENT if vs_host and vs_host.get(k) is not None]


def assess(m: Metrics, budget: Budget, task: str = "auto", size_bytes: int | None = None, lat: dict | None = None,
           memory: dict | None = None, vs_host: dict | None = None) -> Assessment:
    """THE checks of a candidate: its metrics and whatever else was measured of it (size, latency, runtime memory and
    a microcontroller's fit, and for outputs produced under emulation their agreement with the host's: ``vs_host``);
    a measurement not taken (None or empty) is not judged."""
    return Assessment(tuple(checks(m, size_bytes, lat or None, budget, task, memory or None) + agreement_checks(vs_host)))


def judge(m: Metrics, size_bytes: int | None, lat: dict | None, budget: Budget, task: str = "auto",
          memory: dict | None = None) -> list[Check]:
    """Every budget the artifact misses (``assess(...).failures``)."""
    return assess(m, budget, task, size_bytes, lat, memory).failures


def quality_loss(m: Metrics, budget: Budget, task: str = "auto") -> float:
    """One number to rank candidates, lower is better (``assess(...).loss``)."""
    return assess(m, budget, task).loss


def judges_accuracy_drop(m: Metrics, budget: Budget, task: str = "auto") -> bool:
    """Whether ``max_accuracy_drop`` gates these measurements (a class output's accuracy or top-1 agreement, mAP@0.5,
    an evaluator's first score): a task floor such as ``sequence_agreement_min`` or ``f1_min`` does not use it."""
    if budget.max_accuracy_drop is None:
        return False
    names = lambda b: {c.metric for c in checks(m, None, None, b, task)}  # noqa: E731
    return names(budget) != names(dataclasses.replace(budget, max_accuracy_drop=None))


def coarseness_warning(n_samples: int, budget: Budget) -> str | None:
    """One sample's worth of a percentage metric, when it is coarser than the accuracy budget."""
    step = 100.0 / max(n_samples, 1)
    if budget.max_accuracy_drop is not None and step > budget.max_accuracy_drop:
        return (f"{n_samples} evaluation samples: one sample is {step:.2f} pt, coarser than the "
                f"{budget.max_accuracy_drop} pt budget; give more evaluation data for a meaningful verdict")
    return None
