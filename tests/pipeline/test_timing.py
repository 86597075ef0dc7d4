"""pipeline/timing.py: `edgebuild validate` times an artifact in rounds, as a build does (no timed assertions)."""
from __future__ import annotations

from edgebuild.pipeline import timing


class CountingRunner:
    def __init__(self):
        self.calls = []

    def time_ms(self, feed, warmup, runs, budget_s):
        self.calls.append((warmup, runs))
        return [2.0 + 0.01 * i for i in range(runs)]

    def threads_used(self):
        return 1


class OneFeed:
    def feed(self, i):
        return {"x": 0}


def test_validate_latency_is_timed_in_rounds():
    r = CountingRunner()
    lat = timing.latency(r, OneFeed())
    assert len(r.calls) == 1 + timing.ROUNDS  # a sizing probe after the warm-up, then the rounds
    assert r.calls[0][0] == timing.WARMUP and all(w == 0 for w, _ in r.calls[1:])
    assert lat["rounds"] == timing.ROUNDS and lat["runs"] == timing.ROUNDS * lat["runs_per_round"]
    assert set(lat["round_p50_ms"]) == {"min", "max", "iqr"} and "interleaved_with" not in lat
