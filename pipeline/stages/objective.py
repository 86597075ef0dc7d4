"""Which artifact a target ships: its ``objective`` (profile key, config ``objective:`` overrides) among the
candidates the build made for it.

- ``precision`` (default): the profile's precision, as the accuracy search leaves it — the smallest candidate that
  keeps the task — unless, on a profile with ``host_is_device: true``, it is slower than the FP32 baseline (the
  median of the interleaved rounds' ratios below 1x and a sign test over the rounds at 5 %; rounds are added, up to
  36, while the median says slower and the test cannot yet; and, where the profile runs several threads, the same
  again with one thread each, so the load of a busy host is not called the artifact's): then the FP32 baseline
  ships (a user asked for a faster model). However fast FP32 is: a 0.2 ms model is judged like a 200 ms one. An
  artifact that misses its accuracy budget is not replaced: the build fails on it (the miss is the news).
- ``latency``: the fastest candidate within the accuracy budget; never one slower than the FP32 baseline (the
  speed-up is the median of the interleaved rounds' ratios). Only on profiles with ``host_is_device: true``
  (the host runs the device's runtime, so host latency is the device's); elsewhere the profile's precision
  ships and the record says why.
- ``size``: the smallest candidate within the accuracy budget, even when it is slower than FP32.
- ``accuracy``: the most accurate candidate (lowest quality loss; the FP32 baseline on the reference's runtime).

Candidates: the target's own artifact (INT8, mixed INT8, or what the accuracy search chose) and its FP32 baseline;
ties go to the target's own artifact. Whatever the objective, an artifact slower than its FP32 baseline is said.
"""
from __future__ import annotations

import shutil
from dataclasses import replace

from edgebuild.pipeline import timing
from edgebuild.pipeline.results import ObjectiveDecision
from edgebuild.specs import Precision
from edgebuild.specs import OBJECTIVES, check_objective  # noqa: F401 (re-exported)


def objective_for(profile, spec) -> str:
    return getattr(spec, "objective", None) or profile.objective


def _candidate(a, role: str) -> dict:
    return {"role": role, "artifact": a.artifact.main, "precision": a.artifact.precision,
            "size_bytes": a.artifact.size_bytes, "latency_p50_ms": a.p50_ms,
            "quality_loss": round(a.loss, 4), "within_accuracy_budget": a.quality_ok}


def slower_warning(chosen, speedup: dict | None) -> str | None:
    s = (speedup or {}).get("median")
    if s is None or s >= 1.0 or chosen.artifact.precision == Precision.FP32:
        return None
    return (f"{chosen.artifact.precision.upper()} artifact {chosen.artifact.main} runs slower than the FP32 baseline on "
            f"this host: {s:.2f}× speed (median of {speedup.get('rounds')} interleaved rounds, IQR {speedup.get('iqr')}"
            f"{_one_thread(speedup, '; on one thread each {median}')})")


def _one_thread(speedup: dict, text: str) -> str:
    """``text`` filled with the single-threaded second timing's numbers (median as 0.00×, rounds_not_slower,
    rounds), or nothing where the record has none (timing.slower)."""
    one = (speedup or {}).get("single_thread")
    return text.format(median=f"{one['median']:.2f}×", **{k: v for k, v in one.items() if k != "median"}) if one else ""


def slower(speedup: dict | None) -> bool:
    """Slower than FP32 beyond the timing's noise (``timing.slower``: the median below 1x and the sign test over the
    interleaved rounds)."""
    return timing.slower(speedup)


def pick(objective: str, profile, chosen, baseline, speedup: dict | None) -> tuple[object, ObjectiveDecision]:
    """(the Attempt to ship, the decision for validation.json/manifest: objective, candidates, shipped, why)."""
    best, record = _pick(objective, profile, chosen, baseline, speedup)
    return best, ObjectiveDecision(objective, record["candidates"], record["warnings"], best.artifact.main, record["why"],
                                   record.get("overruled"))


def _pick(objective: str, profile, chosen, baseline, speedup: dict | None) -> tuple[object, dict]:
    record = {"candidates": [], "warnings": []}
    warning = slower_warning(chosen, speedup)
    if warning:
        record["warnings"].append(warning)
    if objective == "precision":
        if (baseline is not None and profile.host_is_device and chosen.artifact.precision != Precision.FP32
                and slower(speedup) and baseline.quality_ok and chosen.quality_ok):
            record["candidates"] = [_candidate(chosen, "target"), _candidate(baseline, "fp32 baseline")]
            why = (f"{chosen.artifact.main} is slower than the FP32 baseline on this host ({speedup['median']:.2f}× speed"
                   f"{_one_thread(speedup, ', {median} on one thread')}, host_is_device): the FP32 baseline ships; "
                   "`objective: size` ships the smaller, slower one")
            record["warnings"].append(f"default objective: shipped {baseline.artifact.main} instead of "
                                      f"{chosen.artifact.main} ({speedup['median']:.2f}× the FP32 speed)")
            return baseline, {**record, "why": why, "overruled": True}
        why = "the profile's precision (objective: precision)"
        if baseline is not None and profile.host_is_device and speedup is not None:
            why += (f", not slower than FP32 beyond the timing's noise (median {speedup.get('median', 0):.2f}×, "
                    f"{speedup.get('rounds_not_slower', '?')} of {speedup.get('rounds')} rounds at or above 1×"
                    f"{_one_thread(speedup, '; on one thread {median}, {rounds_not_slower} of {rounds} rounds')})")
        return chosen, {**record, "why": why}
    if baseline is None:
        return chosen, {**record, "why": "no FP32 baseline to choose from"}
    record["candidates"] = [_candidate(chosen, "target"), _candidate(baseline, "fp32 baseline")]
    if objective == "latency" and not profile.host_is_device:
        return chosen, {**record, "why": f"objective latency not applied: {profile.name}'s host timing is not the device's "
                               "(host_is_device: false); the profile's precision ships"}
    ok = [a for a in (chosen, baseline) if a.quality_ok]
    if not ok:
        return chosen, {**record, "why": "no candidate meets the accuracy budget; the profile's precision ships (and fails)"}
    s = (speedup or {}).get("median")
    if objective == "latency":
        faster = chosen.quality_ok and (s is None or s >= 1.0)
        best = chosen if faster else baseline
        if faster:
            why = (f"{chosen.artifact.main} is not slower than FP32 ({s:.2f}×)" if s is not None else
                   f"{chosen.artifact.main}: no speed-up measured, so nothing shows it slower than FP32")
        elif chosen.quality_ok:
            why = f"{chosen.artifact.main} is slower than the FP32 baseline ({s:.2f}× speed): the FP32 baseline ships"
        else:
            why = f"{chosen.artifact.main} exceeds the accuracy budget: the FP32 baseline ships"
    else:
        measure = (lambda a: a.artifact.size_bytes) if objective == "size" else (lambda a: a.loss)
        best = min(ok, key=measure)  # min keeps the first (the target's own) on a tie
        why = f"the {'smallest' if objective == 'size' else 'most accurate'} candidate within the accuracy budget"
    return best, {**record, "why": why}


def ship(ctx, p, best):
    """The Attempt that ships from ``p.outdir``: the FP32 baseline's files replace the target's own artifact (its
    checks, ``Attempt.assessment``, follow from the shipped files)."""
    if best is p.chosen:
        return p.chosen
    for f in p.chosen.artifact.files:
        (p.outdir / f).unlink(missing_ok=True)
    for f in best.artifact.files:
        shutil.copyfile(best.artifact.directory / f, p.outdir / f)
    art = replace(best.artifact, directory=p.outdir, target=p.profile.name, notes=list(best.artifact.notes))
    return replace(best, artifact=art, label=f"FP32 baseline, shipped for objective {objective_for(p.profile, ctx.job.spec)}")
