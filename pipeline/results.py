"""Typed results: what a build measured and decided, as frozen dataclasses that round-trip exactly to the JSON
edgebuild writes (``to_dict()`` / ``from_dict()``).

- ``Metrics``: one artifact measured on the evaluation set, an ``OutputMetrics`` per model output, ``TaskScores``;
- ``Check``: one budget applied to one number; a ``Failure`` is a check that does not hold (the same type);
- ``decide``: the one place a ``Verdict`` (pass / fail / error with its failures) is decided, for one target from
  its failures or its conversion error, for a build from its targets' verdicts and its own failures;
- ``TargetResult``: one target (its manifest.json entry, its validation.json); ``Manifest``: manifest.json.

JSON keys and values are those edgebuild has always written: unknown keys are kept (``extra``), keys keep the
order they were read in, an absent key stays absent and a null one stays null."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from edgebuild.targets.profiles import Budget

class Status(str, Enum):
    """A verdict's status. A ``str`` enum: equal to its value and written as it in JSON ("pass", "fail", "error")."""

    PASS = "pass"  # every budget holds
    FAIL = "fail"  # a budget failed; the artifact is kept
    ERROR = "error"  # nothing was built

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__


MANIFEST_FORMAT = 1  # manifest.json's format version; a change that breaks a reader makes it 2 (and a new schema)
EXIT_CODES = {Status.PASS: 0, Status.FAIL: 1, Status.ERROR: 3}  # the build's exit code for its verdict (README "Exit codes")


def _ordered(d: dict, keys: tuple[str, ...]) -> dict:
    """``d`` with the keys of ``keys`` first, in that order (the order they were read in)."""
    out = {k: d[k] for k in keys if k in d}
    out.update((k, v) for k, v in d.items() if k not in out)
    return out


def _dump(value):
    """A record (or a Budget) as JSON; anything else as it is."""
    return value.to_dict() if isinstance(value, _Record) or type(value).__name__ == "Budget" else value


class _Record:
    """A JSON object as a dataclass: each field is a key (None: absent, unless it was read as null or is written
    ``always``); ``extra`` keeps keys this version does not know, ``keys`` the order they were read in."""

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("extra", "keys")]

    @classmethod
    def _read(cls, d: dict, **typed):
        names = set(cls._names())
        kw = {k: v for k, v in d.items() if k in names}
        return cls(**{**kw, **typed}, extra={k: v for k, v in d.items() if k not in names}, keys=tuple(d))

    def _write(self, names: list[str] | None = None, always: tuple[str, ...] = (), **typed) -> dict:
        d = {}
        for name in names if names is not None else self._names():
            v = typed[name] if name in typed else getattr(self, name, None)
            if v is not None or name in self.keys or name in always:
                d[name] = v
        d.update(self.extra)
        return _ordered(d, self.keys)

    def to_dict(self) -> dict:
        return self._write()

    @classmethod
    def from_dict(cls, d: dict):
        return cls._read(d)


# ---- metrics ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputMetrics(_Record):
    """One model output, judged by what it is (``kind``: class_scores | vector | tensor | scalar)."""

    kind: str | None = None
    cosine: float | None = None  # the judged cosine (worst sample or channel group; class scores: the mean)
    cosine_mean: float | None = None
    max_abs_error: float | None = None
    sqnr_db: float | None = None
    sqnr_min_db: float | None = None
    finite: bool | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None  # only on the output the labels score
    accuracy_reference: float | None = None
    accuracy_drop: float | None = None
    top5_accuracy: float | None = None
    groups: list | None = None  # channel groups: {axis, slices, count, cosine, sqnr_db, judged, ...}
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    def get(self, name: str):
        """A measure by name (a typed one or one of ``extra``, e.g. ``decision_agreement``), else None."""
        return getattr(self, name) if name in self._names() else self.extra.get(name)

    def worst_group(self) -> dict | None:
        judged = [g for g in self.groups or () if g.get("judged")]
        return min(judged, key=lambda g: g["cosine"], default=None)


@dataclass(frozen=True)
class TaskScores(_Record):
    """A task evaluator's (or a user's evaluator's) scores of the FP32 reference and of the artifact."""

    name: str | None = None
    reference: dict | None = None
    artifact: dict | None = None
    evaluator_scores: list | None = None  # a user evaluator's score names, its first one is the headline
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    def first(self) -> tuple[str, float] | None:
        """The score a person reads first: the user evaluator's first, else the task's first."""
        names = self.evaluator_scores or list(self.artifact or {})
        return (names[0], self.artifact[names[0]]) if names else None


@dataclass(frozen=True)
class Metrics(_Record):
    """One artifact on the evaluation set: per-output metrics and their summary (``pipeline/stages/validate.py compare``)."""

    samples: int | None = None
    finite: bool | None = None
    outputs: dict[str, OutputMetrics] | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None
    max_abs_error: float | None = None
    classifier: bool | None = None
    top1_agreement: float | None = None  # of the labelled (else first) class-score output
    accuracy: float | None = None
    accuracy_reference: float | None = None
    accuracy_drop: float | None = None
    task: TaskScores | None = None
    warnings: list | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    def get(self, name: str):
        """A summary measure by name (a typed one or one of ``extra``), else None: budgets name measures by string."""
        return getattr(self, name) if name in self._names() else self.extra.get(name)

    def headline(self) -> tuple[str, float]:
        """The number a person reads first: accuracy drop, top-1 disagreement, a task score, or the worst cosine."""
        if self.accuracy_drop is not None:
            return "accuracy_drop", self.accuracy_drop
        if self.top1_agreement is not None:
            return "top1_disagreement", 100.0 - self.top1_agreement
        first = self.task.first() if self.task else None
        return first if first else ("cosine_min", self.cosine_min)

    def to_dict(self) -> dict:
        outputs = None if self.outputs is None else {n: o.to_dict() for n, o in self.outputs.items()}
        return self._write(outputs=outputs, task=_dump(self.task))

    @classmethod
    def from_dict(cls, d: dict) -> "Metrics":
        outputs = d.get("outputs")
        outputs = None if outputs is None else {n: OutputMetrics.from_dict(o) for n, o in outputs.items()}
        task = TaskScores.from_dict(d["task"]) if isinstance(d.get("task"), dict) else d.get("task")
        return cls._read(d, outputs=outputs, task=task)


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


# ---- a target's records -----------------------------------------------------------------------------------
SIBLING_CONVERSION = "converted in the same conversion run as the {} artifact"  # a person's line; never parsed


@dataclass(frozen=True)
class CacheUse(_Record):
    """Which of a target's stages came from the stage cache (``cache`` of a target's record). ``search``: absent when
    the target did not search; the baseline keys: absent for an FP32 target (no baseline). ``baseline_conversion``
    is true (restored), false, or for a baseline made in the same run as the target's own artifact a line saying so;
    ``baseline_validation`` is true, false or "the reference" (the FP32 reference itself, not evaluated again)."""

    search: bool | None = None
    conversion: bool | None = None
    validation: bool | None = None
    baseline_conversion: bool | str | None = None
    baseline_validation: bool | str | None = None
    latency: bool | None = None
    memory: dict | None = None  # {"memory": bool, "micro": bool (micro profiles)}
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    def with_baseline(self, restored: bool, sibling_of: str | None, reference: bool, cached: bool) -> "CacheUse":
        """The FP32 baseline's conversion (restored, or made in the same run as ``sibling_of``) and validation."""
        conversion = True if restored else SIBLING_CONVERSION.format(sibling_of) if sibling_of else False
        return replace(self, baseline_conversion=conversion, baseline_validation="the reference" if reference else cached)


@dataclass(frozen=True)
class ObjectiveDecision(_Record):
    """Which candidate a target ships for its objective, and why (``pipeline/stages/objective.py``): ``candidates``
    ({role, artifact, precision, size_bytes, latency_p50_ms, quality_loss, within_accuracy_budget}) when there was a
    choice; ``overruled`` when the default objective shipped the FP32 baseline; ``advice``: the profile's typical
    device limits the shipped artifact exceeds."""

    objective: str | None = None
    candidates: list | None = None
    warnings: list | None = None
    shipped: str | None = None
    why: str | None = None
    overruled: bool | None = None
    advice: list | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    @property
    def applied(self) -> bool:
        """Another objective than the default decided, or the default overruled the profile's precision."""
        return (self.objective or "precision") != "precision" or bool(self.overruled)


@dataclass(frozen=True)
class SearchTry(_Record):
    """One configuration the accuracy search tried: its label, precision and settings, its headline number (a key
    named after it: ``accuracy_drop``, ``cosine_min``, ...), quality loss, size, latency and failures, the data it
    was judged on; or the ``error`` it failed to convert with."""

    label: str | None = None
    precision: str | None = None
    settings: dict | None = None
    error: str | None = None
    quality_loss: float | None = None
    size_bytes: int | None = None
    latency_p50_ms: float | None = None
    failures: list | None = None
    data: str | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass
class SearchRecord(_Record):
    """A target's accuracy search (``pipeline/stages/search.py``): every try, the one chosen and why. Written while
    the search runs (attributes set in the order things happen, and written in that order)."""

    enabled: bool | None = None
    chosen: str | None = None
    tries: list[SearchTry] | None = None
    result: str | None = None  # why the search ended where it did (no search, nothing met the budget, ...)
    selection: str | None = None  # how the evaluation split was divided into selection and held-out parts
    selection_margin: str | None = None
    collapsed: str | None = None
    error_island: dict | str | None = None  # the nodes a conversion error named, kept in float
    float_first: str | None = None
    collapse_spread: str | None = None
    sensitivity: dict | None = None  # {method, seconds, layers: {name: loss}}
    float_layers_forbidden: str | None = None
    mixed_skipped: str | None = None
    float_share_skipped: dict | None = None
    float_share_limit: str | None = None
    float_layers_no_effect: list | None = None
    float_layers: dict | None = None  # the layers kept in float: {name: sensitivity}
    float_weight_share: float | None = None
    held_out_miss: str | None = None
    fp16_safety: str | None = None  # an FP16 candidate kept as the fallback while INT8 is tried further
    float_layers_proxy: dict | None = None  # the fake-quant proxy's first step of mixed precision
    mixed_from: str | None = None  # the INT8 variant mixed precision builds on (the one closest to the budget)
    time_limit: list | None = None  # every decision the clock made (a search without one is a function of its inputs)
    seconds: float | None = None
    from_cache: bool | None = None  # a warm re-run: this record and the choice came from the stage cache
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name not in ("extra", "keys") and name not in self.keys:  # written in the order it was set
            super().__setattr__("keys", (*self.keys, name))

    def to_dict(self) -> dict:
        return self._write(tries=None if self.tries is None else [t.to_dict() for t in self.tries])

    @classmethod
    def from_dict(cls, d: dict) -> "SearchRecord":
        tries = d.get("tries")
        return cls._read(d, tries=None if tries is None else [SearchTry.from_dict(t) for t in tries])


# ---- a target's measurements -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency(_Record):
    """An artifact's timing on the host (``pipeline/timing.py``): percentiles of every timed run, how it was timed
    (warm-up, rounds interleaved with the other artifacts of the target), the threads the runtime used and the
    profile's; ``round_p50_ms`` ({min, max, iqr}): the spread of the rounds' p50s (``edgebuild validate``)."""

    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    runs: int | None = None
    warmup: int | None = None
    rounds: int | None = None
    runs_per_round: int | None = None
    interleaved_with: list | None = None
    threads_used: int | None = None
    round_p50_ms: dict | None = None
    threads_profile: int | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Memory(_Record):
    """An artifact's runtime memory (``pipeline/memory.py``): peak and load above the runner's baseline, in MB;
    ``micro``: a microcontroller's fit (TFLM arena, flash); ``source``: where a re-validation took it from."""

    peak_mb: float | None = None
    load_mb: float | None = None
    baseline_mb: float | None = None
    runs: int | None = None
    threads: int | None = None
    method: str | None = None
    runtime: dict | str | None = None
    micro: dict | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Ratios(_Record):
    """The shipped artifact against its FP32 baseline: size, and speed (the median of the interleaved rounds' ratios,
    its spread ``{median, p25, p75, iqr, min, max, rounds}``)."""

    size_vs_fp32: float | None = None
    speedup_vs_fp32: float | None = None
    speedup_vs_fp32_spread: dict | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Baseline(_Record):
    """A target's FP32 baseline: its artifact, size, latency, metrics and memory, and what evaluated it."""

    artifact: str | None = None
    size_bytes: int | None = None
    latency: Latency | None = None
    metrics: Metrics | None = None
    evaluated: str | None = None
    memory: Memory | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict:
        return self._write(latency=_dump(self.latency), metrics=_dump(self.metrics), memory=_dump(self.memory))

    @classmethod
    def from_dict(cls, d: dict) -> "Baseline":
        return cls._read(d, **_typed(d, latency=Latency, metrics=Metrics, memory=Memory))


@dataclass(frozen=True)
class Gate(_Record):
    """What decided a target's verdict (``validate.gate``): the task metric (``decided_by`` "task metric", its
    ``metric``, the collapse ``guard`` on the other outputs) or the generic checks (``detail``)."""

    decided_by: str | None = None
    metric: str | None = None
    guard: str | None = None
    detail: str | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class WeightShare(_Record):
    """How much of an artifact really is INT8 (``pipeline/stages/weights.py``): weights stored in 8 bits or fewer,
    in float, the share, the largest float layers; or the ``error`` that kept it from being counted."""

    int8_weights: int | None = None
    float_weights: int | None = None
    int8_weight_share: float | None = None
    float_layers: list | None = None
    method: str | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class FileRecord(_Record):
    """One file of a target: its size and sha256 (``edgebuild validate`` checks them first)."""

    bytes: int | None = None
    sha256: str | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Threads(_Record):
    """The threads a target's runtime runs with: the profile's (the device's) and those used on this host."""

    profile: int | None = None
    used: int | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


def _typed(d: dict, **types) -> dict:
    """The keys of ``d`` that hold a JSON object, read as their record type (others are left as they are)."""
    return {k: t.from_dict(d[k]) for k, t in types.items() if isinstance(d.get(k), dict)}


def _budget(d):
    """A target's ``budgets`` record as THE Budget type; one that does not read back to the same JSON (a newer
    version's keys, a value out of range) is kept as it was written."""
    if not isinstance(d, dict):
        return d
    from edgebuild.targets.profiles import Budget

    try:
        b = Budget.from_dict(d)
    except Exception:  # noqa: BLE001 — not this version's budget: kept as JSON, never dropped
        return d
    return b if b.to_dict() == d and list(b.to_dict()) == list(d) else d


# ---- a target, a build ------------------------------------------------------------------------------------
_VERDICT_KEYS = ("verdict", "error", "failures", "failed_checks")


@dataclass(frozen=True)
class TargetResult(_Record):
    """One target of a build: its verdict, artifact, measurements and records (search, objective, cache)."""

    verdict: Verdict
    backend: str | None = None
    precision: str | None = None
    artifact: str | None = None  # the main file, in the target's directory
    files: dict[str, FileRecord] | None = None  # name -> its size and sha256
    settings: dict | None = None  # what the conversion applied
    metrics: Metrics | None = None
    latency: Latency | None = None
    size_bytes: int | None = None
    memory: Memory | None = None
    ratios: Ratios | None = None  # size_vs_fp32, speedup_vs_fp32 (+ its spread)
    baseline_fp32: Baseline | None = None
    notes: list | None = None
    budgets: "Budget | dict | None" = None  # THE Budget type (targets/profiles.py); a foreign one stays JSON
    host_validation: str | None = None
    threads: Threads | None = None
    cache: CacheUse | None = None
    search: SearchRecord | None = None
    objective: ObjectiveDecision | None = None
    gate: Gate | None = None  # what decided the verdict: the task metric (generic checks as collapse guard) or generic
    quantized: WeightShare | None = None  # share of the weights stored/run in INT8 (pipeline/stages/weights.py)
    profile: dict | None = None
    seconds: float | None = None
    previous: "TargetResult | None" = None  # this target's earlier build, still in its directory (failed now)
    from_earlier_build: str | None = None  # kept from the earlier build created then (not built now)
    evaluation: dict | None = None  # the evaluation data (validation.json only)
    target: str | None = None  # the target's name (a re-validation's record only)
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    MANIFEST: ClassVar[tuple[str, ...]] = (
        "verdict", "backend", "error", "precision", "artifact", "files", "settings", "metrics", "latency",
        "size_bytes", "memory", "ratios", "baseline_fp32", "failures", "failed_checks", "notes", "budgets",
        "host_validation", "threads", "cache", "search", "objective", "gate", "quantized", "profile", "seconds",
        "previous", "from_earlier_build")
    VALIDATION: ClassVar[tuple[str, ...]] = (
        "target", "verdict", "failures", "failed_checks", "metrics", "latency", "size_bytes", "memory", "budgets",
        "threads", "threads_used", "evaluation", "baseline_fp32", "ratios", "search", "objective", "gate", "quantized")

    # the fields held as typed records (JSON objects in manifest.json and validation.json)
    RECORDS: ClassVar[dict[str, type]] = {
        "metrics": Metrics, "latency": Latency, "memory": Memory, "ratios": Ratios, "baseline_fp32": Baseline,
        "cache": CacheUse, "search": SearchRecord, "objective": ObjectiveDecision, "gate": Gate, "quantized": WeightShare}

    @classmethod
    def failed(cls, backend: str, error: str) -> "TargetResult":
        """A target that could not be built (its conversion failed): verdict error."""
        return cls(decide(error=error), backend=backend)

    def to_dict(self) -> dict:
        """The target's entry in manifest.json (``ratios`` and ``baseline_fp32`` are null when there is none)."""
        previous = self.previous.to_dict() if isinstance(self.previous, TargetResult) else self.previous
        return self._write(list(self.MANIFEST), ("ratios", "baseline_fp32") if self.artifact else (),
                           **self.verdict.to_dict(), **self._records(), previous=previous, threads=_dump(self.threads))

    def to_validation(self) -> dict:
        """The target's validation.json (and, with ``target``, a re-validation's record)."""
        threads = self.threads or Threads()
        return self._write(list(self.VALIDATION), **self.verdict.to_dict(), **self._records(),
                           threads=threads.profile, threads_used=threads.used)

    def _records(self) -> dict:
        """The typed records of this target as JSON."""
        files = None if self.files is None else {n: _dump(f) for n, f in self.files.items()}
        return {name: _dump(getattr(self, name)) for name in self.RECORDS} | {"files": files, "budgets": _dump(self.budgets)}

    @classmethod
    def from_dict(cls, d: dict) -> "TargetResult":
        previous = cls.from_dict(d["previous"]) if isinstance(d.get("previous"), dict) else d.get("previous")
        threads = {"threads": Threads.from_dict(d["threads"])} if isinstance(d.get("threads"), dict) else {}
        return cls._load(d, cls.MANIFEST, previous=previous, **threads)

    @classmethod
    def from_validation(cls, d: dict) -> "TargetResult":
        threads = Threads(d.get("threads"), d.get("threads_used")) if "threads" in d else None
        return cls._load(d, cls.VALIDATION, threads=threads)

    @classmethod
    def _load(cls, d: dict, names: tuple[str, ...], **typed) -> "TargetResult":
        typed = {**_typed(d, **cls.RECORDS), **typed}
        if isinstance(d.get("files"), dict):
            typed["files"] = {n: FileRecord.from_dict(f) if isinstance(f, dict) else f for n, f in d["files"].items()}
        if "budgets" in d:
            typed["budgets"] = _budget(d["budgets"])
        kw = {k: d[k] for k in names if k in d and k not in _VERDICT_KEYS and k not in typed and k != "threads_used"}
        return cls(Verdict.from_dict(d), **{**kw, **typed},
                   extra={k: v for k, v in d.items() if k not in names}, keys=tuple(d))


@dataclass(frozen=True)
class Manifest(_Record):
    """manifest.json: the build's verdict, its model, data, judging, spec, tool versions and every target."""

    edgebuild: str | None = None
    created: str | None = None
    seconds: float | None = None
    spec: dict | None = None
    format: int | None = MANIFEST_FORMAT  # the version of manifest.json's format (pipeline/schemas/manifest.v1.schema.json)
    cwd: str | None = None
    tools: dict | None = None
    model: dict | None = None
    data: dict | None = None
    judging: dict | None = None
    targets: dict[str, TargetResult] = field(default_factory=dict)
    cache: dict | None = None
    compression: dict | None = None  # the compression stage's record (its budget, its failure)
    output: str | None = None  # set when the output was not written (every target failed; the earlier one stays)
    kept_from_earlier_build: list | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)

    ORDER: ClassVar[tuple[str, ...]] = (
        "format", "edgebuild", "created", "verdict", "exit_code", "seconds", "spec", "cwd", "tools", "model", "data", "judging",
        "targets", "cache", "compression", "output", "kept_from_earlier_build")

    @property
    def built(self) -> dict[str, TargetResult]:
        """The targets this build built (or failed to): not those kept from an earlier build."""
        return {n: t for n, t in self.targets.items() if t.from_earlier_build is None}

    @property
    def failures(self) -> tuple[Check, ...]:
        """Failures of the build as a whole, not of one target: the compression budget."""
        check = compression_check(self.compression) if self.compression and self.compression.get("failure") else None
        return (check,) if check is not None else ()

    @property
    def verdict(self) -> Verdict:
        return decide(self.failures, parts=[t.verdict for t in self.built.values()])

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    def to_dict(self) -> dict:
        targets = {n: t.to_dict() for n, t in self.targets.items()}
        return self._write(list(self.ORDER), verdict=self.verdict.status.value, exit_code=self.exit_code, targets=targets)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        names = set(cls.ORDER)
        kw = {k: v for k, v in d.items() if k in names and k not in ("verdict", "exit_code", "targets")}
        kw.setdefault("format", None)  # a manifest written before formats were numbered stays without one
        targets = {n: TargetResult.from_dict(t) for n, t in (d.get("targets") or {}).items()}
        return cls(**kw, targets=targets, extra={k: v for k, v in d.items() if k not in names}, keys=tuple(d))

    @classmethod
    def of(cls, manifest: "Manifest | dict") -> "Manifest":
        """A Manifest, or manifest.json's dict read as one."""
        return manifest if isinstance(manifest, Manifest) else cls.from_dict(manifest)
