"""BuildSpec: everything one build needs, from edgebuild.yaml and CLI flags.

Frozen dataclasses, validated in one place (``__post_init__``), round-tripping through JSON so a build
can be re-run from its manifest (``BuildSpec.from_dict(manifest["spec"])``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebuild.errors import BadInputError
from edgebuild.specs import (  # noqa: F401 (the leaf types calibration/ and targets/ use, re-exported here)
    DTYPES,
    INTERPOLATIONS,
    LAYOUTS,
    MEMORY_BUDGETS,
    OBJECTIVES,
    PRECISIONS,
    InputSpec,
    Precision,
    PreprocessSpec,
    check_budget,
    check_objective,
)
from edgebuild.specs import check as _check
from edgebuild.targets.profiles import Budget


@dataclass(frozen=True)
class Budgets(Budget):
    """The config's ``budgets:``: a ``Budget`` over each target profile's (``None`` keeps the profile's value) and
    the build's own compression budget. A score budget ``cosine_min`` is the floor ``min_cosine`` of every output."""

    max_compression_drop: float = 1.0  # FP32 accuracy the compression steps may cost, in points

    KEYS = ("max_accuracy_drop", "max_latency_ms", "max_size_mb") + MEMORY_BUDGETS + ("max_compression_drop", "metrics")

    def __post_init__(self):
        metrics = dict(self.metrics)
        if "cosine_min" in metrics:  # `cosine_min: 0.995` raises every output's floor
            object.__setattr__(self, "min_cosine", metrics.pop("cosine_min"))
            object.__setattr__(self, "metrics", metrics)
        super().__post_init__()
        object.__setattr__(self, "max_compression_drop",
                           check_budget("budgets.max_compression_drop", self.max_compression_drop))

    def for_targets(self) -> Budget:
        """The part that judges each target (``Budget.over`` a profile's)."""
        return Budget(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Budget)})

    def to_dict(self) -> dict:
        """As the config writes it (manifest.json's ``spec.budgets``): ``cosine_min`` among the score budgets."""
        metrics = {**({"cosine_min": self.min_cosine} if self.min_cosine is not None else {}), **dict(self.metrics)}
        return {k: metrics if k == "metrics" else getattr(self, k) for k in self.KEYS}


@dataclass(frozen=True)
class CompressStep:
    """One compression step before export, e.g. ``{prune: {method: structured, ratio: 0.5}}``."""

    kind: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BuildSpec:
    model: str | None = None  # None: the built-in demo model
    weights: str | None = None
    inputs: tuple[InputSpec, ...] = ()
    preprocess: PreprocessSpec = PreprocessSpec()
    calib: str | None = None
    eval: str | None = None
    calib_samples: int | None = None  # None: automatic, at most 300, fewer for a costly model (calibration/budget.py)
    eval_fraction: float = 0.5  # used when one data source must be split
    targets: tuple[str, ...] = ()
    profile_files: tuple[str, ...] = ()
    out: str = "out"
    precision: Precision | None = None
    objective: str | None = None  # precision | latency | size | accuracy: overrides every profile's objective
    budgets: Budgets = Budgets()
    compress: tuple[CompressStep, ...] = ()
    train: str | None = None
    auto: bool = True
    auto_max_tries: int = 12  # accuracy search: conversions tried per target at most
    auto_max_seconds: float = 150.0  # accuracy search: time per target at most (3 targets of a 70 MB encoder: < 10 min)
    build_max_seconds: float | None = None  # accuracy searches stop when the whole build has run this long
    seed: int = 0
    cache: bool = True  # read/write the stage cache
    cache_dir: str | None = None  # default: $EDGEBUILD_CACHE or ~/.cache/edgebuild
    task: str = "auto"  # what the outputs mean: see pipeline/tasks.py TASKS
    task_options: dict = field(default_factory=dict)  # e.g. detection: {layout: yolo, score_threshold: 0.25}
    labels_output: str | None = None  # the output the labels score (inferred when unambiguous)
    evaluator: str | None = None  # pkg.mod:fn(outputs, labels, reference) -> {score: value}, higher is better
    trust_model: bool = False  # load a .pt2 that fails the no-code-execution audit (pipeline/trust.py)
    output_names: tuple[str, ...] = ()  # torch models: names of the exported outputs (default: from forward's return)
    class_names: tuple[str, ...] = ()  # what class index i means (default: an image folder's class sub-folders)
    python_path: tuple[str, ...] = ()  # directories package.module:attr references import from (the config's own)
    # stateful models (pipeline/stages/closed_loop.py): {output: input} fed back on the next step; None: inferred from
    # the names (state/stateN, h0/hn, ...) when one pair fits; "none": every step judged with the data's own state
    state: dict | str | None = None
    sequences: str | int | dict | None = None  # stream | N (steps per sequence) | {length: N} | {ids: npz key}

    def __post_init__(self):
        for name in ("output_names", "class_names", "python_path"):
            value = getattr(self, name)
            _check(isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value),
                   f"{name} must be a list of non-empty strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        _check(len(set(self.output_names)) == len(self.output_names), "output_names must be unique")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "profile_files", tuple(self.profile_files))
        object.__setattr__(self, "compress", tuple(self.compress))
        if self.objective is not None:
            check_objective(self.objective, "config")
        _check(self.precision is None or self.precision in PRECISIONS,
               f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision is not None:
            object.__setattr__(self, "precision", Precision(self.precision))
        _check(self.calib_samples is None or (isinstance(self.calib_samples, int) and not isinstance(self.calib_samples, bool)
                                             and self.calib_samples > 0),
               f"calib_samples must be positive (a whole number of samples), got {self.calib_samples!r}")
        _check(self.build_max_seconds is None or (isinstance(self.build_max_seconds, (int, float))
                                                  and 0 < self.build_max_seconds < float("inf")),
               f"build_max_seconds must be a positive number of seconds, got {self.build_max_seconds!r}")
        _check(_whole(self.auto_max_tries) and self.auto_max_tries > 0,
               f"auto_max_tries must be a positive whole number, got {self.auto_max_tries!r}")
        _check(_number(self.auto_max_seconds) and 0 < self.auto_max_seconds < float("inf"),
               f"auto_max_seconds must be a positive number of seconds, got {self.auto_max_seconds!r}")
        _check(_whole(self.seed), f"seed must be a whole number, got {self.seed!r}")
        for flag in ("auto", "cache", "trust_model"):
            _check(isinstance(getattr(self, flag), bool), f"{flag} must be true or false, got {getattr(self, flag)!r}")
        _check(_number(self.eval_fraction) and 0.0 < self.eval_fraction < 1.0, "eval_fraction must be between 0 and 1")
        _check(len({i.name for i in self.inputs}) == len(self.inputs), "input names must be unique")
        from edgebuild.pipeline.tasks import TASKS

        _check(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        _check(isinstance(self.task_options, dict), "task_options must be a mapping")
        from edgebuild.pipeline.metrics import NEAR_TIE_RATIO

        ratio = self.task_options.get("near_tie_ratio", NEAR_TIE_RATIO)
        _check(_number(ratio) and 0 < ratio <= 1,
               f"task_options.near_tie_ratio must be in (0, 1] (1: exact agreement), got {ratio!r}")
        check_state(self.state)
        object.__setattr__(self, "sequences", check_sequences(self.sequences))
        _check(self.evaluator is None or (":" in self.evaluator and all(self.evaluator.partition(":")[::2])),
               f"evaluator must be package.module:function, got {self.evaluator!r}")

    @property
    def is_demo(self) -> bool:
        return self.model is None

    # ---- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({**dataclasses.asdict(self), "budgets": self.budgets.to_dict()}))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildSpec":
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        _check(not unknown, f"unknown build option(s): {', '.join(sorted(unknown))}")
        if "inputs" in data:
            data["inputs"] = tuple(InputSpec(**_known(InputSpec, i, "input")) for i in data["inputs"] or ())
        if "preprocess" in data:
            data["preprocess"] = PreprocessSpec(**_known(PreprocessSpec, data["preprocess"] or {}, "preprocess"))
        if "budgets" in data:
            data["budgets"] = Budgets(**_known(Budgets.KEYS, _metric_budgets(data["budgets"]), "budgets"))
        if "compress" in data:
            data["compress"] = tuple(_compress_step(s) for s in data["compress"] or ())
        try:
            return cls(**data)
        except TypeError as e:  # wrong value types from a hand-written config
            raise BadInputError(f"invalid build option: {e}") from None

    def replace(self, **changes) -> "BuildSpec":
        return dataclasses.replace(self, **changes)


STATE_OFF = "none"


def check_state(value: Any) -> None:
    """``state:`` is a mapping {output: input}, ``auto`` / null (inferred), or ``none`` (no closed loop)."""
    if value is None or value in ("auto", STATE_OFF):
        return
    _check(isinstance(value, dict) and value and all(isinstance(k, str) and k and isinstance(v, str) and v
                                                      for k, v in value.items()),
           f"state must map each state output to the input it feeds on the next step (e.g. {{stateN: state}}), "
           f"or be auto or none; got {value!r}")
    _check(len(set(value.values())) == len(value), f"state: an input is fed by two outputs ({value!r})")


def check_sequences(value: Any) -> dict | None:
    """``sequences:`` as one normal form: {kind: stream} | {kind: length, length: N} | {kind: ids, key: K}."""
    if value is None or isinstance(value, dict) and value.get("kind") in ("stream", "length", "ids") and \
            set(value) <= {"kind", "length", "key"}:
        if isinstance(value, dict) and value["kind"] == "length":
            _check(_whole(value.get("length")) and value["length"] > 0,
                   f"sequences: length must be a positive whole number of steps, got {value.get('length')!r}")
        if isinstance(value, dict) and value["kind"] == "ids":
            _check(isinstance(value.get("key"), str) and value["key"], "sequences: ids must name an array of the .npz")
        return value
    if value == "stream":
        return {"kind": "stream"}
    if _whole(value) and value > 0:
        return {"kind": "length", "length": value}
    if isinstance(value, dict) and set(value) == {"length"}:
        return check_sequences(value["length"]) if _whole(value["length"]) and value["length"] > 0 else \
            _check(False, f"sequences: length must be a positive whole number of steps, got {value['length']!r}")
    if isinstance(value, dict) and set(value) == {"ids"} and isinstance(value["ids"], str) and value["ids"]:
        return {"kind": "ids", "key": value["ids"]}
    _check(False, f"sequences must be stream, a number of steps per sequence, {{length: N}} or {{ids: KEY}} (an array "
                  f"of the .npz with one sequence id per sample); got {value!r}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _known(cls, data: dict, where: str) -> dict:
    """``cls``: a dataclass, or the names it takes."""
    _check(isinstance(data, dict), f"{where} must be a mapping")
    unknown = set(data) - (set(cls) if isinstance(cls, tuple) else {f.name for f in dataclasses.fields(cls)})
    _check(not unknown, f"unknown {where} option(s): {', '.join(sorted(unknown))}")
    return data


METRIC_BUDGET_SUFFIXES = ("_drop", "_min", "_max")


def _metric_budgets(data: Any) -> Any:
    """``{mAP50_drop: 1.0, max_latency_ms: 20}`` -> named budgets stay, scores' budgets go to ``metrics``."""
    if not isinstance(data, dict):
        return data or {}
    names = set(Budgets.KEYS)
    metrics = dict(data.get("metrics") or {})
    for k, v in data.items():
        if k not in names and isinstance(k, str) and k.endswith(METRIC_BUDGET_SUFFIXES):
            metrics[k] = v
    for k, v in metrics.items():
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) != float("inf") and v == v,
               f"budgets.{k} must be a finite number, got {v!r}")
        if "cosine" in str(k) and not k.endswith("_drop"):  # a bound no cosine can meet fails every build at the end
            _check(-1 <= v <= 1, f"budgets.{k} must be between -1 and 1 (a cosine similarity), got {v!r}")
        elif any(w in str(k) for w in ("accuracy", "agreement")) and not k.endswith("_drop"):
            _check(0 <= v <= 100, f"budgets.{k} must be between 0 and 100 (a percentage), got {v!r}")
    kept = {k: v for k, v in data.items() if k != "metrics" and k not in metrics}
    return {**kept, "metrics": metrics} if metrics else kept


def _compress_step(step: Any) -> CompressStep:
    if isinstance(step, CompressStep):
        return step
    if isinstance(step, dict) and set(step) == {"kind", "options"}:
        return CompressStep(step["kind"], dict(step["options"] or {}))
    _check(isinstance(step, dict) and len(step) == 1,
           f"each compress step must be a one-key mapping like {{prune: {{...}}}}, got {step!r}")
    (kind, options), = step.items()
    return CompressStep(str(kind), dict(options or {}))


CONFIG_KEYS = {"input": "inputs"}  # yaml spelling -> field name


def load_config(path: str | Path) -> dict[str, Any]:
    """Read edgebuild.yaml into a dict of BuildSpec fields (relative paths resolved against its folder)."""
    import yaml

    path = Path(path)
    _check(path.is_file(), f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise BadInputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    _check(isinstance(data, dict), f"{path}: top level must be a mapping")
    data = {CONFIG_KEYS.get(k, k): v for k, v in data.items()}
    if isinstance(data.get("inputs"), dict):
        data["inputs"] = [data["inputs"]]
    if isinstance(data.get("targets"), str):
        data["targets"] = [data["targets"]]
    base = path.parent.resolve()  # absolute: the manifest re-runs the build from any directory
    for key in ("model", "weights", "calib", "eval", "train"):
        value = data.get(key)
        if isinstance(value, str) and not is_builtin_or_module(value) and not Path(value).is_absolute():
            data[key] = str(base / value)
    if "profile_files" in data:
        data["profile_files"] = [str(base / p) for p in data["profile_files"]]
    paths = data.get("python_path") or []
    if isinstance(paths, str):
        paths = [paths]
    _check(isinstance(paths, list), f"{path}: python_path must be a list of directories")
    data["python_path"] = [str((base / str(p)).resolve()) for p in [*paths, "."]]  # package.module:attr beside the config
    if isinstance(data.get("class_names"), str):
        data["class_names"] = [c.strip() for c in data["class_names"].split(",") if c.strip()]
    return data


def is_builtin_or_module(value: str) -> bool:
    return value == "digits" or value.startswith("digits:") or (":" in value and not value.endswith((".onnx", ".pt", ".pt2")) and "/" not in value)
