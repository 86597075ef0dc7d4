"""The bookkeeping of one target's accuracy search (``pipeline/stages/search.py``): its tries, bounded in count and
time, each converted and judged on the selection part and recorded in the ``SearchRecord``.

:class:`Search` is what the search's parts share: the search order (search.py), mixed precision
(mixed_precision.py) and the float island of a failed first conversion (islands.py) all make their tries through
``Search.attempt``.
"""
from __future__ import annotations

import time

from edgebuild.pipeline.errors import EdgeBuildError
from edgebuild.pipeline.results import SearchTry
from edgebuild.specs import Precision
from edgebuild.targets.settings import Settings
from edgebuild.pipeline.stages.candidate import Attempt, evaluate
from edgebuild.pipeline.stages.convert import convert
from edgebuild.targets.base import Backend
from edgebuild.targets.profiles import TargetProfile


class Search:
    """The tries of one target's search, bounded in count and time (one try is kept for the float fallback)."""

    ranking: dict[str, float] | None = None  # what mixed precision ranks layers by (mixed_precision.py), once asked
    mixed_done = False  # mixed precision was tried (after a near miss, or in its turn): not twice

    def __init__(self, ctx, backend, profile, budget, select, record, reserve: int):
        self.ctx, self.backend, self.profile, self.budget, self.select, self.record = ctx, backend, profile, budget, select, record
        self.tries: list[Attempt] = []
        self.started = time.monotonic()
        self.deadline = min(self.started + ctx.job.spec.auto_max_seconds, ctx.work.deadline)
        self.reserve = reserve
        self.durations: list[float] = []  # seconds each try took (conversion + evaluation)
        self.sensitivity = None  # the per-layer ranking (stages/sensitivity.py), once this search asked for it

    def timed_out(self, what: str) -> None:
        """Record a decision the clock made (the only way the search's result depends on wall time; a search that
        records none is a function of its inputs): ``auto_max_seconds``/``build_max_seconds`` are inputs (spec)."""
        if self.record.time_limit is None:
            self.record.time_limit = []
        if what not in self.record.time_limit:
            self.record.time_limit.append(what)

    def room(self, fallback: bool = False) -> bool:
        """Whether another try may start: within the count, and (judged by the slowest try so far) able to end
        before the search's limit. A float fallback has its try reserved and may pass the search's own limit,
        never the whole build's (``build_max_seconds``)."""
        now = time.monotonic()
        expected = max(self.durations, default=0.0)
        if fallback:
            fits = now + expected < self.ctx.work.deadline
            if not fits:
                self.timed_out("a float fallback try did not fit before build_max_seconds")
            return fits
        if len(self.record.tries) >= self.ctx.job.spec.auto_max_tries - self.reserve:
            return False
        if now + expected >= self.deadline:
            self.timed_out("a try did not fit before the search's time limit")
            return False
        return True

    def short_of_time(self, tries: int) -> bool:
        """Fewer than ``tries`` more tries (as long as the slowest so far) fit before the search's limit."""
        short = bool(self.durations) and time.monotonic() + tries * max(self.durations) > self.deadline
        if short:
            self.timed_out(f"fewer than {tries} more tries fit before the search's time limit")
        return short

    def on_best(self, label: str, settings: Settings | None) -> tuple[str, Settings | None]:
        """A candidate that refines another (AdaRound: learned weight rounding) is built on the INT8 variant that came
        closest so far, when the backend says it applies there (``on_best_variant``): on ocr-cls, AdaRound on the
        profile's min-max calibration left 13 of 500 samples changed, on entropy calibration 9. When the equalized
        graph came closest, every later variant is tried on it."""
        if not isinstance(settings, Settings):
            return label, settings
        best = self.closest_variant()
        if best is None:
            return label, settings  # the profile's own settings came closest: the candidate as it is
        closest = self.asked[best.label]
        refine = getattr(self.backend, "on_best_variant", None)
        refined = refine(settings, closest) if refine is not None else None
        if refined is not None:
            return f"{label}, on {best.label}", refined
        if getattr(closest, "equalize", False) and getattr(settings, "equalize", True) is False:
            # the equalized graph came closest (exact in float, it only evens out ranges): the next variants are
            # tried on it (PicoDet's layout detector: "weighted layers only" on the raw graph f1 14, equalized 75)
            return f"{label}, on the equalized graph", settings.replace(equalize=True)
        return label, settings

    def closest_variant(self) -> Attempt | None:
        """The INT8 try of a backend variant (its own Settings, no float layers) that came closest to the budget, when
        it came closer than every try of the profile's own settings; else None."""
        asked = getattr(self, "asked", {})
        tried = [t for t in self.tries if t.artifact.precision == Precision.INT8]
        best = min((t for t in tried if isinstance(asked.get(t.label), Settings) and not asked[t.label].float_layers),
                   key=lambda t: t.loss, default=None)
        if best is None or any(t.loss <= best.loss for t in tried if t.label not in asked):
            return None
        return best

    def attempt(self, label: str, precision: Precision, settings: Settings | None, fallback: bool = False) -> Attempt | None:
        if not self.room(fallback):
            return None
        label, settings = self.on_best(label, settings)
        extra = getattr(self.backend, "extra_seconds", None)  # a candidate costlier than a plain try (AdaRound)
        model = getattr(self.ctx.job, "model", None)
        extra = extra(settings, model.onnx_path) if extra is not None and settings is not None and model else 0.0
        if extra and time.monotonic() + max(self.durations, default=0.0) + extra >= self.deadline:
            self.timed_out(f"skipped: {label} (about {extra:.0f} s more than a plain try) did not fit before the "
                           "search's time limit")
            return None
        ctx, profile = self.ctx, self.profile
        directory = ctx.work.scratch / profile.name / f"try{len(self.record.tries)}"
        share_calibration(ctx, self.backend, profile)
        n = len(self.record.tries) + 1
        t0 = time.monotonic()
        left = self.deadline - t0
        with ctx.work.stage(f"{profile.name}: accuracy search {n}/{ctx.job.spec.auto_max_tries} — {label}"
                       + (f" ({left:.0f} s left)" if left < float("inf") else "")):
            try:
                made = convert(ctx, self.backend, profile, precision, directory, settings)
                a = evaluate(ctx, self.backend, profile, made.artifact, self.budget, timed=False, data=self.select,
                             restored=made.restored)
            except EdgeBuildError as e:  # a candidate that cannot be built is a failed try, not a failed build
                self.record.tries.append(failed_try(label, precision, e))
                return None
            finally:
                self.durations.append(plain_seconds(time.monotonic() - t0, extra))
        a.label = label
        self.tries.append(a)
        self.record.tries.append(SearchTry.from_dict(a.summary() | {"data": "evaluation[select]"}))
        if not hasattr(self, "asked"):
            self.asked = {}
        self.asked[label] = settings  # what this try asked for: mixed precision builds on the best INT8 variant
        return a


def plain_seconds(took: float, extra: float) -> float:
    """What a try that took ``took`` seconds says about the length of a plain try: a candidate costlier by about
    ``extra`` seconds (AdaRound: up to 120 s of learned rounding) counts without them. Counted whole, PP-OCRv4's
    detector's AdaRound try (123 s) made every later plain try (7 s) look too long for the 150 s search."""
    return max(took - extra, 0.0) if extra else took


def share_calibration(ctx, backend: Backend, profile: TargetProfile) -> None:
    """The tries of one search share calibration statistics where the backend can reuse them (ONNX: a graph's
    activation ranges, for every float-layer set): a mixed-precision or island try then costs a quantization pass, not
    a calibration (PP-OCRv4's detector on onnx-cpu: 11 s instead of 49 s). The folder is this build's own."""
    backend.calibration_store = ctx.work.scratch / profile.name / "calibration"


def failed_try(label: str, precision: Precision, error: BaseException) -> SearchTry:
    """A configuration that could not be converted: a failed try, with its error."""
    return SearchTry.from_dict({"label": label, "precision": precision, "error": str(error), "failures": [str(error)],
                                "size_bytes": 0})
