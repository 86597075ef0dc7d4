"""Timing alone on a node (pipeline/batch/turns.py): processes standing for batch cells, each holding the node's
lock for its work and taking it alone for its build's timing stage. No Ray, no build: a few seconds."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from edgebuild.pipeline.batch.turns import MERGE_S, NodeTurns, overlaps


def _cell(lock: str, out: str, stages: list[tuple[str, float]]) -> None:
    """A stand-in cell: each stage busy for its seconds (the CPU really works), through the cell's stage callable."""
    turns = NodeTurns(Path(lock))
    turns.work()
    for text, seconds in stages:
        with turns.stage(text):
            end = time.time() + seconds
            while time.time() < end:
                pass
    turns.close()
    Path(out).write_text(json.dumps(turns.record()))


def _run(tmp_path, plans: dict[str, list[tuple[str, float]]]) -> dict[str, dict]:
    ctx = mp.get_context("fork")
    procs = {n: ctx.Process(target=_cell, args=(str(tmp_path / "node.lock"), str(tmp_path / f"{n}.json"), plan))
             for n, plan in plans.items()}
    for p in procs.values():
        p.start()
    for p in procs.values():
        p.join(60)
        assert p.exitcode == 0
    return {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in plans}


def test_timing_never_overlaps_another_cells_work_and_gets_in_at_its_next_stage(tmp_path):
    long_work = [(f"x86: accuracy search {i}/12", 0.25) for i in range(12)]  # 3 s of work in 12 stages
    short_then_time = [("loading the model", 0.3), ("x86: timing model.xml and FP32, interleaved", 0.6),
                       ("x86: runtime memory", 0.2)]
    rec = _run(tmp_path, {"long": long_work, "timer": short_then_time, "timer2": short_then_time})
    for a in rec:
        for b in rec:
            if a != b:
                assert not overlaps(rec[a]["timing_spans"], rec[b]["work_spans"], slack=MERGE_S), (a, b, rec)
                assert not overlaps(rec[a]["timing_spans"], rec[b]["timing_spans"], slack=MERGE_S), (a, b, rec)
    long_end = max(e for _, e in rec["long"]["work_spans"])
    for t in ("timer", "timer2"):
        (start, end), = rec[t]["timing_spans"]
        assert end - start >= 0.55  # the stage ran inside the span
        assert start < long_end - 1.0, rec  # in at a stage boundary of the long cell, not after its end
    assert len(rec["long"]["work_spans"]) >= 2  # the long cell stood at its gate while the others timed
    assert rec["timer"]["timing_waited_s"] + rec["timer2"]["timing_waited_s"] > 0.2


def _hold_then_hang(lock: str, ready) -> None:
    NodeTurns(Path(lock)).work()
    ready.set()
    time.sleep(60)


def test_a_dead_cells_hold_goes_with_it(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_then_hang, args=(str(tmp_path / "node.lock"), ready))
    holder.start()
    assert ready.wait(20)
    turns = NodeTurns(tmp_path / "node.lock")
    turns.work()
    os.kill(holder.pid, signal.SIGKILL)  # a worker killed mid-build: the node is free again
    t0 = time.time()
    with turns.stage("arm64: timing model.tflite"):
        pass
    turns.close()
    holder.join(10)
    assert time.time() - t0 < 10 and len(turns.timing_spans) == 1


def test_the_build_still_names_its_timing_stage_as_turns_expects():
    """turns.py finds the timing by the stage's text; a renamed stage would silently share the node again."""
    import inspect

    from edgebuild.pipeline.batch.turns import TIMING_STAGE
    from edgebuild.pipeline.stages import per_target

    source = inspect.getsource(per_target.finish_target)
    assert f'stage(f"{{p.profile.name}}{TIMING_STAGE}' in source
    from edgebuild.pipeline.batch.turns import is_timing
    from edgebuild.pipeline.stages import compress

    measuring = [line for line in inspect.getsource(compress).splitlines() if "with stage(" in line and "measuring" in line]
    assert len(measuring) == 2, measuring  # the original model, and each step's result: both time the model
    assert is_timing("compression: measuring the original model") and is_timing("compression step 1/2 (prune): measuring")
    assert not is_timing("compression step 1/2 (prune)") and not is_timing("measuring per-layer INT8 sensitivity")
