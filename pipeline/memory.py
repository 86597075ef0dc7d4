"""Runtime memory of an artifact: the peak resident memory its runtime needs to load it and run it.

How it is measured (one extra child process per artifact, through ``targets/isolated.py``; the probe inside the
child is ``targets/memory_probe.py``):

1. a spawned child imports Python, numpy, edgebuild's backend module and the runtime's own modules
   (``Backend.runtime_modules``, else ``Backend.requires``), then reads its resident set (``VmRSS``) — the
   *baseline* — and resets the kernel's peak counter (``echo 5 > /proc/self/clear_refs``);
2. it loads the artifact with the backend's runner (the same one validation uses: threads, kernels, delegates)
   and runs the first evaluation feed ``RUNS`` times;
3. ``peak_mb`` = peak resident set since the reset (``VmHWM``) minus the baseline: the model's weights as the
   runtime holds them, its arena/activations, delegate and kernel buffers, code pages first touched by loading
   and running, and the feed/outputs (kilobytes). ``load_mb`` = resident set after loading, minus the baseline.

MB here are 10^6 bytes (like ``max_size_mb``). Where the kernel cannot reset the peak (not Linux), the peak
since the child started is used, which can only over-state.
"""
from __future__ import annotations

RUNS = 3  # inferences after loading: the first one allocates lazily (XNNPACK packs weights, ORT plans memory)
MB = 1e6


def measure(backend: str, artifact, threads: int, feed: dict, runs: int = RUNS, opener: str = "") -> dict:
    """Peak memory of loading ``artifact`` and running ``feed`` ``runs`` times, in a child of its own."""
    from edgebuild.targets.served import IsolatedRunner

    with IsolatedRunner(backend, artifact, threads, opener=opener, memory=True) as runner:
        loaded = runner.memory()
        for _ in range(runs):
            runner.run(feed)
        after = runner.memory()
    base = after["baseline_bytes"]
    out = {"peak_mb": round((after["peak_bytes"] - base) / MB, 3),
           "load_mb": round((loaded["rss_bytes"] - base) / MB, 3),
           "baseline_mb": round(base / MB, 3), "runs": runs, "threads": threads,
           "method": "child process: VmHWM (peak reset after importing the runtime) minus VmRSS at that point"
           if after["peak_reset"] else "child process: peak RSS since start minus RSS after importing the runtime"}
    if after.get("runtime"):
        out["runtime"] = after["runtime"]
    return out


def measure_target(ctx, backend, profile, attempts: dict) -> bool:
    """Measure each attempt's artifact (``{"chosen": Attempt, "fp32": Attempt | None}``) into ``attempt.memory``;
    cached as a result entry keyed by the artifact's sha256, the feed, the runtime, threads and host. Returns
    True when every number came from the cache."""
    from edgebuild.pipeline.cache import cached
    from edgebuild.pipeline.stages.candidate import array_hash, artifact_hash, json_round_trip, runtime_key, timing_threads

    threads = timing_threads(profile)
    feed = ctx.job.evalset.feed(0)
    all_cached = True
    for attempt in (a for a in attempts.values() if a is not None):
        k = cached("memory", inputs={"artifact": artifact_hash(attempt.artifact),
                                     "feed": {n: array_hash(v) for n, v in sorted(feed.items())}},
                   config={"runs": RUNS, "runtime": runtime_key(backend, threads)}, backend=backend.name)
        hit = ctx.work.cache.get_result(k)
        if hit is not None:
            attempt.memory = hit[0]
            continue
        all_cached = False
        record = measure(backend.name, attempt.artifact, threads, feed)
        ctx.work.cache.put_result(k, record)
        attempt.memory = json_round_trip(record)
    return all_cached


def micro_fit(ctx, backend, artifact) -> tuple[dict, bool]:
    """Arena, flash and the microcontroller runtime's agreement with the host runtime on the first evaluation samples
    (the backend's ``micro()``: TFLM for TFLite, targets/tflite/tflm.py), cached as a result entry by the artifact's
    sha256, the samples and the microcontroller runtime's version. Returns (record, from cache)."""
    from edgebuild.pipeline.cache import cached
    from edgebuild.pipeline.stages.candidate import array_hash, artifact_hash, json_round_trip, open_runner

    micro = backend.micro()
    version = micro.installed_version(artifact.target)
    feeds = [ctx.job.evalset.feed(i) for i in range(min(micro.SAMPLES, len(ctx.job.evalset)))]
    k = cached("micro", inputs={"artifact": artifact_hash(artifact),
                                "feeds": [{n: array_hash(v) for n, v in sorted(f.items())} for f in feeds]},
               config={"micro_runtime": version}, backend=backend.name)
    hit = ctx.work.cache.get_result(k)
    if hit is not None:
        return hit[0], True
    with open_runner(backend, artifact, 1) as r:
        host = [r.run(f) for f in feeds]
    record = micro.micro_fit(artifact, feeds, host, version)
    ctx.work.cache.put_result(k, record)
    return json_round_trip(record), False


def judge_memory(ctx, p) -> dict:
    """A prepared target's runtime memory (its artifact and the FP32 baseline), its microcontroller fit when the
    profile says ``micro: true`` (targets/tflite/tflm.py), into the attempts' measurements (their checks follow from them,
    ``Attempt.assessment``). Returns what came from the cache."""
    with ctx.work.stage(f"{p.profile.name}: runtime memory"):
        cached = {"memory": measure_target(ctx, p.backend, p.profile, {"chosen": p.chosen, "fp32": p.baseline})}
    if p.profile.micro:
        with ctx.work.stage(f"{p.profile.name}: TensorFlow Lite Micro arena and flash"):
            p.chosen.memory["micro"], cached["micro"] = micro_fit(ctx, p.backend, p.chosen.artifact)
    return cached


def after_packaging(chosen) -> None:
    """The flash a microcontroller needs is the shipped file, metadata embedded by packaging included: measured
    again on it (the attempt's checks follow from it)."""
    micro = chosen.memory.get("micro")
    if not micro:
        return
    from edgebuild.targets.base import get_backend

    micro.update(get_backend(chosen.artifact.backend).micro().flash(chosen.artifact))
