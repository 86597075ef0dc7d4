"""Targets in parallel: how many at once (``effective_jobs``) and the scheduler that converts and validates them
side by side, then times and packages them one at a time (``build_all``)."""
from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

from edgebuild.pipeline import timing
from edgebuild.pipeline.errors import BadInputError, EdgeBuildError
from edgebuild.pipeline.results import TargetResult
from edgebuild.targets.profiles import TargetProfile


GB = 1 << 30
MEMORY_MARGIN = 1 << 30  # kept free for the system and the build's own process when --max-memory-gb is not given
log = logging.getLogger("edgebuild.schedule")


def effective_jobs(jobs: int | None, n_targets: int) -> int:
    """Targets converted at once: ``jobs`` (default: the host's cores), at most the number of targets. Memory bounds
    them further while they run (``MemorySlots``)."""
    cores = timing.host_cores()
    jobs = cores if jobs is None else jobs
    if jobs < 1:
        raise BadInputError(f"--jobs {jobs}: must be at least 1")
    return max(1, min(jobs, n_targets))


def memory_limit(max_memory_gb: float | None) -> int:
    """The bytes the running conversions' estimated peaks may add up to: ``--max-memory-gb``, else the available
    memory less ``MEMORY_MARGIN``."""
    if max_memory_gb is not None:
        if max_memory_gb <= 0:
            raise BadInputError(f"--max-memory-gb {max_memory_gb:g}: must be positive")
        return int(max_memory_gb * GB)
    return max(_available_memory() - MEMORY_MARGIN, 0)


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 50  # unknown: memory does not bound the jobs


class MemorySlots:
    """Work slots bounded twice: at most ``jobs`` targets at once, and the running targets' estimated peaks
    (``estimates``, by target) add up to at most ``limit`` bytes — a target that alone passes the limit runs alone.
    Used like a semaphore by the thread working for a target (``bind`` names it first)."""

    def __init__(self, jobs: int, limit: int, estimates: dict[str, int]):
        self.jobs, self.limit, self.estimates = jobs, limit, dict(estimates)
        self.cond = threading.Condition()
        self.running: dict[int, tuple[str, int]] = {}  # thread -> (target, its reserved bytes)
        self.local = threading.local()
        self.peak_reserved = 0  # the largest sum reserved at once (the manifest's record)
        self.waited: set[str] = set()  # targets that waited for memory, not for a job slot

    def bind(self, name: str) -> None:
        self.local.name = name

    def _fits(self, need: int) -> bool:
        reserved = sum(b for _, b in self.running.values())
        return len(self.running) < self.jobs and (not self.running or reserved + need <= self.limit)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        name = getattr(self.local, "name", "")
        need = self.estimates.get(name, 0)
        with self.cond:
            if (len(self.running) < self.jobs and not self._fits(need)) and name not in self.waited:
                self.waited.add(name)
                log.info("%s waits for memory: %.1f GB estimated, %.1f GB of %.1f GB taken by %s", name, need / GB,
                         sum(b for _, b in self.running.values()) / GB, self.limit / GB,
                         ", ".join(n for n, _ in self.running.values()))
            if not self.cond.wait_for(lambda: self._fits(need), timeout if blocking else 0):
                return False
            self.running[threading.get_ident()] = (name, need)
            self.peak_reserved = max(self.peak_reserved, sum(b for _, b in self.running.values()))
            return True

    def release(self) -> None:
        with self.cond:
            self.running.pop(threading.get_ident(), None)
            self.cond.notify_all()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def build_all(ctx, profiles: list[TargetProfile], staging: Path, jobs: int,
               memory: int | None = None) -> dict[str, TargetResult]:
    """Every target: conversions and validations of up to ``jobs`` targets at once (threads: the runtimes release
    the GIL in native code, the TFLite conversion runs in its own child process, and threads share the loaded
    evaluation data and reference outputs), then timing and the target's files one target at a time, in order, on
    a machine no conversion loads. Targets are independent (none waits for another's search; what they share is
    keyed by its inputs, ``stages/context.py``): the manifest is the one a sequential build (``jobs`` 1) writes, in
    any order. The target threads run in the build's scope (``edgebuild.procs``); when the build is interrupted
    while they work, the build's children are killed at once, so each thread ends with its converter."""
    from edgebuild.pipeline import peaks
    from edgebuild.pipeline.stages.alternatives import finish_target, prepare_target  # per_target's, or alternatives
    from edgebuild.procs import bound, current, set_owner
    from edgebuild.targets.base import get_backend

    for profile in profiles:  # a backend's library missing: one line and exit 2 before any target converts
        get_backend(profile.backend).check_available(profile.name)
    used = peaks.estimates(ctx, profiles, _model_bytes(ctx.job.model.onnx_path))  # measured before, else estimated
    slots = MemorySlots(jobs, memory_limit(None) if memory is None else memory,  # targets doing work at once, their
                        {name: peak for name, (peak, _) in used.items()})  # peaks in bounds

    def prepare(profile):
        (staging / profile.name).mkdir()
        slots.bind(profile.name)
        set_owner(profile.name)  # the children this thread starts count in this target's measured peak
        with slots:
            t0 = time.perf_counter()
            prep = _guarded(profile, staging, lambda: prepare_target(ctx, profile, staging / profile.name))
            return prep, time.perf_counter() - t0

    with peaks.Meter() as meter:  # the converting targets' children, sampled (pipeline/peaks.py)
        try:
            if jobs > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=len(profiles), thread_name_prefix="edgebuild-target") as pool:
                    futures: list = []
                    try:
                        for p in profiles:
                            futures.append(pool.submit(bound(prepare), p))
                        prepared = [f.result() for f in futures]  # in order; the first BadInputError is raised
                    except BaseException:  # Ctrl-C, SIGTERM, a bad input: this build's children die now, its
                        for f in futures:  # threads end
                            f.cancel()
                        current().children.kill_all()
                        raise
            else:
                prepared = [prepare(p) for p in profiles]
        finally:
            set_owner(None)
    peaks.record(ctx, profiles, meter, used)  # the next build of this model schedules by what was measured
    targets = {}
    for profile, (prep, seconds) in zip(profiles, prepared):
        t0 = time.perf_counter()
        result = prep if isinstance(prep, TargetResult) else _guarded(profile, staging, lambda: finish_target(ctx, prep))
        targets[profile.name] = replace(result, profile=result.profile or profile.to_dict(),  # alternatives: the shipped
                                        seconds=round(seconds + time.perf_counter() - t0, 2))  # this target's own work
    return targets


def _guarded(profile: TargetProfile, staging: Path, work):
    """``work()``, or the error record of a target that failed to convert (the others still build)."""
    try:
        return work()
    except BadInputError:
        raise
    except EdgeBuildError as e:
        shutil.rmtree(staging / profile.name, ignore_errors=True)
        return TargetResult.failed(profile.backend, str(e))


def _model_bytes(onnx_path: Path) -> int:
    """The FP32 model's size: the ONNX file and its external data (``*.data`` beside it)."""
    path = Path(onnx_path)
    try:
        return path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob("*.data") if f.is_file())
    except OSError:
        return 0
