"""A candidate artifact of a target: converted, measured (metrics, then latency and memory) and judged in one place.

``Attempt`` holds what was measured of one artifact; its checks are computed from those measurements against its
budget (``V.assess``). ``evaluate`` measures an artifact on the evaluation set (cached), ``reference_attempt`` is the
FP32 reference itself; the hashes and the runtime key here are what the stage cache keys these measurements by.
The per-target stages (``per_target``, ``search``, ``package``, ``pipeline/memory.py``) all build on this module,
which imports none of them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline import timing
from edgebuild.pipeline.cache import cached as stage_key, key  # `cached` is a local name in evaluate()
from edgebuild.pipeline.errors import ConversionError
from edgebuild.pipeline.results import Latency, Metrics, decide
from edgebuild.pipeline.stages import validate as V
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.pipeline.stages.export import file_hash
from edgebuild.specs import Precision
from edgebuild.targets.base import REFERENCE_BACKEND, Artifact, Backend, Runner
from edgebuild.targets.profiles import TargetProfile
from edgebuild.targets.settings import Settings


@dataclass
class Attempt:
    """One conversion with its measurements (metrics, then latency, memory). Its checks are never stored: they are
    computed from what was measured, against its ``budget``, in one place (``V.assess``), so every stage that adds a
    measurement (timing, memory, packaging) changes the verdict only through that measurement."""

    artifact: Artifact
    metrics: Metrics
    budget: V.Budget
    task: str = "auto"  # the judging's task (``V.Judging.task``)
    latency: Latency | None = None  # timed last, interleaved with the FP32 baseline (``per_target.time_artifacts``)
    label: str = "profile settings"
    data: dict = field(default_factory=dict)  # the evaluation data these numbers were measured on
    cached: bool = False  # the metrics came from the stage cache (this artifact was not evaluated again)
    memory: dict = field(default_factory=dict)  # runtime memory (pipeline/memory.py), TFLM fit under "micro"
    seconds: float = 0.0  # conversion + validation time (the accuracy search's first estimate of one try)
    restored: bool = False  # the artifact came from the stage cache (ConversionOutcome.restored)
    reference: bool = False  # the FP32 reference itself: its metrics were not measured again (``reference_attempt``)

    @property
    def assessment(self) -> V.Assessment:
        lat = None if self.latency is None else self.latency.to_dict()
        # a search try whose files were replaced by a later one (installed in the same folder) keeps its quality
        # checks; its size is no longer there to judge (it was judged when it was made)
        present = all((self.artifact.directory / f).is_file() for f in self.artifact.files)
        size = self.artifact.size_bytes if present else None
        return V.assess(self.metrics, self.budget, self.task, size, lat, self.memory)

    @property
    def failures(self) -> list[V.Check]:
        return self.assessment.failures

    @property
    def loss(self) -> float:
        """V.Assessment.loss: lower is better, <= 0 within every quality budget."""
        return self.assessment.loss

    @property
    def quality_ok(self) -> bool:
        return decide(self.failures).quality_ok

    @property
    def p50_ms(self) -> float | None:
        """The p50 latency on the host (None until timed)."""
        return None if self.latency is None else self.latency.p50_ms

    def summary(self) -> dict:
        name, value = self.metrics.headline()
        return {"label": self.label, "precision": self.artifact.precision, "settings": self.artifact.settings, name: value,
                "quality_loss": round(self.loss, 4), "size_bytes": self.artifact.size_bytes,
                "latency_p50_ms": self.p50_ms, "failures": [str(f) for f in self.failures]}


def open_runner(backend: Backend, artifact: Artifact, threads: int) -> Runner:
    if backend.isolate_runner:
        from edgebuild.targets.served import IsolatedRunner

        return IsolatedRunner(backend.name, artifact, threads)
    return backend.runner(artifact, threads)


def timing_threads(profile: TargetProfile) -> int:
    """Threads the host runs a profile's artifacts with: the profile's, at most the host's cores (more threads
    than cores only add contention; the manifest records both)."""
    return max(1, min(profile.threads, timing.host_cores()))


def host_id() -> dict:
    import platform

    return {"node": platform.node(), "machine": platform.machine(), "cores": timing.host_cores(),
            "processor": platform.processor()}


_FILE_SHA: dict[tuple, str] = {}


def file_sha(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime, inode) in this process."""
    st = path.stat()
    k = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if k not in _FILE_SHA:
        _FILE_SHA[k] = file_hash(path)
    return _FILE_SHA[k]


def artifact_hash(art: Artifact) -> str:
    return key(files={f: file_sha(art.directory / f) for f in sorted(art.files)}, main=art.main,
               precision=art.precision, backend=art.backend, io=art.io)


def runtime_key(backend: Backend, threads: int) -> dict:
    """Where a result was measured (the backend's package versions key it through ``cache.cached``)."""
    return {"backend": backend.name, "threads": threads, "host": host_id()}


def judging_key(ctx: BuildContext):
    j = asdict(ctx.job.judging)
    j.pop("evaluator_base", None)
    return j


def evaluate(ctx: BuildContext, backend: Backend, profile: TargetProfile, art: Artifact, budget: V.Budget,
             timed: bool = True, data: tuple[SampleSet, list] | None = None, restored: bool = False) -> Attempt:
    """Validate ``art`` on the evaluation set (or on ``data`` = (a subset, its reference outputs)).

    The metrics are cached, keyed by (artifact sha256, evaluation data hash, reference, judging, runtime and
    versions, threads, host): an unchanged artifact is not evaluated again. Latency is not measured here
    (``timed`` is kept for callers): ``build_target`` times the chosen artifact interleaved with its FP32 baseline.
    """
    evalset, reference = data or (ctx.job.evalset, ctx.job.reference)
    threads = timing_threads(profile)
    # a user's evaluator is code whose changes no key sees: its results are not cached
    k = None if ctx.job.judging.evaluator else stage_key(
        "validate", inputs={"artifact": artifact_hash(art), "data": evalset.content_hash(),
                            "reference": ctx.job.model.content_hash},
        config={"judging": judging_key(ctx), "runtime": runtime_key(backend, threads)}, backend=backend.name)
    hit = ctx.work.cache.get_result(k) if k else None
    cached = hit is not None
    if cached:
        metrics = Metrics.from_dict(hit[0]["metrics"])
    else:
        with open_runner(backend, art, threads) as runner:
            outputs = V.collect(runner, evalset)
        try:
            metrics = V.compare(reference, outputs, evalset.labels, ctx.job.judging)
        except ValueError as e:
            raise ConversionError(f"{profile.name}: {art.main} gives outputs unlike the source model ({e})") from e
        if k:
            ctx.work.cache.put_result(k, {"metrics": metrics.to_dict()})
            metrics = Metrics.from_dict(json_round_trip(metrics.to_dict()))  # a cold and a warm build report the same
    return Attempt(art, metrics, budget, ctx.job.judging.task, data=evalset.describe(), cached=cached, restored=restored)


def json_round_trip(obj):
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError):
        return obj


def reference_attempt(ctx: BuildContext, art: Artifact, budget: V.Budget, restored: bool = False) -> Attempt | None:
    """The FP32 baseline's metrics without running it, when it is numerically the reference: the same ONNX file
    on the same runtime (onnx backend, FP32). None when it is not."""
    if art.backend != REFERENCE_BACKEND or art.precision != Precision.FP32 or len(art.files) != 1 \
            or file_sha(art.path) != file_sha(ctx.job.model.onnx_path):
        return None
    metrics = V.compare(ctx.job.reference, ctx.job.reference, ctx.job.evalset.labels, ctx.job.judging)
    metrics = Metrics.from_dict(json_round_trip(metrics.to_dict()))
    return Attempt(art, metrics, budget, ctx.job.judging.task, label="the FP32 reference itself (not evaluated again)",
                   data=ctx.job.evalset.describe(), restored=restored, reference=True)


def array_hash(a) -> str:
    import hashlib

    a = np.ascontiguousarray(a)
    return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()


def candidates(ctx, backend: Backend, profile: TargetProfile, settings: Settings) -> list[tuple[str, Settings]]:
    """The INT8 candidates after the profile's own settings, likeliest first: those the backend chooses from the graph
    (``graph_candidates``: dynamic INT8 where MatMul/LSTM/embedding tables hold most of the weights), then its
    calibration/granularity/range variants."""
    graph = getattr(backend, "graph_candidates", None)
    found = list(graph(profile, settings, ctx.job.model.onnx_path)) if graph is not None else []
    return found + list(backend.recovery_candidates(profile, settings))
