"""The Backend contract, the Artifact it produces and the Runner that executes it, and the backend descriptor.

A backend lives in ``targets/<name>.py`` or a sub-package ``targets/<name>/`` and declares itself there with
``register(BackendInfo(...))``: its precisions, settings type, extra and import names, runtime modules, device
runtimes, artifact suffixes, the packages whose versions key its cache entries, what sources it takes, and where
its ``Backend`` class is (imported when first used). Registration is by import: ``get_backend(name)`` imports
``edgebuild.targets.<name>``; ``known_backends()`` imports every module of ``targets/`` and lists what registered.
Nothing outside the backend's own module or sub-package names it. Heavy libraries are imported inside its methods.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import time
import pkgutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgebuild.errors import BadInputError, ConversionError, MissingToolError
from edgebuild.targets.settings import NoSettings, Precision, Settings

if TYPE_CHECKING:
    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.targets.profiles import TargetProfile


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str = "ANY"

    def to_dict(self) -> dict:
        """The source-side description recorded in an artifact's ``io`` (metadata.json)."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "layout": self.layout}


@dataclass(frozen=True)
class ExportedModel:
    """What a backend converts: the exported FP32 ONNX model, and for a torch source, when a target's backend
    consumes one (``Backend.consumes``), its torch.export program as a ``.pt2`` file (same inputs and outputs)."""

    onnx_path: Path
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opset: int
    content_hash: str = ""
    program: Path | None = None  # the FP32 torch.export program (torch.export.save), for TORCH_EXPORT backends
    program_error: str = ""  # why there is none for a torch source (torch.export failed): that target's error


@dataclass
class Artifact:
    """Files a backend wrote into ``directory``; ``main`` is the model file a runtime loads."""

    target: str
    backend: str
    precision: Precision  # a plain string given is read as the enum (an unknown one is a ValueError)
    directory: Path
    main: str
    files: list[str]
    settings: dict = field(default_factory=dict)  # the conversion/quantization options actually used
    io: dict = field(default_factory=dict)  # {"inputs": [TensorInfo...], "outputs": [...]} of the artifact itself
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.precision = Precision(self.precision)

    @property
    def path(self) -> Path:
        return self.directory / self.main

    @property
    def size_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["directory"] = str(self.directory)
        return json.loads(json.dumps(d, default=str))

    @classmethod
    def from_dict(cls, d: dict, directory: Path | None = None) -> "Artifact":
        d = dict(d)
        d["directory"] = Path(directory or d["directory"])
        return cls(**d)


class Runner:
    """Runs an artifact on feeds in the *source* model's layout and dtype; returns float outputs."""

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def time_ms(self, feed: dict[str, np.ndarray], warmup: int, runs: int, budget_s: float) -> list[float]:
        """Latency samples in ms: ``warmup`` untimed runs, then up to ``runs`` timed ones within ``budget_s``."""
        for _ in range(warmup):
            self.run(feed)
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < runs and (len(times) < 20 or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            self.run(feed)
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def threads_used(self) -> int | None:
        """Threads the runtime really uses (a runtime may use fewer than asked, e.g. no more than the cores)."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


ONNX, TORCH_EXPORT = "onnx", "torch.export"  # what a backend consumes (BackendInfo.consumes)


@dataclass(frozen=True)
class BackendInfo:
    """A backend's descriptor: everything the pipeline needs to know about it, declared in its own module or
    sub-package with ``register(BackendInfo(...))``, read without importing its converters or runtimes."""

    name: str
    backend: str  # "module:Class" of its Backend subclass (imported by get_backend)
    precisions: tuple[str, ...]  # what it can build (a profile may declare a subset)
    settings_type: type[Settings] = NoSettings  # the frozen type of a profile's ``quant:`` block
    extra: str = ""  # the pip extra that installs it: ``pip install 'edgebuild[<extra>]'``
    requires: tuple[str, ...] = ()  # import names of the libraries its conversion and runner need
    optional: tuple[str, ...] = ()  # import names of libraries only some of its features need (same extra)
    runtime_modules: tuple[str, ...] = ()  # what its runner imports (the memory probe's baseline); () = requires
    device_runtimes: tuple[str, ...] = ()  # import names a board's Python may run it with (--device), preferred first
    suffixes: tuple[str, ...] = ()  # file suffixes of its artifacts' main files (".tflite")
    metadata: str = ""  # where embed_metadata puts edgebuild's metadata ("" = the artifact carries none)
    versions: tuple[str, ...] = ()  # distributions whose versions key its stage-cache entries and are recorded
    consumes: str = ONNX  # what convert() reads: ONNX (model.onnx_path) or TORCH_EXPORT (model.program)
    cache_version: int = 1  # bump when its conversion changes what it writes (keys its cache entries)
    isolate_runner: bool = False  # run the runtime in a subprocess (native code that may crash)
    micro: bool = False  # can check a microcontroller fit (profiles with ``micro: true``; Backend.micro)
    # a conversion's peak resident memory before one is measured: (fixed bytes, bytes per byte of the FP32 model)
    # (pipeline/schedule.py, --max-memory-gb), and a batch cell's declared memory in MB (pipeline/batch/matrix.py);
    # unset: as the heaviest backend
    peak_memory: tuple[int, float] | None = None
    cell_memory_mb: int | None = None

    def __post_init__(self):
        if not self.name.isidentifier() or ":" not in self.backend:
            raise ValueError(f"backend descriptor {self.name!r}: a name and a 'module:Class' are needed")
        object.__setattr__(self, "precisions", tuple(str(getattr(p, "value", p)) for p in self.precisions))


class Backend:
    """One artifact format. Subclasses implement ``convert`` and ``runner``; what they are is their descriptor
    (``info``, a ``BackendInfo``), set by ``get_backend``."""

    info: BackendInfo
    supports_float_layers: bool = False  # can settings["float_layers"] (ONNX node names) stay in float?
    # the accuracy search tries mixed precision after the first INT8 miss, before this backend's recovery_candidates
    # (pipeline/stages/search.py ``_mixed_early``): where each variant is a whole costly conversion that rarely helps
    mixed_before_variants: bool = False
    # a folder of this build's own where conversions may keep calibration statistics for later conversions of the
    # same graph and samples (the accuracy search sets it; a backend that can reuse them does: ONNX's ranges)
    calibration_store: Path | None = None

    name = property(lambda self: self.info.name)
    precisions = property(lambda self: self.info.precisions)
    settings_type = property(lambda self: self.info.settings_type)
    requires = property(lambda self: self.info.requires)
    runtime_modules = property(lambda self: self.info.runtime_modules or self.info.requires)
    isolate_runner = property(lambda self: self.info.isolate_runner)
    consumes = property(lambda self: self.info.consumes)

    def before_mixed(self, settings: Settings) -> bool:
        """On a ``mixed_before_variants`` backend: does this pending variant still come before early mixed precision
        (a variant that costs no more than a plain try)?"""
        return False

    def check_available(self, target: str) -> None:
        for mod in self.requires:
            if importlib.util.find_spec(mod) is None:
                raise MissingToolError(target, mod, extra=self.info.extra or None)

    def convert(self, model: ExportedModel, profile: "TargetProfile", precision: str,
                calib: "SampleSet", workdir: Path, settings: Settings | dict | None = None) -> Artifact:
        """``settings``: what is asked (``requested_settings``; a mapping is changes to the profile's). The
        artifact's ``settings`` is a new dict: what the conversion used (the record), never written back."""
        raise NotImplementedError

    def convert_family(self, model: ExportedModel, profile: "TargetProfile", precision: str, calib: "SampleSet",
                       workdir: Path, settings: Settings | dict | None = None,
                       siblings: dict[str, tuple[Path, Settings | dict]] | None = None) -> dict[str, Artifact]:
        """The ``precision`` artifact and the *sibling artifacts* this backend can give from the same conversion
        run (TFLite: the FP32 baseline from the INT8 model's onnx2tf/TensorFlow graph), by precision.

        ``siblings``: {precision: (directory, settings)}. A sibling the backend cannot give (or that failed) is
        left out of the result; the caller then converts it on its own. Default: no siblings."""
        return {precision: self.convert(model, profile, precision, calib, workdir, settings)}

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        raise NotImplementedError

    def check_profile(self, profile: "TargetProfile") -> None:
        """Raise BadInputError, before any work, for a profile this backend cannot honour: a precision it
        does not build, or ``quant:`` settings it does not understand."""
        extra = [p for p in profile.precisions if p not in self.precisions]
        if extra:
            raise BadInputError(f"target {profile.name}: the {self.name} backend does not build "
                                f"{', '.join(extra)} (it builds {', '.join(self.precisions)})")
        self.check_settings(profile)

    def check_settings(self, profile: "TargetProfile") -> None:
        """Raise BadInputError for a profile's ``quant:`` this backend does not understand (unknown keys, bad
        values); called when a profile is loaded (``TargetProfile.__post_init__``), before any work."""
        self.requested_settings(profile)

    def profile_settings(self, profile: "TargetProfile") -> dict:
        """Settings a profile implies outside its ``quant:`` block (e.g. its layout); ``quant:`` overrides them."""
        return {}

    def requested_settings(self, profile: "TargetProfile", changes: Settings | dict | None = None) -> Settings:
        """What a conversion on this profile is asked for (frozen): the type's defaults, the profile's settings,
        then ``changes`` (a whole Settings, e.g. a search variant, or a mapping of changes), all checked."""
        if isinstance(changes, self.settings_type):
            return changes
        where = f"profile {profile.name}"
        asked = self.settings_type.from_profile({**self.profile_settings(profile), **profile.quant}, where)
        return asked.with_changes(changes, where)

    def default_settings(self, profile: "TargetProfile", precision: str) -> dict:
        """The requested settings that apply to ``precision``, as a new plain dict (cache keys, records)."""
        return self.requested_settings(profile).for_precision(precision)

    def artifact_name(self, precision: str, settings: dict | None = None) -> str:
        raise NotImplementedError

    # ---- metadata inside the artifact (pipeline/stages/embed.py asks the backend for formats it does not know) ----
    def embed_metadata(self, path: Path, meta: dict[str, str]) -> str | None:
        """Write ``meta`` into the artifact file ``path`` (a new file renamed over it); where it went, or None."""
        return None

    def read_metadata(self, path: Path) -> dict[str, str]:
        return {}

    # ---- what else a pipeline stage may ask a backend for (none of them names a backend) ---------------------
    def weight_counts(self, path: Path) -> dict | None:
        """INT8/float weight counts of an artifact file of this backend (pipeline/stages/weights.py); None: it
        cannot tell."""
        return None

    def micro(self) -> Any:
        """The microcontroller check (``info.micro``): an object with ``SAMPLES``, ``installed_version(target)``,
        ``micro_fit(artifact, feeds, host_outputs, version)`` and ``flash(artifact)``; None when there is none."""
        return None

    def source_runner(self, onnx_path: Path, threads: int) -> Runner:
        """A runner of an unconverted FP32 ONNX model (the reference backend's: the build's reference)."""
        raise NotImplementedError(f"the {self.name} backend does not run ONNX sources")

    def fake_quant(self, onnx_path: Path, calib: "SampleSet", workdir: Path, equalize: bool = False) -> Any:
        """A context manager whose ``runner(layers)`` runs the FP32 ONNX model with only ``layers`` quantized (and
        ``runner_except(layers)`` with every node but them; the
        reference backend's: layer sensitivity, pipeline/stages/sensitivity.py). ``equalize``: on the graph with its
        depthwise chains equalized first, as a conversion with ``equalize`` quantizes it (the mixed-precision proxy)."""
        raise NotImplementedError(f"the {self.name} backend has no fake-quant reference")

    # ---- accuracy search hooks (pipeline/stages/search.py, search_state.py, mixed_precision.py) ------
    def recovery_candidates(self, profile: "TargetProfile", settings: Settings | dict) -> list[tuple[str, Settings]]:
        """Cheaper INT8 variants to try before keeping layers in float: (label, new Settings made from
        ``settings`` with ``dataclasses.replace``)."""
        return []


def check_source(backend: Backend, target: str, source_kind: str) -> None:
    """Exit 2 before any work when a target's backend cannot take this kind of model ("onnx" | "torch")."""
    if backend.consumes == TORCH_EXPORT and source_kind != "torch":
        raise BadInputError(f"target {target}: the {backend.name} backend takes PyTorch models (an nn.Module as "
                            "package.module:attr, or a torch.export .pt2 program), not ONNX files (ONNX models go to "
                            "the tflite, onnx and openvino targets, e.g. arm64)")


def replace_file(path: Path, data: bytes) -> None:
    """``data`` as a new file renamed over ``path`` (mode 0644): a hard link to ``path`` (the stage cache's copy)
    keeps the old bytes. Backends write edgebuild's metadata into their artifacts with it."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # a new inode: a hard link to the cache keeps the cached bytes
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


STEMS = {Precision.INT8: "model_int8", Precision.FP16: "model_fp16", Precision.FP32: "model_fp32",
         Precision.DYNAMIC: "model_dynamic_int8"}


def stem(precision: str, settings: Settings | dict | None = None) -> str:
    """Honest file stem: `_int8` only for full-integer models, `_int8_mixed` when layers stay in float."""
    base = STEMS[precision]
    return base + "_mixed" if precision == "int8" and (settings or {}).get("float_layers") else base


_INFOS: dict[str, BackendInfo] = {}


def register(info: BackendInfo) -> BackendInfo:
    """Declare a backend (called at import of its module or sub-package)."""
    _INFOS[info.name] = info
    return info


def _extra_of(package: str) -> str | None:
    """The extra of the backend whose libraries include import name ``package`` (MissingToolError's resolver)."""
    for info in all_infos():
        if package in {m.split(".")[0] for m in (*info.requires, *info.runtime_modules, *info.optional)} and info.extra:
            return info.extra
    return None


MissingToolError.resolvers.append(_extra_of)


def backend_module(name: str) -> str:
    return f"edgebuild.targets.{name}"


def backend_exists(name: str) -> bool:
    return name.isidentifier() and importlib.util.find_spec(backend_module(name)) is not None


def backend_info(name: str) -> BackendInfo:
    """The descriptor of backend ``name``, importing its module (or sub-package) if needed."""
    if name not in _INFOS:
        if not backend_exists(name):
            raise BadInputError(f"unknown backend {name!r}")
        importlib.import_module(backend_module(name))
    if name not in _INFOS:
        raise ConversionError(f"module {backend_module(name)} does not register backend {name!r}")
    return _INFOS[name]


def known_backends() -> list[str]:
    """Every backend in targets/: each module and sub-package is imported (cheap: heavy libraries are imported
    inside methods) and what registered is listed."""
    import edgebuild.targets as package

    for m in pkgutil.iter_modules(package.__path__):
        if m.name.isidentifier() and m.name not in _INFOS:
            importlib.import_module(backend_module(m.name))
    return sorted(_INFOS)


def all_infos() -> list[BackendInfo]:
    return [_INFOS[n] for n in known_backends()]


_CLASSES: dict[str, type[Backend]] = {}


def get_backend(name: str) -> Backend:
    info = backend_info(name)
    if name not in _CLASSES:
        module, _, cls = info.backend.partition(":")
        _CLASSES[name] = getattr(importlib.import_module(module), cls)
    backend = _CLASSES[name]()
    backend.info = info
    return backend


REFERENCE_BACKEND = "onnx"  # the FP32 reference runs on this backend's runtime: ONNX Runtime CPU


def reference_runner(onnx_path: Path, threads: int) -> Runner:
    """The reference every target is judged against: the FP32 source ONNX model, unconverted, on the reference
    backend's runtime (ONNX Runtime, CPU). The one place the pipeline's reference runtime is chosen (the build's
    reference stage, ``edgebuild validate`` on other data)."""
    return get_backend(REFERENCE_BACKEND).source_runner(Path(onnx_path), threads)


def fake_quant(onnx_path: Path, calib: "SampleSet", workdir: Path, equalize: bool = False) -> Any:
    """The reference backend's fake-quant helper (``Backend.fake_quant``): layer sensitivity's yardstick."""
    return get_backend(REFERENCE_BACKEND).fake_quant(Path(onnx_path), calib, Path(workdir), equalize=equalize)
