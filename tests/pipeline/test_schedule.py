"""The scheduler's work slots: at most ``jobs`` targets at once, their estimated memory peaks within the limit."""
import threading


def _run_targets(slots, names, hold=0.15):
    """Each target in its own thread holds a slot for ``hold`` s; returns the sets of targets that ran at once."""
    import time

    lock, running, seen = threading.Lock(), set(), []

    def work(name):
        slots.bind(name)
        with slots:
            with lock:
                running.add(name)
                seen.append(frozenset(running))
            time.sleep(hold)
            with lock:
                running.discard(name)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return seen


def test_memory_slots_run_fewer_at_once_when_the_estimated_peaks_would_pass_the_limit():
    from edgebuild.pipeline.schedule import GB, MemorySlots

    estimates = {"arm64": 6 * GB, "x86": 5 * GB, "onnx-cpu": 2 * GB}
    slots = MemorySlots(jobs=3, limit=8 * GB, estimates=estimates)
    together = _run_targets(slots, ["arm64", "x86", "onnx-cpu"])
    assert not any({"arm64", "x86"} <= s for s in together), together  # 11 GB > 8 GB: never side by side
    assert max(sum(estimates[n] for n in s) for s in together) <= 8 * GB
    assert slots.peak_reserved <= 8 * GB and slots.waited  # someone waited for memory, and it is said
    assert any(len(s) == 2 for s in together)  # what fits still runs in parallel (onnx-cpu beside one of them)

    roomy = MemorySlots(jobs=3, limit=64 * GB, estimates=estimates)
    assert any(len(s) == 3 for s in _run_targets(roomy, ["arm64", "x86", "onnx-cpu"], hold=0.5))  # no limit reached


def test_a_target_over_the_limit_alone_still_runs_alone_and_jobs_still_bound():
    from edgebuild.pipeline.schedule import GB, MemorySlots

    slots = MemorySlots(jobs=3, limit=1 * GB, estimates={"big": 4 * GB, "a": 0, "b": 0})
    together = _run_targets(slots, ["big", "a", "b"])
    assert all(len(s) == 1 for s in together if "big" in s)  # no deadlock: it runs, by itself
    one = MemorySlots(jobs=1, limit=64 * GB, estimates={})
    assert all(len(s) == 1 for s in _run_targets(one, ["a", "b", "c"]))


def test_estimates_grow_with_the_model_and_the_limit_is_the_flag_or_available_memory_less_a_margin():
    import pytest

    from edgebuild.pipeline.errors import BadInputError
    from edgebuild.pipeline.peaks import estimate_peak
    from edgebuild.pipeline.schedule import GB, MEMORY_MARGIN, _available_memory, memory_limit

    resnet50 = 98 << 20
    assert estimate_peak("openvino", resnet50) == pytest.approx(1090 << 20, rel=0.1)  # measured: 1090 MB
    assert estimate_peak("tflite", resnet50) > estimate_peak("openvino", resnet50) > estimate_peak("onnx", resnet50)
    assert estimate_peak("tflite", 4 << 20) < estimate_peak("tflite", resnet50)
    assert memory_limit(2.5) == int(2.5 * GB)
    assert abs(memory_limit(None) - (_available_memory() - MEMORY_MARGIN)) < 256 << 20
    with pytest.raises(BadInputError):
        memory_limit(0)
