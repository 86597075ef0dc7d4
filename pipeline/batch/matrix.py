"""The matrix file of ``edgebuild batch``: models x targets, as frozen, validated types.

    defaults:                    # edgebuild.yaml options for every model (a model's own options win)
      budgets: {max_accuracy_drop: 2.0}
    targets: [onnx-cpu, x86]     # each model's targets unless it names its own; a name of `groups` expands
    groups: {cheap: [onnx-cpu, x86]}
    resources: {num_cpus: 1}     # per cell: CPUs (= the build's threads), memory_mb (default: from model and target)
    retries: 2                   # a cell whose worker died is run again this many times, then reported failed
    cache: .cache/edgebuild      # the stage cache every cell shares: a folder or s3://bucket/prefix, gs://bucket/prefix
                                 # (default: $EDGEBUILD_CACHE or ~/.cache/edgebuild)
    models:
      demo: {}                   # no `model:`: the built-in demo
      resnet:
        config: resnet/edgebuild.yaml   # an edgebuild.yaml whose options come first
        model: resnet/model.onnx
        targets: [arm64, cheap]
        resources: {num_cpus: 2}
        cells: {arm64: {resources: {memory_mb: 6000}, budgets: {max_latency_ms: 40}}}

Every cell is one ordinary ``BuildSpec`` (one target, its own output folder ``<out>/<model>/<target>/``).
``load_matrix`` checks every cell as the build would (options, targets, backends, files) before anything runs: a
bad cell is one ``BadInputError`` (exit 2) naming the model and target.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebuild.pipeline.errors import BadInputError

MATRIX_KEYS = {"defaults", "targets", "groups", "resources", "retries", "cache", "models"}
MODEL_KEYS = {"config", "targets", "resources", "cells"}  # besides every BuildSpec option
RESOURCE_KEYS = {"num_cpus", "memory_mb"}
CELL_KEYS = {"resources", "budgets"}
PATH_KEYS = ("model", "weights", "calib", "eval", "train")
NOT_PER_CELL = {"out", "targets", "cache_dir"}  # the batch decides these
OTHER_STORES = ("az://", "abfs://", "hdfs://")  # URIs of stores the cache cannot use (it can: s3://, gs://)

# What a cell's memory is declared as when the matrix does not say: a conversion's peak by backend (TensorFlow in
# the TFLite child dominates), plus the model file 20 times over (its copies: ONNX export, reference, converters).
# (each backend's descriptor: BackendInfo.cell_memory_mb)
OTHER_BACKEND_MB, MODEL_COPIES = 2000, 20


@dataclass(frozen=True)
class Resources:
    """What a cell's task declares to the scheduler; ``num_cpus`` is also the build's thread count."""

    num_cpus: int = 1
    memory_mb: int | None = None  # None: estimated from the model and the target (``memory_for``)

    def __post_init__(self):
        _need(isinstance(self.num_cpus, int) and not isinstance(self.num_cpus, bool) and self.num_cpus >= 1,
              f"resources.num_cpus must be a whole number >= 1, got {self.num_cpus!r}")
        _need(self.memory_mb is None or (isinstance(self.memory_mb, int) and not isinstance(self.memory_mb, bool)
                                         and self.memory_mb > 0),
              f"resources.memory_mb must be a positive whole number of MB, got {self.memory_mb!r}")

    def over(self, data: Any, where: str) -> "Resources":
        """These resources with ``data``'s keys over them."""
        if data is None:
            return self
        _need(isinstance(data, dict), f"{where}: resources must be a mapping")
        _unknown(data, RESOURCE_KEYS, f"{where}: resources")
        return Resources(**{"num_cpus": self.num_cpus, "memory_mb": self.memory_mb, **data})


@dataclass(frozen=True)
class Cell:
    """One model x one target: the spec of its ordinary build and what its task declares."""

    model: str
    target: str
    spec: dict  # BuildSpec.to_dict() of the build (one target, out = <batch out>/<model>/<target>)
    resources: Resources
    backend: str

    @property
    def name(self) -> str:
        return f"{self.model}/{self.target}"

    @property
    def out(self) -> Path:
        return Path(self.spec["out"])

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "spec": self.spec, "backend": self.backend,
                "resources": {"num_cpus": self.resources.num_cpus, "memory_mb": self.resources.memory_mb}}

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(d["model"], d["target"], d["spec"], Resources(**d["resources"]), d["backend"])


@dataclass(frozen=True)
class Matrix:
    path: Path
    cells: tuple[Cell, ...]
    retries: int = 2
    cache: str | None = None  # absolute directory every cell shares
    models: tuple[str, ...] = field(default=())
    targets: tuple[str, ...] = field(default=())


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise BadInputError(message)


def _unknown(data: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(data) - allowed)
    _need(not unknown, f"{where}: unknown key(s) {', '.join(map(str, unknown))} (allowed: {', '.join(sorted(allowed))})")


def _read_yaml(path: Path) -> dict:
    import yaml

    _need(path.is_file(), f"matrix file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BadInputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    _need(isinstance(data, dict), f"{path}: the top level must be a mapping with `models:`")
    return data


def _resolved_paths(options: dict, base: Path) -> dict:
    """Relative file paths of inline options against the matrix file's folder (as edgebuild.yaml's against its own)."""
    from edgebuild.pipeline.spec import is_builtin_or_module

    out = dict(options)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and not is_builtin_or_module(value) and not Path(value).is_absolute():
            out[key] = str(base / value)
    if isinstance(out.get("profile_files"), list):
        out["profile_files"] = [str(base / p) for p in out["profile_files"]]
    return out


def _merge(*layers: dict) -> dict:
    """Later layers win; ``budgets`` and ``python_path`` are merged, not replaced."""
    out: dict = {}
    for layer in layers:
        for k, v in layer.items():
            if k == "budgets" and isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            elif k == "python_path" and isinstance(v, list) and isinstance(out.get(k), list):
                out[k] = list(dict.fromkeys([*out[k], *v]))
            else:
                out[k] = v
    return out


def _targets(names: Any, groups: dict, where: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    _need(isinstance(names, list) and names and all(isinstance(n, str) and n for n in names),
          f"{where}: targets must be a non-empty list of target names")
    out = []
    for n in names:
        out += groups.get(n, [n])
    return list(dict.fromkeys(out))


def memory_for(backend: str, spec: dict) -> int:
    """The memory (MB) a cell declares when the matrix does not say: the backend's conversion peak plus the model."""
    model = spec.get("model")
    size_mb = 0.0
    if isinstance(model, str) and Path(model).is_file():
        size_mb = Path(model).stat().st_size / 1e6
    from edgebuild.targets.base import backend_info

    return int((backend_info(backend).cell_memory_mb or OTHER_BACKEND_MB) + MODEL_COPIES * size_mb)


def cache_location(value: Any, base: Path) -> str:
    """The shared cache: the matrix's ``cache:``, else ``$EDGEBUILD_CACHE``, else ~/.cache/edgebuild (an absolute
    directory, or an object-store URI kept as written: ``s3://bucket/prefix``, ``gs://bucket/prefix``)."""
    from edgebuild.pipeline.cache import default_location, is_object_store

    if value is None:
        value = default_location()
        return value if is_object_store(value) else str(Path(value).expanduser().resolve())
    _need(isinstance(value, str) and value, "cache: must be a directory path or an s3:// or gs:// URI")
    if is_object_store(value):
        return value
    if value.startswith(OTHER_STORES) or "://" in value:
        raise BadInputError(f"cache: {value}: not a store the cache can use (s3://, gs://) nor a directory; use a "
                            "directory every node mounts (NFS, a cluster filesystem) or an S3/GCS bucket")
    path = Path(os.path.expanduser(value))
    return str((path if path.is_absolute() else base / path).resolve())


def load_matrix(path: str | Path, out: str | Path) -> Matrix:
    """Read and check a matrix file; every cell's spec is checked as its build would check it."""
    path = Path(path)
    data = _read_yaml(path)
    base = path.parent.resolve()
    _unknown(data, MATRIX_KEYS, str(path))
    groups = data.get("groups") or {}
    _need(isinstance(groups, dict) and all(isinstance(v, list) for v in groups.values()),
          f"{path}: groups must map a name to a list of targets")
    defaults = data.get("defaults") or {}
    _need(isinstance(defaults, dict), f"{path}: defaults must be a mapping of build options")
    _need(not (set(defaults) & NOT_PER_CELL), f"{path}: defaults: the batch sets {', '.join(sorted(NOT_PER_CELL))}")
    retries = data.get("retries", 2)
    _need(isinstance(retries, int) and not isinstance(retries, bool) and 0 <= retries <= 10,
          f"{path}: retries must be a whole number from 0 to 10, got {retries!r}")
    models = data.get("models")
    _need(isinstance(models, dict) and models, f"{path}: `models:` must map model names to their options")
    resources = Resources().over(data.get("resources"), str(path))
    cache = cache_location(data.get("cache"), base)
    out = Path(out).resolve()
    cells = []
    for name, entry in models.items():
        cells += _model_cells(path, base, str(name), entry, data, groups, defaults, resources, cache, out)
    _need(bool(cells), f"{path}: the matrix has no cells")
    return Matrix(path, tuple(cells), retries, cache, tuple(dict.fromkeys(c.model for c in cells)),
                  tuple(dict.fromkeys(c.target for c in cells)))


def _model_cells(path, base, name, entry, data, groups, defaults, resources, cache, out) -> list[Cell]:
    from edgebuild.pipeline.cache import plain_name
    from edgebuild.pipeline.spec import load_config

    where = f"{path}: model {name}"
    _need(plain_name(name), f"{path}: model name {name!r} must be a plain name (letters, digits, _ . + -)")
    entry = entry or {}
    _need(isinstance(entry, dict), f"{where}: its options must be a mapping")
    own = {k: v for k, v in entry.items() if k not in MODEL_KEYS}
    _need(not (set(own) & NOT_PER_CELL), f"{where}: the batch sets {', '.join(sorted(NOT_PER_CELL))}")
    config = {}
    if entry.get("config") is not None:
        _need(isinstance(entry["config"], str), f"{where}: config must be a path to an edgebuild.yaml")
        config_path = Path(entry["config"]) if Path(entry["config"]).is_absolute() else base / entry["config"]
        try:
            config = load_config(config_path)
        except BadInputError as e:
            raise BadInputError(f"{where}: {e}") from None
        targets_of_config = config.pop("targets", None)
        config.pop("out", None)
    else:
        targets_of_config = None
    targets = _targets(entry.get("targets") or targets_of_config or data.get("targets"), groups, where) \
        if (entry.get("targets") or targets_of_config or data.get("targets")) else None
    _need(targets is not None, f"{where}: no targets (give `targets:` at the top level or for the model)")
    options = _merge(_resolved_paths(defaults, base), config, _resolved_paths(own, base))
    options.setdefault("python_path", [])
    options["python_path"] = list(dict.fromkeys([*options["python_path"], str(base)]))
    model_resources = resources.over(entry.get("resources"), where)
    per_cell = entry.get("cells") or {}
    _need(isinstance(per_cell, dict), f"{where}: cells must map a target to its overrides")
    expanded = _expand(targets, options, where)
    unknown_cells = sorted(set(per_cell) - set(expanded))
    _need(not unknown_cells, f"{where}: cells: {', '.join(unknown_cells)} is not one of its targets")
    return [_cell(name, target, options, per_cell.get(target) or {}, model_resources, cache, out, where)
            for target in expanded]


def _expand(targets: list[str], options: dict, where: str) -> list[str]:
    from edgebuild.targets.profiles import resolve

    try:
        return [p.name for p in resolve(tuple(targets), tuple(options.get("profile_files") or ()))]
    except BadInputError as e:
        raise BadInputError(f"{where}: {e}") from None


def _cell(model, target, options, overrides, resources, cache, out, where) -> Cell:
    from edgebuild.pipeline.spec import BuildSpec
    from edgebuild.pipeline.stages.per_target import precision_for
    from edgebuild.targets.base import backend_exists, get_backend
    from edgebuild.targets.profiles import resolve

    where = f"{where} target {target}"
    _need(isinstance(overrides, dict), f"{where}: cell overrides must be a mapping")
    _unknown(overrides, CELL_KEYS, where)
    data = _merge(options, {"budgets": overrides["budgets"]} if "budgets" in overrides else {})
    data.update(targets=[target], out=str(out / model / target), cache_dir=cache)
    try:
        spec = BuildSpec.from_dict(data)
        profile, = resolve((target,), spec.profile_files)
        if not backend_exists(profile.backend):
            raise BadInputError(f"unknown backend {profile.backend!r}")
        get_backend(profile.backend).check_profile(profile)
        precision_for(profile, spec)
        for key in PATH_KEYS:
            value = getattr(spec, key)
            if isinstance(value, str) and value.startswith("/") and not Path(value).exists():
                raise BadInputError(f"{key}: {value} does not exist")
    except BadInputError as e:
        raise BadInputError(f"{where}: {e}") from None
    cell_resources = resources.over(overrides.get("resources"), where)
    if cell_resources.memory_mb is None:
        cell_resources = Resources(cell_resources.num_cpus, memory_for(profile.backend, data))
    return Cell(model, target, spec.to_dict(), cell_resources, profile.backend)
