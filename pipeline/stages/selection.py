"""The accuracy search's two parts of the evaluation data: candidates are chosen on the selection part and the chosen
one is reported on the held-out part (pipeline/stages/search.py); and how long one try takes."""
from __future__ import annotations

import dataclasses

import numpy as np

from edgebuild.pipeline.stages import validate as V
from edgebuild.pipeline.stages.context import BuildContext

SELECT_FRACTION = 0.4
SMALL_EVAL, SMALL_SELECT_FRACTION = 250, 0.5  # few samples: a wider selection part


def split(ctx: BuildContext):
    n = len(ctx.job.evalset)
    perm = np.random.default_rng(ctx.job.spec.seed + 1).permutation(n)
    k = max(1, int(n * (SMALL_SELECT_FRACTION if n < SMALL_EVAL else SELECT_FRACTION)))
    sel, hold = np.sort(perm[:k]), np.sort(perm[k:])
    if getattr(ctx.job.evalset, "sequences", None) is not None:  # a stateful model's sequences stay whole (closed_loop.split)
        from edgebuild.pipeline.stages.closed_loop import split as by_sequences

        sel, hold = by_sequences(ctx.job.evalset, k, ctx.job.spec.seed + 1)
    part = lambda idx, name: (ctx.job.evalset.subset(idx, name), [ctx.job.reference[i] for i in idx])  # noqa: E731
    return part(sel, "evaluation[select]"), part(hold, "evaluation[holdout]")


def selection_budget(budget: V.Budget, n_select: int) -> tuple[V.Budget, str | None]:
    """A budget with a margin of one selection sample when one sample is coarser than the budget itself.

    Without it, a candidate that happens to get every one of 40 selection samples right (0.0 pt) is
    chosen and then misses the budget on the held-out part; with it, the search says it cannot certify
    the budget on so few samples and keeps looking for a candidate clearly inside it.
    """
    step = 100.0 / max(n_select, 1)
    drop = budget.max_accuracy_drop
    if drop is None or step <= drop:
        return budget, None
    tightened = max(0.0, drop - step)
    note = (f"one of {n_select} selection samples is {step:.2f} pt, more than the {drop} pt budget: the budget cannot be "
            f"certified on so few samples, so candidates must lose nothing ({tightened:.2f} pt) on the selection part")
    return dataclasses.replace(budget, max_accuracy_drop=tightened), note


def try_estimate(first_seconds: float, select_seconds: float, n_all: int, n_select: int) -> float:
    """How long one search try takes, from the first conversion (converted, then evaluated on all ``n_all`` samples)
    and its evaluation on the ``n_select`` selection samples (what a try evaluates): the conversion part of the first
    plus one selection evaluation. Taking the first's whole time overestimated a try by the evaluation of the other
    samples (PP-OCRv4's detector: 75 s taken as a try's length, so FP16 came first and no INT8 variant was tried)."""
    conversion = first_seconds - select_seconds * n_all / max(n_select, 1)
    return max(conversion, 0.0) + select_seconds
