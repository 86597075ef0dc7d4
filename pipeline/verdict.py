"""A verdict and what decides it: ``Check`` (one budget applied to one number; a ``Failure`` is a check that does not
hold), ``decide`` (the one place a ``Verdict`` is decided: error, fail or pass), ``Status`` and the exit code of each
(``EXIT_CODES``, README "Exit codes"). ``pipeline/results.py`` re-exports them beside the records they judge."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


class Status(str, Enum):
    """A verdict's status. A ``str`` enum: equal to its value and written as it in JSON ("pass", "fail", "error")."""

    PASS = "pass"  # every budget holds
    FAIL = "fail"  # a budget failed; the artifact is kept
    ERROR = "error"  # nothing was built

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__


EXIT_CODES = {Status.PASS: 0, Status.FAIL: 1, Status.ERROR: 3}  # the build's exit code for its verdict (README "Exit codes")


# ---- checks, failures, the verdict ------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One budget applied to one number: holds when ``value`` is within ``limit`` (``op`` max or min). ``kind``:
    quality | latency | size | memory; ``output``: the model output it judges (None: the whole artifact);
    ``what``/``unit``/``fmt`` make its one-line ``str``; ``text`` is that line as read back from JSON."""

    metric: str
    value: float
    limit: float
    op: str = "max"
    kind: str = "quality"
    what: str = field(default="", compare=False)  # how it reads (not what it is: equal checks may read apart)
    unit: str = field(default="", compare=False)
    fmt: str = field(default=".4g", compare=False)
    output: str | None = None
    text: str | None = field(default=None, compare=False)
    resolution: float = field(default=0.0, compare=False)  # the metric's own step (one sample of a percentage)

    @property
    def ok(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.limit + 1e-9 if self.op == "max" else self.value >= self.limit - 1e-9

    @property
    def excess(self) -> float:
        """How far past the limit, relative to the room the budget gives (<= 0 when it holds), on one scale: the room
        is at least the metric's own resolution, so 1-2 samples past a budget of 0 pt read as 1-2, not 3703."""
        if not math.isfinite(self.value):
            return float("inf")
        if self.op == "max":
            return (self.value - self.limit) / max(abs(self.limit), self.resolution, 1e-3)
        ceiling = 1.0 if self.limit <= 1.0 else 100.0
        return (self.limit - self.value) / max(ceiling - self.limit, self.resolution, 1e-3)

    def __str__(self) -> str:
        if self.text is not None:
            return self.text
        sign = ">" if self.op == "max" else "<"
        return f"{self.what or self.metric} {self.value:{self.fmt}}{self.unit} {sign} {self.op} {self.limit}{self.unit}"

    def to_dict(self) -> dict:
        d = {"metric": self.metric, "value": self.value, "limit": self.limit, "op": self.op, "kind": self.kind,
             "text": str(self)}
        return {**d, "output": self.output} if self.output is not None else d

    @classmethod
    def from_dict(cls, d: dict) -> "Check":
        return cls(d.get("metric", ""), d.get("value", math.nan), d.get("limit", math.nan), d.get("op", "max"),
                   d.get("kind", "quality"), output=d.get("output"), text=d.get("text"))


Failure = Check  # a Check that does not hold


def compression_check(record: dict) -> Check | None:
    """The compression stage's accuracy drop against ``max_compression_drop`` (None: nothing to judge)."""
    drop = (record.get("summary") or {}).get("accuracy_drop")
    limit = (record.get("budget") or {}).get("max_compression_drop")
    if drop is None or limit is None:
        return None
    return Check("compression_accuracy_drop", drop, limit, what="compression accuracy drop", unit=" pt", fmt=".2f",
                 text=record.get("failure"))


@dataclass(frozen=True)
class Verdict:
    """pass (every budget holds), fail (a budget failed; the artifact is kept) or error (nothing was built)."""

    status: Status
    failures: tuple[Check, ...] = ()
    error: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "status", Status(self.status))  # a status read from JSON is checked here

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS

    @property
    def quality_ok(self) -> bool:
        """No quality budget failed (latency, size and memory failures aside): what the accuracy search asks."""
        return self.status is not Status.ERROR and not any(f.kind == "quality" for f in self.failures)

    def to_dict(self) -> dict:
        """The verdict keys of a target's record: verdict, error (when there is one), failures, failed_checks."""
        d = {"verdict": self.status.value, **({"error": self.error} if self.error is not None else {}),
             "failures": [str(f) for f in self.failures]}
        return d if self.status is Status.ERROR else {**d, "failed_checks": [f.to_dict() for f in self.failures]}

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        checks = d.get("failed_checks")
        if checks is None:  # no typed record (an error, or an older build): the failure lines
            checks = [{"text": s} for s in d.get("failures") or ()]
        return decide([Check.from_dict(c) for c in checks], d.get("error"))


def decide(failures=(), error: str | None = None, parts=()) -> Verdict:
    """THE verdict: ``error`` when there is an error (or a part errs), else ``fail`` when a check failed (or a
    part fails), else ``pass``. A target's parts are none; a build's parts are its targets' verdicts, its own
    failures those of the whole build (the compression budget)."""
    failures = tuple(failures)
    statuses = {p.status for p in parts}
    if error is not None or Status.ERROR in statuses:
        return Verdict(Status.ERROR, failures, error)
    return Verdict(Status.FAIL if failures or Status.FAIL in statuses else Status.PASS, failures, error)
