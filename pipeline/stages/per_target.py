"""Stage: build one target profile — convert (cached), validate against the FP32 reference, judge budgets."""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgebuild.pipeline import timing
from edgebuild.pipeline.cache import cached
from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.pipeline.results import CacheUse, Latency, SearchRecord, TargetResult, WeightShare
from edgebuild.pipeline.spec import BuildSpec
from edgebuild.pipeline.stages import validate as V
from edgebuild.pipeline.stages.candidate import (  # noqa: F401 (re-exported: a target's candidates, stages/candidate.py)
    Attempt,
    array_hash,
    artifact_hash,
    evaluate,
    file_sha,
    host_id,
    json_round_trip,
    judging_key,
    open_runner,
    reference_attempt,
    runtime_key,
    timing_threads,
)
from edgebuild.pipeline.stages.context import BuildContext
from edgebuild.pipeline.stages.convert import baseline_dirs, convert
from edgebuild.specs import Precision
from edgebuild.targets.base import REFERENCE_BACKEND, Backend, get_backend
from edgebuild.targets.profiles import TargetProfile


def precision_for(profile: TargetProfile, spec: BuildSpec) -> Precision:
    precision = Precision(spec.precision or profile.precision)
    if precision not in profile.precisions:
        raise BadInputError(f"target {profile.name} does not run {precision} (it runs {', '.join(profile.precisions)})")
    return precision


def budget_for(profile: TargetProfile, spec: BuildSpec) -> V.Budget:
    """The budget a target is judged against: the user's (config, flags) over its profile's."""
    return spec.budgets.for_targets().over(profile.budgets)


CHOSEN, BASELINE = "chosen", "fp32"  # the roles of a target's timed artifacts (the cached record's keys)


def time_artifacts(ctx: BuildContext, backend: Backend, profile: TargetProfile, chosen: Attempt,
                   baseline: Attempt | None, budget: V.Budget) -> dict:
    """Time the chosen artifact and its FP32 baseline interleaved in rounds in this process (cached by both
    artifacts' hashes, the feed, runtime, threads and host); fills in their latency and the latency budget."""
    threads = timing_threads(profile)
    feed = ctx.job.evalset.feed(0)
    arts = {CHOSEN: chosen.artifact, **({BASELINE: baseline.artifact} if baseline is not None else {})}
    k = cached("latency", inputs={"artifacts": {n: artifact_hash(a) for n, a in arts.items()},
                                  "feed": {n: array_hash(v) for n, v in sorted(feed.items())}},
               config={"rounds": (timing.ROUNDS, timing.ROUND_S, timing.MAX_ROUND_RUNS, timing.WARMUP, timing.MAX_ROUNDS,
                                          timing.SLOWER_P, "single-thread check"),
                       "runtime": runtime_key(backend, threads)}, backend=backend.name)
    hit = ctx.work.cache.get_result(k)
    if hit is not None:
        record = hit[0]
    else:
        with ExitStack() as stack:
            runners = {n: stack.enter_context(open_runner(backend, a, threads)) for n, a in arts.items()}
            lat, p50s = timing.latency_interleaved(runners, feed,
                                                   more=timing.undecided(BASELINE, CHOSEN) if baseline is not None else None)
        speedup = timing.speedup(p50s[BASELINE], p50s[CHOSEN]) if baseline is not None else None
        if timing.slower(speedup) and threads > 1 and profile.host_is_device:  # where it decides what ships
            speedup["single_thread"] = _single_thread_speedup(backend, arts, feed)
        record = {"latency": lat, "speedup": speedup}
        ctx.work.cache.put_result(k, record)
        record = json_round_trip(record)
    for name, attempt in ((CHOSEN, chosen), (BASELINE, baseline)):
        if attempt is not None:
            attempt.latency = Latency.from_dict({**record["latency"][name], "threads_profile": profile.threads})
    return {"speedup": record["speedup"], "cached": hit is not None}


def _single_thread_speedup(backend: Backend, arts: dict, feed: dict) -> dict:
    """The chosen artifact against its FP32 baseline again, both on one thread: a second opinion before a build calls
    an artifact slower than FP32 (``timing.slower`` needs both). With every core busy, a runtime's thread pool
    waits on the load (an INT8 graph with many small ops more than its FP32 baseline): the demo's INT8, 1.7x faster
    alone, timed 0.8x beside another build on 2 cores; one thread each sees the artifacts' own cost."""
    with ExitStack() as stack:
        runners = {n: stack.enter_context(open_runner(backend, a, 1)) for n, a in arts.items()}
        _, p50s = timing.latency_interleaved(runners, feed, more=timing.undecided(BASELINE, CHOSEN))
    return timing.speedup(p50s[BASELINE], p50s[CHOSEN])


def _search_key(ctx: BuildContext, backend: Backend, profile: TargetProfile, budget: V.Budget) -> str | None:
    """What an accuracy search's choice depends on; None when it depends on the clock (a whole-build deadline)."""
    if ctx.job.spec.build_max_seconds is not None or ctx.job.judging.evaluator:
        return None
    spec = ctx.job.spec
    return cached("search", inputs={"model": ctx.job.model.content_hash, "calib": ctx.job.calib.content_hash(),
                                    "eval": ctx.job.evalset.content_hash()},
                  config={"profile": profile.to_dict(), "budget": budget.to_dict(),
                          "search": (spec.seed, spec.auto_max_tries, spec.auto_max_seconds), "judging": judging_key(ctx),
                          "inputs": [asdict(i) for i in ctx.job.model.inputs],
                          "runtime": runtime_key(backend, timing_threads(profile))},
                  backend=(backend.name, REFERENCE_BACKEND))  # the search converts, runs and measures sensitivity


def _cached_search(ctx: BuildContext, backend: Backend, profile: TargetProfile, budget: V.Budget, outdir: Path,
                   k: str | None) -> tuple[Attempt, SearchRecord] | None:
    """A warm re-run of a build that searched: the chosen artifact (sha256-verified) and the search record."""
    hit = ctx.work.cache.get_result(k) if k else None
    if hit is None:
        return None
    payload = hit[0]
    for f in list(outdir.iterdir()):
        if f.is_file():
            f.unlink()
    art = ctx.work.cache.get(payload["artifact_key"], outdir)
    if art is None:
        return None
    art.target = profile.name
    data = None
    if payload["data_hash"] != ctx.job.evalset.content_hash():
        from edgebuild.pipeline.stages.selection import split

        data = split(ctx)[1]
        if data[0].content_hash() != payload["data_hash"]:
            return None
    chosen = evaluate(ctx, backend, profile, art, budget, data=data, restored=True)
    chosen.label = payload["label"]
    record = SearchRecord.from_dict(payload["record"])
    record.from_cache = True
    return chosen, record


def _store_search(ctx: BuildContext, k: str | None, chosen: Attempt, search: SearchRecord) -> None:
    if not k or search.time_limit:  # a choice the clock made is not a function of the key: not kept
        return
    art_key = cached("search-choice", inputs={"search": k})
    ctx.work.cache.put(art_key, chosen.artifact)
    ctx.work.cache.put_result(k, {"artifact_key": art_key, "label": chosen.label, "record": search.to_dict(),
                             "data_hash": chosen.data.get("content_hash")})


@dataclass
class Prepared:
    """A target converted and validated, not yet timed (``finish_target`` times it and writes its files)."""

    profile: TargetProfile
    backend: Backend
    budget: V.Budget
    outdir: Path
    chosen: Attempt
    baseline: Attempt | None
    search: SearchRecord | None
    cache_use: CacheUse


def build_target(ctx: BuildContext, profile: TargetProfile, outdir: Path) -> TargetResult:
    """Build, validate and describe one target; raises ConversionError when it cannot be built."""
    return finish_target(ctx, prepare_target(ctx, profile, outdir))


def prepare_target(ctx: BuildContext, profile: TargetProfile, outdir: Path) -> Prepared:
    """Convert (or restore) and validate the target's artifact and its FP32 baseline; safe to run for several
    targets at once (threads)."""
    backend = get_backend(profile.backend)
    backend.check_available(profile.name)
    precision = precision_for(profile, ctx.job.spec)
    budget = budget_for(profile, ctx.job.spec)
    searching = precision is Precision.INT8 and ctx.job.spec.auto
    cache_use = CacheUse()
    chosen, failed, search = None, None, None
    search_key = _search_key(ctx, backend, profile, budget) if searching else None
    restored = _cached_search(ctx, backend, profile, budget, outdir, search_key) if searching else None
    if restored is not None:
        chosen, search = restored
        cache_use = replace(cache_use, search=True)
    else:
        try:
            t0 = time.monotonic()
            with ctx.work.stage(f"{profile.name}: converting to {precision}"):
                made = convert(ctx, backend, profile, precision, outdir, siblings=baseline_dirs(ctx, profile, precision))
            with ctx.work.stage(f"{profile.name}: validating {made.artifact.main}"):
                chosen = evaluate(ctx, backend, profile, made.artifact, budget, restored=made.restored)
            chosen.seconds = time.monotonic() - t0
        except ConversionError as e:  # with the search on, a failed INT8 conversion is where the search starts
            if not searching:
                raise
            failed, failed.seconds = e, time.monotonic() - t0  # how long a try may take: a crash can come late
        if searching:
            from edgebuild.pipeline.stages.search import recover

            chosen, search = recover(ctx, backend, profile, budget, chosen, outdir, first_error=failed)
            _store_search(ctx, search_key, chosen, search)
            cache_use = replace(cache_use, search=False)
    cache_use = replace(cache_use, conversion=chosen.restored, validation=chosen.cached)
    baseline = None
    if precision is not Precision.FP32:
        with ctx.work.stage(f"{profile.name}: FP32 baseline for size and speed ratios"):
            base = convert(ctx, backend, profile, Precision.FP32, baseline_dirs(ctx, profile, precision)[Precision.FP32])
            baseline = (reference_attempt(ctx, base.artifact, budget, base.restored)
                        or evaluate(ctx, backend, profile, base.artifact, budget, restored=base.restored))
        cache_use = cache_use.with_baseline(base.restored, base.sibling_of, baseline.reference, baseline.cached)
    return Prepared(profile, backend, budget, outdir, chosen, baseline, search, cache_use)


def advice_warnings(profile: TargetProfile, budget: V.Budget, chosen: Attempt) -> list[str]:
    """The profile's typical device limits (``advice:``) the shipped artifact exceeds, where the user set no budget of
    their own: a line each for the report, never a failure."""
    a, out = profile.advice, []
    p50, size, peak = chosen.p50_ms, chosen.artifact.size_bytes / 1e6, (chosen.memory or {}).get("peak_mb")
    if a.max_latency_ms is not None and budget.max_latency_ms is None and p50 is not None and p50 > a.max_latency_ms:
        out.append(f"latency p50 {p50:.1f} ms on this host is above {profile.name}'s typical {a.max_latency_ms:g} ms "
                   "(advice; set budgets.max_latency_ms to enforce a limit)")
    if a.max_size_mb is not None and budget.max_size_mb is None and size > a.max_size_mb:
        out.append(f"size {size:.2f} MB is above {profile.name}'s typical {a.max_size_mb:g} MB (advice; set "
                   "budgets.max_size_mb to enforce a limit)")
    if a.max_memory_mb is not None and budget.max_memory_mb is None and peak is not None and peak > a.max_memory_mb:
        out.append(f"runtime memory peak {peak:.1f} MB is above {profile.name}'s typical {a.max_memory_mb:g} MB (advice)")
    return out


def finish_target(ctx: BuildContext, p: Prepared) -> TargetResult:
    """Time the chosen artifact (interleaved with its FP32 baseline) and write the target's files. A parallel
    build runs this one target at a time, after every conversion, so that timing runs on a quiet machine."""
    with ctx.work.stage(f"{p.profile.name}: timing {p.chosen.artifact.main}" + (" and FP32, interleaved" if p.baseline else "")):
        timing = time_artifacts(ctx, p.backend, p.profile, p.chosen, p.baseline, p.budget)
    from edgebuild.pipeline.stages import objective as O

    best, objective = O.pick(O.objective_for(p.profile, ctx.job.spec), p.profile, p.chosen, p.baseline, timing["speedup"])
    if best is not p.chosen:
        p.chosen, timing["speedup"] = O.ship(ctx, p, best), None
    from edgebuild.pipeline.memory import judge_memory

    cache_use = replace(p.cache_use, latency=timing["cached"], memory=judge_memory(ctx, p))
    advice = advice_warnings(p.profile, p.budget, p.chosen)
    if advice:
        objective = replace(objective, advice=advice)
    from edgebuild.pipeline.stages.weights import rename_to_share, weight_share

    share = weight_share(p.chosen.artifact.path, p.backend.name) if p.chosen.artifact.precision == Precision.INT8 else None
    quantized = None if share is None else WeightShare.from_dict(share)
    if rename_to_share(p.chosen.artifact, share) and objective.shipped:
        objective = replace(objective, shipped=p.chosen.artifact.main)
    from edgebuild.pipeline.stages.package import describe

    return describe(ctx, p.profile, p.backend, p.chosen, p.baseline, p.budget, p.outdir, p.search, timing["speedup"],
                    cache_use, objective, quantized)
