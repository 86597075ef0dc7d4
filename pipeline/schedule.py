"""Targets in parallel: how many at once (``effective_jobs``) and the scheduler that converts and validates them
side by side, then times and packages them one at a time (``_build_all``)."""
from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

from edgebuild.pipeline import timing
from edgebuild.pipeline.errors import BadInputError, EdgeBuildError
from edgebuild.pipeline.results import TargetResult
from edgebuild.targets.profiles import TargetProfile


MEMORY_PER_JOB = 3 << 30  # a conversion's peak (TensorFlow in the TFLite child, NNCF, ORT calibration) with margin


def effective_jobs(jobs: int | None, n_targets: int) -> int:
    """Targets converted at once: ``jobs`` (default: the host's cores), at most one per 3 GiB of available
    memory, at most the number of targets."""
    cores = timing.host_cores()
    jobs = cores if jobs is None else jobs
    if jobs < 1:
        raise BadInputError(f"--jobs {jobs}: must be at least 1")
    return max(1, min(jobs, n_targets, _available_memory() // MEMORY_PER_JOB or 1))


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return MEMORY_PER_JOB * 64  # unknown: memory does not bound the jobs


def _build_all(ctx, profiles: list[TargetProfile], staging: Path, jobs: int) -> dict[str, TargetResult]:
    """Every target: conversions and validations of up to ``jobs`` targets at once (threads: the runtimes release
    the GIL in native code, the TFLite conversion runs in its own child process, and threads share the loaded
    evaluation data and reference outputs), then timing and the target's files one target at a time, in order, on
    a machine no conversion loads. The manifest is the one a sequential build (``jobs`` 1) writes."""
    from edgebuild.pipeline.stages.per_target import finish_target, prepare_target

    slots = threading.Semaphore(jobs)  # targets doing work at once; a target waiting for its search turn frees its
    if ctx.work.turns is not None:  # slot (Turns.turn), so a later target converts meanwhile instead of queueing behind it
        ctx.work.turns.slots = slots

    def prepare(profile):
        (staging / profile.name).mkdir()
        with slots:
            t0 = time.perf_counter()
            prep = _guarded(profile, staging, lambda: prepare_target(ctx, profile, staging / profile.name))
            return prep, time.perf_counter() - t0

    if jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(profiles), thread_name_prefix="edgebuild-target") as pool:
            prepared = list(pool.map(prepare, profiles))  # in order; the first BadInputError is raised
    else:
        prepared = [prepare(p) for p in profiles]
    targets = {}
    for profile, (prep, seconds) in zip(profiles, prepared):
        t0 = time.perf_counter()
        result = prep if isinstance(prep, TargetResult) else _guarded(profile, staging, lambda: finish_target(ctx, prep))
        targets[profile.name] = replace(result, profile=profile.to_dict(),
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
