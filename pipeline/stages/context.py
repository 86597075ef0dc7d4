"""What the per-target stages are given, in three typed parts instead of one bag:

- ``BuildJob`` (frozen): what every target is built from, fixed before the first target starts — the spec, the
  exported model, the calibration and evaluation samples, the FP32 reference outputs and how they are judged;
- ``Workspace`` (frozen): where and within what limits the build works — the stage cache, scratch space, the
  progress callback and the build's deadline;
- ``Carryover``: what targets share while the build runs — stage outputs by key (``Memo``: the per-layer
  sensitivity, ``stages/sensitivity.py``), so no target's result depends on which target asked first, and
  conversions a backend made besides the one asked for (a TFLite child's float siblings), kept for the later
  conversion of that precision.

``BuildContext`` holds the three; it is frozen, so a stage can change nothing but the carryover, and only
through its two typed fields. Data hashes are the samples' own (``SampleSet.content_hash`` is computed once).
Targets are independent: none waits for another, and each gets the same outputs whatever order they run in.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline.cache import StageCache
from edgebuild.pipeline.spec import BuildSpec
from edgebuild.pipeline.stages import validate as V
from edgebuild.targets.base import ExportedModel


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


class Memo:
    """Stage outputs shared by the targets of one build, by key (a key names every input of the stage): a target
    gets what it would compute itself; targets asking for one key at once wait for one computation."""

    def __init__(self) -> None:
        self._values: dict[str, object] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: str, make: Callable[[], tuple[object, bool]]):
        """The value for ``key``, made by ``make() -> (value, keep)`` when there is none; kept only when ``keep``."""
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._values:
                return self._values[key]
            value, keep = make()
            if keep:
                self._values[key] = value
            return value


@dataclass(slots=True)  # slots: a field that does not exist (a stale ``carry.sensitivity``) is an error, not a no-op
class Carryover:
    stages: Memo = field(default_factory=Memo)  # stage outputs by key (every input of the stage in the key)
    siblings: dict[str, "ConversionOutcome"] = field(default_factory=dict)  # conversion key -> one made besides another (stages/convert.py)


@dataclass(frozen=True)
class BuildContext:
    job: BuildJob
    work: Workspace
    carry: Carryover = field(default_factory=Carryover)
