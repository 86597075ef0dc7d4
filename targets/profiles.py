"""Target profiles: what a device family needs, as data (targets/profiles/*.yaml)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgebuild.errors import BadInputError
from edgebuild.specs import MEMORY_BUDGETS, Precision, check_budget, check_objective

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class Budget:
    """THE budget type: a profile's ``budgets:`` (and its ``advice:``), the config's (``spec.Budgets``, which adds the
    build's compression budget) and the one a target is judged against (``over``: the user's over the profile's).
    ``None``: not set (no check, or the lower layer's value). ``metrics``: budgets on any measured score,
    ((<score>_drop | <score>_min | <score>_max, limit), ...)."""

    max_accuracy_drop: float | None = None  # percentage points vs the FP32 source (or top-1 disagreement without labels)
    max_latency_ms: float | None = None  # p50 at batch 1 on the host runtime
    max_size_mb: float | None = None
    min_cosine: float | None = None  # fidelity floor for outputs that are not class scores
    metrics: tuple[tuple[str, float], ...] = ()
    max_memory_mb: float | None = None  # peak runtime memory above the runner's baseline (MB = 10^6 bytes)
    max_arena_kb: float | None = None  # TFLM tensor arena (profiles with micro: true), KB = 1024 bytes
    max_flash_kb: float | None = None  # the model in flash (+ its C array source)

    LIMITS = ("max_accuracy_drop", "max_latency_ms", "max_size_mb", "min_cosine") + MEMORY_BUDGETS  # a profile's keys

    def __post_init__(self):
        for name in ("max_accuracy_drop", "max_latency_ms", "max_size_mb") + MEMORY_BUDGETS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_budget(f"budgets.{name}", value,
                                                            positive=name != "max_accuracy_drop"))
        if self.min_cosine is not None:
            value = check_budget("budgets.min_cosine", self.min_cosine + 1.0) - 1.0  # finite, >= -1
            if value > 1.0:
                raise BadInputError(f"budgets.min_cosine must be between -1 and 1, got {self.min_cosine!r}")
            object.__setattr__(self, "min_cosine", value)
        metrics = self.metrics.items() if isinstance(self.metrics, dict) else self.metrics
        object.__setattr__(self, "metrics", tuple(sorted((str(k), v) for k, v in metrics)))

    def over(self, base: "Budget") -> "Budget":
        """This budget's values where set, ``base``'s elsewhere (a score budget: this one's, else ``base``'s)."""
        limits = {n: getattr(self, n) if getattr(self, n) is not None else getattr(base, n) for n in self.LIMITS}
        return Budget(**limits, metrics={**dict(base.metrics), **dict(self.metrics)})

    def limits(self) -> dict:
        """The named limits (a profile's ``budgets:`` keys), without score budgets."""
        return {n: getattr(self, n) for n in self.LIMITS}

    def to_dict(self) -> dict:
        """As a target's ``budgets`` record (metadata.json, manifest.json): every field, ``metrics`` a mapping."""
        d = asdict(self)
        d["metrics"] = dict(self.metrics)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Budget":
        return cls(**{**d, "metrics": d.get("metrics") or {}})


@dataclass(frozen=True)
class TargetProfile:
    name: str
    backend: str
    description: str
    precision: Precision = Precision.INT8
    precisions: tuple[Precision, ...] = tuple(Precision)  # precisions this device family can run
    io_dtype: str = "float32"  # dtype of the artifact's own inputs/outputs (int8: quantized I/O)
    layout: str = "source"  # source | NHWC: the artifact's input layout
    threads: int = 2
    host_runtime: str = ""
    device_runtime: str = ""
    devices: tuple[str, ...] = ()
    machines: tuple[str, ...] = ()  # `uname -m` of its boards (validate --device refuses another); () = any machine
    budgets: Budget = Budget(max_accuracy_drop=0.5)
    # a device's typical limits (latency, size, memory): advice, a warning in the report, never a failed build;
    # only the user's budgets (edgebuild.yaml, CLI, their own profile's `budgets:`) fail a build
    advice: Budget = Budget()
    quant: dict = field(default_factory=dict)  # backend-specific INT8 settings
    allow_float_layers: bool = True  # may the accuracy search keep layers in float?
    objective: str = "precision"  # precision | latency | size | accuracy: what ships (pipeline/stages/objective.py)
    host_is_device: bool = False  # the host runs the device's runtime: host latency is the device's
    host_validation: str = ""  # how the host check relates to the device (shown in the report)
    micro: bool = False  # also load and run the artifact on TensorFlow Lite Micro (arena, flash, op support)
    # other profiles for the same devices (pipeline/stages/alternatives.py): built when this one fails to convert
    # (alternatives_mode: fallback), or built too, the one with the better objective shipping (compete)
    alternatives: tuple[str, ...] = ()
    alternatives_mode: str = "fallback"
    source: str = ""  # the YAML file it came from

    def __post_init__(self):
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name) or self.name in ("reference", "all"):
            raise BadInputError(f"profile name {self.name!r}: use lower-case letters, digits, '.', '_' or '-' "
                                "(and not 'reference' or 'all')")
        object.__setattr__(self, "precisions", tuple(_typed(p) for p in self.precisions))  # "int8" -> Precision.INT8
        object.__setattr__(self, "precision", _typed(self.precision))
        object.__setattr__(self, "devices", tuple(self.devices))
        if isinstance(self.machines, str) or not all(isinstance(m, str) for m in self.machines):
            raise BadInputError(f"profile {self.name}: machines must be a list of `uname -m` names, got {self.machines!r}")
        object.__setattr__(self, "machines", tuple(self.machines))
        if self.precision not in self.precisions:
            raise BadInputError(f"profile {self.name}: default precision {self.precision} not in {self.precisions}")
        bad = [p for p in self.precisions if p not in Precision.values()]
        if bad:
            raise BadInputError(f"profile {self.name}: unknown precision(s) {bad}")
        if self.io_dtype not in ("float32", "int8", "uint8"):
            raise BadInputError(f"profile {self.name}: io_dtype must be float32, int8 or uint8")
        check_objective(self.objective, f"profile {self.name}")
        if self.host_is_device not in (True, False):
            raise BadInputError(f"profile {self.name}: host_is_device must be true or false")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise BadInputError(f"profile {self.name}: threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.backend, str) or not registered_backend(self.backend):
            raise BadInputError(f"profile {self.name}: unknown backend {self.backend!r} "
                                f"(one of {', '.join(known_backends())})")
        if self.micro not in (True, False) or (self.micro and not _backend_info(self.backend).micro):
            raise BadInputError(f"profile {self.name}: micro: true needs a backend with a microcontroller check "
                                f"({', '.join(b for b in known_backends() if _backend_info(b).micro)}: TensorFlow Lite Micro)")
        if not isinstance(self.quant, dict):
            raise BadInputError(f"profile {self.name}: quant must be a mapping")
        if not isinstance(self.alternatives, (list, tuple)) or not all(isinstance(a, str) for a in self.alternatives) \
                or self.name in self.alternatives or self.alternatives_mode not in ("fallback", "compete"):
            raise BadInputError(f"profile {self.name}: alternatives must list other profiles' names and "
                                "alternatives_mode be fallback or compete")
        object.__setattr__(self, "alternatives", tuple(dict.fromkeys(self.alternatives)))
        if not isinstance(self.description, str) or not self.description.strip():
            raise BadInputError(f"profile {self.name}: description must be a non-empty text")
        from edgebuild.targets.base import get_backend  # the backend module only, never its heavy libraries

        get_backend(self.backend).check_settings(self)  # quant: parsed into the backend's Settings: a typo is exit 2

    def to_dict(self) -> dict:
        return {**asdict(self), "budgets": self.budgets.limits(), "advice": self.advice.limits()}


def _backend_info(name: str):
    from edgebuild.targets.base import backend_info

    return backend_info(name)


def _typed(precision):
    """A precision's name as the Precision it names (an unknown one is left for the checks to name)."""
    return Precision(precision) if precision in Precision.values() else precision


def known_backends() -> list[str]:
    """Backends registered in targets/ (targets/base.py: each backend module registers its descriptor on import)."""
    from edgebuild.targets.base import known_backends as registered

    return registered()


def registered_backend(name: str) -> bool:
    return re.fullmatch(r"[a-z][a-z0-9_]*", name) is not None and name in known_backends()


def load_profile(path: str | Path) -> TargetProfile:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"profile file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise BadInputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: a profile must be a mapping")
    known = {f.name for f in fields(TargetProfile)}
    unknown = set(data) - known
    if unknown:
        raise BadInputError(f"{path}: unknown profile key(s) {', '.join(sorted(unknown))}")
    missing = {"name", "backend", "description"} - set(data)
    if missing:
        raise BadInputError(f"{path}: profile needs {', '.join(sorted(missing))}")
    if "precisions" not in data and isinstance(data.get("backend"), str) and registered_backend(data["backend"]):
        from edgebuild.targets.base import get_backend  # imports the backend module, never its heavy libraries

        data["precisions"] = get_backend(data["backend"]).precisions  # omitted: what the backend builds, no more
    budgets = data.pop("budgets", None) or {}
    if not isinstance(budgets, dict):
        raise BadInputError(f"{path}: budgets must be a mapping")
    unknown = set(budgets) - set(Budget.LIMITS)
    if unknown:
        raise BadInputError(f"{path}: unknown budget(s) {', '.join(sorted(unknown))}")
    advice = data.pop("advice", None) or {}
    if not isinstance(advice, dict) or set(advice) - {"max_latency_ms", "max_size_mb", *MEMORY_BUDGETS}:
        raise BadInputError(f"{path}: advice takes max_latency_ms, max_size_mb and the memory limits, got {advice!r}")
    try:
        return TargetProfile(**data, budgets=Budget(**{"max_accuracy_drop": 0.5, **budgets}), source=str(path),
                             advice=Budget(**advice))
    except TypeError as e:
        raise BadInputError(f"{path}: {e}") from None


def catalogue(extra: tuple[str, ...] = ()) -> dict[str, TargetProfile]:
    """Every built-in profile plus user profile files, by name (a user file may replace a built-in)."""
    profiles = {}
    for path in sorted(PROFILE_DIR.glob("*.yaml")) + [Path(p) for p in extra]:
        p = load_profile(path)
        profiles[p.name] = p
    for p in profiles.values():
        unknown = [a for a in p.alternatives if a not in profiles]
        if unknown:
            raise BadInputError(f"profile {p.name}: unknown alternative(s) {', '.join(unknown)} "
                                f"(profiles: {', '.join(profiles)})")
    return profiles


def resolve(names: tuple[str, ...], extra: tuple[str, ...] = ()) -> list[TargetProfile]:
    cat = catalogue(extra)
    if "all" in names:
        return list(cat.values())
    unknown = [n for n in names if n not in cat]
    if unknown:
        raise BadInputError(f"unknown target(s) {', '.join(unknown)}; `edgebuild targets` lists them: {', '.join(cat)}")
    return [cat[n] for n in dict.fromkeys(names)]
