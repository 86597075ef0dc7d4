"""JSON records as frozen dataclasses that round-trip exactly to the JSON edgebuild writes (``to_dict()`` /
``from_dict()``): the base (``Record``), one artifact's metrics (``Metrics``, an ``OutputMetrics`` per output,
``TaskScores``) and a target's measurements (``Latency``, ``Memory``, ``Ratios``, ``Baseline``, ``Gate``,
``WeightShare``, ``FileRecord``, ``Threads``). ``pipeline/results.py`` builds a target's and a build's records on
these (and re-exports them).

JSON keys and values are those edgebuild has always written: unknown keys are kept (``extra``), keys keep the
order they were read in, an absent key stays absent and a null one stays null."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


def _ordered(d: dict, keys: tuple[str, ...]) -> dict:
    """``d`` with the keys of ``keys`` first, in that order (the order they were read in)."""
    out = {k: d[k] for k in keys if k in d}
    out.update((k, v) for k, v in d.items() if k not in out)
    return out


def dump(value):
    """A record (or a Budget) as JSON; anything else as it is."""
    return value.to_dict() if isinstance(value, Record) or type(value).__name__ == "Budget" else value


class Record:
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
class OutputMetrics(Record):
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
class TaskScores(Record):
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
class Metrics(Record):
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
        return self._write(outputs=outputs, task=dump(self.task))

    @classmethod
    def from_dict(cls, d: dict) -> "Metrics":
        outputs = d.get("outputs")
        outputs = None if outputs is None else {n: OutputMetrics.from_dict(o) for n, o in outputs.items()}
        task = TaskScores.from_dict(d["task"]) if isinstance(d.get("task"), dict) else d.get("task")
        return cls._read(d, outputs=outputs, task=task)


# ---- a target's measurements -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency(Record):
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
class Memory(Record):
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
class Ratios(Record):
    """The shipped artifact against its FP32 baseline: size, and speed (the median of the interleaved rounds' ratios,
    its spread ``{median, p25, p75, iqr, min, max, rounds}``)."""

    size_vs_fp32: float | None = None
    speedup_vs_fp32: float | None = None
    speedup_vs_fp32_spread: dict | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Baseline(Record):
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
        return self._write(latency=dump(self.latency), metrics=dump(self.metrics), memory=dump(self.memory))

    @classmethod
    def from_dict(cls, d: dict) -> "Baseline":
        return cls._read(d, **typed_fields(d, latency=Latency, metrics=Metrics, memory=Memory))


@dataclass(frozen=True)
class Gate(Record):
    """What decided a target's verdict (``validate.gate``): the task metric (``decided_by`` "task metric", its
    ``metric``, the collapse ``guard`` on the other outputs) or the generic checks (``detail``)."""

    decided_by: str | None = None
    metric: str | None = None
    guard: str | None = None
    detail: str | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class WeightShare(Record):
    """How much of an artifact really is INT8 (``pipeline/stages/weights.py``): weights stored in 8 bits or fewer,
    in float, the share, the largest float layers; or the ``error`` that kept it from being counted."""

    int8_weights: int | None = None
    float_weights: int | None = None
    weight_only_weights: int | None = None  # stored int8 for a layer that computes in float (weight-only INT8)
    int8_weight_share: float | None = None  # the weights run by int8 layers, of all weights
    stored_int8_share: float | None = None  # the weights stored in 8 bits, weight-only ones included
    float_layers: list | None = None
    method: str | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class FileRecord(Record):
    """One file of a target: its size and sha256 (``edgebuild validate`` checks them first)."""

    bytes: int | None = None
    sha256: str | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Threads(Record):
    """The threads a target's runtime runs with: the profile's (the device's) and those used on this host."""

    profile: int | None = None
    used: int | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple = field(default=(), repr=False, compare=False)


def typed_fields(d: dict, **types) -> dict:
    """The keys of ``d`` that hold a JSON object, read as their record type (others are left as they are)."""
    return {k: t.from_dict(d[k]) for k, t in types.items() if isinstance(d.get(k), dict)}


def budget_record(d):
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
