"""Typed results: what a build measured and decided, as frozen dataclasses that round-trip exactly to the JSON
edgebuild writes (``to_dict()`` / ``from_dict()``).

- ``Metrics`` and a target's measurements (``Latency``, ``Memory``, ...): ``pipeline/records.py``, re-exported here;
- ``Check``: one budget applied to one number; a ``Failure`` is a check that does not hold (the same type);
- ``decide``: the one place a ``Verdict`` (pass / fail / error with its failures) is decided, for one target from
  its failures or its conversion error, for a build from its targets' verdicts and its own failures;
- ``TargetResult``: one target (its manifest.json entry, its validation.json); ``Manifest``: manifest.json.

JSON keys and values are those edgebuild has always written: unknown keys are kept (``extra``), keys keep the
order they were read in, an absent key stays absent and a null one stays null."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

from edgebuild.pipeline.records import (  # noqa: F401 (re-exported: the records a target's result is made of)
    Baseline,
    FileRecord,
    Gate,
    Latency,
    Memory,
    Metrics,
    OutputMetrics,
    Ratios,
    Record,
    TaskScores,
    Threads,
    WeightShare,
    budget_record,
    dump,
    typed_fields,
)

from edgebuild.pipeline.verdict import (  # noqa: F401 (re-exported: the verdict and what decides it)
    EXIT_CODES,
    Check,
    Failure,
    Status,
    Verdict,
    compression_check,
    decide,
)

if TYPE_CHECKING:
    from edgebuild.targets.profiles import Budget

MANIFEST_FORMAT = 1  # manifest.json's format version; a change that breaks a reader makes it 2 (and a new schema)


# ---- a target's records -----------------------------------------------------------------------------------
SIBLING_CONVERSION = "converted in the same conversion run as the {} artifact"  # a person's line; never parsed


@dataclass(frozen=True)
class CacheUse(Record):
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
class ObjectiveDecision(Record):
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
class SearchTry(Record):
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
class SearchRecord(Record):
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


# ---- a target, a build ------------------------------------------------------------------------------------
_VERDICT_KEYS = ("verdict", "error", "failures", "failed_checks")


@dataclass(frozen=True)
class TargetResult(Record):
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
                           **self.verdict.to_dict(), **self._records(), previous=previous, threads=dump(self.threads))

    def to_validation(self) -> dict:
        """The target's validation.json (and, with ``target``, a re-validation's record)."""
        threads = self.threads or Threads()
        return self._write(list(self.VALIDATION), **self.verdict.to_dict(), **self._records(),
                           threads=threads.profile, threads_used=threads.used)

    def _records(self) -> dict:
        """The typed records of this target as JSON."""
        files = None if self.files is None else {n: dump(f) for n, f in self.files.items()}
        return {name: dump(getattr(self, name)) for name in self.RECORDS} | {"files": files, "budgets": dump(self.budgets)}

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
        typed = {**typed_fields(d, **cls.RECORDS), **typed}
        if isinstance(d.get("files"), dict):
            typed["files"] = {n: FileRecord.from_dict(f) if isinstance(f, dict) else f for n, f in d["files"].items()}
        if "budgets" in d:
            typed["budgets"] = budget_record(d["budgets"])
        kw = {k: d[k] for k in names if k in d and k not in _VERDICT_KEYS and k not in typed and k != "threads_used"}
        return cls(Verdict.from_dict(d), **{**kw, **typed},
                   extra={k: v for k, v in d.items() if k not in names}, keys=tuple(d))


@dataclass(frozen=True)
class Manifest(Record):
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
