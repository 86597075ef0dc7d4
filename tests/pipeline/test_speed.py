"""Speed without dishonesty: a warm re-run does no conversion, evaluation, search or timing (every result comes
from the verified stage cache and the manifest says so); latency is interleaved with the FP32 baseline."""
import json

import numpy as np
import pytest

from edgebuild.pipeline import timing
from edgebuild.pipeline.build import build
from edgebuild.pipeline.cache import StageCache
from edgebuild.pipeline.spec import BuildSpec
from edgebuild.pipeline.stages import validate as V


class Calls:
    def __init__(self, monkeypatch):
        import edgebuild.pipeline.stages.search as recover
        import edgebuild.targets.onnx as onnx_backend

        self.counts = {"convert": 0, "collect": 0, "timing": 0, "search": 0}
        for owner, name, what in ((onnx_backend.OnnxBackend, "convert", "convert"), (V, "collect", "collect"),
                                  (timing, "latency_interleaved", "timing"), (recover, "recover", "search")):
            monkeypatch.setattr(owner, name, self._counting(getattr(owner, name), what))

    def _counting(self, fn, what):
        def wrapped(*a, **k):
            self.counts[what] += 1
            return fn(*a, **k)
        return wrapped


def _cache_use(target: dict) -> dict:
    """The target's cache record for conversion, validation, search and latency (runtime memory has its own tests)."""
    return {k: v for k, v in target["cache"].items() if k != "memory"}


@pytest.fixture
def spec(tmp_path):
    return BuildSpec(targets=("onnx-cpu",), out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))


@pytest.mark.slow
def test_warm_rerun_converts_evaluates_searches_and_times_nothing(spec, monkeypatch):
    cold = build(spec).manifest
    assert cold["exit_code"] == 0
    t = cold["targets"]["onnx-cpu"]
    assert _cache_use(t) == {"search": False, "conversion": False, "validation": False, "baseline_conversion": False,
                          "baseline_validation": "the reference", "latency": False}
    assert cold["cache"]["reference_outputs"] is False

    calls = Calls(monkeypatch)
    warm = build(spec).manifest
    assert calls.counts == {"convert": 0, "collect": 0, "timing": 0, "search": 0}
    w = warm["targets"]["onnx-cpu"]
    assert warm["cache"]["reference_outputs"] is True
    assert _cache_use(w) == {"search": True, "conversion": True, "validation": True, "baseline_conversion": True,
                          "baseline_validation": "the reference", "latency": True}
    assert w["search"]["from_cache"] is True
    for k in ("metrics", "latency", "ratios", "files", "verdict", "artifact"):
        assert w[k] == t[k], k  # the same numbers as the cold build that measured them


@pytest.mark.slow
def test_latency_is_interleaved_with_the_baseline_and_reports_its_spread(spec):
    t = build(spec).manifest["targets"]["onnx-cpu"]
    rounds = t["latency"]["rounds"]  # more rounds only when the median says slower and the sign test cannot tell yet
    assert t["latency"]["interleaved_with"] == ["fp32"] and timing.ROUNDS <= rounds <= timing.MAX_ROUNDS
    assert t["baseline_fp32"]["latency"]["interleaved_with"] == ["chosen"]
    spread = t["ratios"]["speedup_vs_fp32_spread"]
    assert spread["p25"] <= spread["median"] <= spread["p75"] and spread["rounds"] == rounds
    assert t["ratios"]["speedup_vs_fp32"] == spread["median"]
    assert t["threads"]["used"] <= timing.host_cores() and t["threads"]["used"] <= t["threads"]["profile"]
    assert t["latency"]["threads_profile"] == t["threads"]["profile"]


def test_result_entries_are_verified_and_a_tampered_one_is_dropped(tmp_path):
    cache = StageCache(tmp_path)
    arrays = {"output_0": np.arange(6, dtype=np.float32).reshape(3, 2)}
    assert cache.put_result("k1", {"metrics": {"cosine": 0.99}}, arrays)
    payload, got = cache.get_result("k1")
    assert payload == {"metrics": {"cosine": 0.99}} and np.array_equal(got["output_0"], arrays["output_0"])

    meta = json.loads((tmp_path / "k1" / "result.json").read_text())
    meta["payload"]["metrics"]["cosine"] = 1.0  # edited by hand: no longer matches its sha256
    (tmp_path / "k1" / "result.json").write_text(json.dumps(meta))
    assert cache.get_result("k1") is None and not (tmp_path / "k1").exists() and "k1" in cache.rejected

    cache.put_result("k2", {"x": 1}, arrays)
    with open(tmp_path / "k2" / "arrays.npz", "ab") as f:
        f.write(b"junk")  # arrays changed: the recorded sha256 no longer holds
    assert cache.get_result("k2") is None and not (tmp_path / "k2").exists()
    assert StageCache(None).get_result("k1") is None and not StageCache(None).put_result("k1", {})


def test_speedup_spread_is_the_median_of_per_round_ratios():
    s = timing.speedup([2.0, 2.0, 3.0, 2.0], [1.0, 1.0, 1.0, 2.0])
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["rounds"] == 4
    assert s["iqr"] == pytest.approx(s["p75"] - s["p25"])


def _comparable(manifest: dict) -> dict:
    """A manifest without what differs from run to run (times, timings)."""
    drop = {"seconds", "created", "latency", "ratios", "baseline_fp32", "cache", "search", "notes", "memory", "objective"}
    return {n: {**{k: v for k, v in t.items() if k not in drop}, "shipped": t.get("objective", {}).get("shipped")}
            for n, t in manifest["targets"].items()}


@pytest.mark.slow
def test_parallel_build_writes_what_a_sequential_one_writes(tmp_path):
    specs = [BuildSpec(targets=("onnx-cpu", "jetson-orin"), out=str(tmp_path / f"out{j}"), cache=False)
             for j in (1, 2)]
    seq, par = build(specs[0], jobs=1).manifest, build(specs[1], jobs=2).manifest
    assert list(par["targets"]) == list(seq["targets"]) == ["onnx-cpu", "jetson-orin"]
    assert _comparable(par) == _comparable(seq) and par["exit_code"] == seq["exit_code"] == 0
    for name in ("onnx-cpu", "jetson-orin"):
        assert par["targets"][name]["search"]["chosen"] == seq["targets"][name]["search"]["chosen"]


def test_jobs_are_bounded_by_targets_and_memory(monkeypatch):
    import edgebuild.pipeline.schedule as B

    monkeypatch.setattr(B, "_available_memory", lambda: 64 << 30)
    assert B.effective_jobs(None, 3) == min(timing.host_cores(), 3) and B.effective_jobs(8, 2) == 2
    monkeypatch.setattr(B, "_available_memory", lambda: 4 << 30)  # memory bounds the running targets' estimated
    assert B.effective_jobs(8, 3) == 3 and B.memory_limit(None) == 3 << 30  # peaks (MemorySlots, test_schedule.py)


class _NoisyRunner:
    """A runner whose calls take ``ms`` times a load factor shared by the round (a loaded host), plus its own jitter."""

    def __init__(self, ms: float, load, seed: int):
        self.ms, self.load, self.rng = ms, load, np.random.default_rng(seed)

    def time_ms(self, feed, warmup, runs, pause):
        return list(self.ms * self.load() * self.rng.lognormal(0.0, 0.06, runs))

    def threads_used(self):
        return 1


def _loaded_host(seed: int = 0):
    """The load factor of a round: both artifacts of a round share it (they run back to back), rounds differ."""
    rng, calls, factor = np.random.default_rng(seed), [0], [1.0]

    def load():
        if calls[0] % 2 == 0:
            factor[0] = float(rng.uniform(0.7, 1.6))
        calls[0] += 1
        return factor[0]
    return load


def test_a_steady_small_slowdown_on_a_loaded_host_gets_more_rounds_and_is_called_slower():
    load = _loaded_host()
    runners = {"fp32": _NoisyRunner(10.0, load, 1), "chosen": _NoisyRunner(10.0 / 0.93, load, 2)}
    _, p50s = timing.latency_interleaved(runners, {}, more=timing.undecided("fp32", "chosen"))
    s = timing.speedup(p50s["fp32"], p50s["chosen"])
    assert s["median"] < 1.0 and timing.slower(s), s
    first = timing.speedup(p50s["fp32"][:timing.ROUNDS], p50s["chosen"][:timing.ROUNDS])
    assert len(p50s["fp32"]) > timing.ROUNDS or timing.slower(first)  # extended unless 12 rounds already decided


def test_an_equally_fast_artifact_is_not_called_slower_and_a_faster_one_takes_no_extra_rounds():
    for seed in range(5):
        load = _loaded_host(seed)
        same = {"fp32": _NoisyRunner(10.0, load, 10 + seed), "chosen": _NoisyRunner(10.0, load, 20 + seed)}
        _, p50s = timing.latency_interleaved(same, {}, more=timing.undecided("fp32", "chosen"))
        assert not timing.slower(timing.speedup(p50s["fp32"], p50s["chosen"]))
        assert len(p50s["fp32"]) <= timing.MAX_ROUNDS and len(p50s["fp32"]) % timing.ROUNDS == 0
    load = _loaded_host(9)
    fast = {"fp32": _NoisyRunner(10.0, load, 1), "chosen": _NoisyRunner(5.0, load, 2)}
    _, p50s = timing.latency_interleaved(fast, {}, more=timing.undecided("fp32", "chosen"))
    assert len(p50s["fp32"]) == timing.ROUNDS


def test_the_sign_test_and_the_rule_for_records_without_it():
    assert timing.sign_test(0, 12) == pytest.approx(1 / 4096) and timing.sign_test(12, 12) == 1.0
    assert timing.slower({"median": 0.93, "p_slower": 0.01}) and not timing.slower({"median": 0.93, "p_slower": 0.03})
    assert not timing.slower({"median": 1.02, "p_slower": 0.0})
    assert timing.slower({"median": 0.9, "p75": 0.95}) and not timing.slower({"median": 0.9, "p75": 1.05})
