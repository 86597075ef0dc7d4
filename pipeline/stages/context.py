"""What the per-target stages are given, in three typed parts instead of one bag:

- ``BuildJob`` (frozen): what every target is built from, fixed before the first target starts — the spec, the
  exported model, the calibration and evaluation samples, the FP32 reference outputs and how they are judged;
- ``Workspace`` (frozen): where and within what limits the build works — the stage cache, scratch space, the
  progress callback, the build's deadline and the order in which parallel targets search;
- ``Carryover``: the only state one target leaves for the next — the per-layer sensitivity (measured once per
  build, by the first target that searches) and conversions a backend made besides the one asked for (a TFLite
  child's float siblings), kept for the later conversion of that precision.

``BuildContext`` holds the three; it is frozen, so a stage can change nothing but the carryover, and only
through its two typed fields. Data hashes are the samples' own (``SampleSet.content_hash`` is computed once).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline.cache import StageCache
from edgebuild.pipeline.spec import BuildSpec
from edgebuild.pipeline.stages import validate as V
from edgebuild.targets.base import Artifact, ExportedModel


@dataclass(frozen=True)
class BuildJob:
    spec: BuildSpec
    model: ExportedModel
    calib: SampleSet
    evalset: SampleSet
    reference: list  # FP32 reference outputs on the evaluation set, [sample][output]
    judging: V.Judging  # what the outputs mean (resolved against the reference)


@dataclass(frozen=True)
class Workspace:
    cache: StageCache
    scratch: Path  # throw-away work (baselines, candidates)
    stage: Callable[[str], object]  # progress: `with work.stage("..."):`
    deadline: float = float("inf")  # time.monotonic() past which no accuracy search starts a try (build_max_seconds)
    turns: "Turns | None" = None  # targets built in parallel search in their sequential order


@dataclass(frozen=True)
class Sensitivity:
    layers: dict[str, float]  # ONNX node name -> quality loss with only that layer quantized, most sensitive first
    seconds: float  # what measuring it cost


@dataclass
class Carryover:
    sensitivity: Sensitivity | None = None
    siblings: dict[str, Artifact] = field(default_factory=dict)  # conversion key -> artifact made besides another


@dataclass(frozen=True)
class BuildContext:
    job: BuildJob
    work: Workspace
    carry: Carryover = field(default_factory=Carryover)


class Turns:
    """Accuracy searches of targets built in parallel run in the targets' order, one at a time: a search may
    reuse what an earlier one left in the carryover (the layer sensitivity, measured with the first searching
    target's budget), so the result is the one a sequential build gives."""

    def __init__(self, names, slots=None):
        import threading

        self.names = list(names)
        self.done_events = {n: threading.Event() for n in self.names}
        self.slots = slots  # the scheduler's work slots (a semaphore): a target waiting for its turn gives its up

    @contextmanager
    def turn(self, name: str):
        waiting = [self.done_events[e] for e in self.names[:self.names.index(name)] if not self.done_events[e].is_set()]
        if waiting and self.slots is not None:
            self.slots.release()  # waiting costs no CPU: a target still to convert may use the slot meanwhile
        for event in waiting:
            event.wait()
        if waiting and self.slots is not None:
            self.slots.acquire()
        yield

    def done(self, name: str) -> None:
        self.done_events[name].set()
