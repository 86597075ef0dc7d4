"""Measured conversion peaks (pipeline/peaks.py): a target's children are measured, recorded for the next build of
the same model, and the scheduler uses the recorded number instead of the model-size estimate."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

MB = 1 << 20
# a child that starts a grandchild; each holds ``n`` MB written (resident), says "ready", and waits for stdin
HOLD = r"""
import subprocess, sys
n = int(sys.argv[1])
kid = None
if len(sys.argv) > 2:
    kid = subprocess.Popen([sys.executable, "-c", "import sys; b = b'\x01' * (%d << 20); print('ready', flush=True); sys.stdin.read()" % int(sys.argv[2])],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    kid.stdout.readline()
b = b'\x01' * (n << 20)
print("ready", flush=True)
sys.stdin.read()
if kid:
    kid.stdin.close(); kid.wait()
"""


def _hold(*mb):
    p = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, mb)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_the_meter_sums_a_targets_children_and_their_children_and_ignores_others():
    from edgebuild import procs
    from edgebuild.pipeline.peaks import Meter

    owned = []

    def target_thread():  # a target's thread: what it starts counts for it
        procs.set_owner("x86")
        p = _hold(150, 100)  # 150 MB in the child, 100 MB in its own child
        procs.track(p.pid)
        owned.append(p)

    stranger = _hold(300)  # started by a thread that works for no target
    procs.track(stranger.pid)
    t = threading.Thread(target=target_thread)
    t.start()
    t.join()
    try:
        with Meter(period=0.05) as meter:
            import time

            time.sleep(0.3)
    finally:
        for p in (*owned, stranger):
            p.stdin.close()
            p.wait(timeout=30)
            procs.forget(p.pid)
    assert set(meter.peaks) == {"x86"}  # the stranger counts for no target
    assert 250 * MB <= meter.peaks["x86"] < 400 * MB, meter.peaks  # both processes, summed
    assert meter.main_peak > 0 and "x86" not in meter.converted  # no converter child (named convert:...) ran
    assert procs.owners() == {}  # forgotten with the process


def _ctx(cache, model="a" * 64, calib=300):
    return SimpleNamespace(job=SimpleNamespace(model=SimpleNamespace(content_hash=model), calib=[0] * calib),
                           work=SimpleNamespace(cache=cache))


def test_a_measured_peak_is_recorded_once_and_schedules_the_next_build_of_the_same_model(tmp_path, caplog):
    from edgebuild.pipeline.cache_store import open_cache
    from edgebuild.pipeline.peaks import Meter, estimates, record
    from edgebuild.pipeline.peaks import estimate_peak

    cache = open_cache(tmp_path / "cache")
    profiles = [SimpleNamespace(name="x86", backend="openvino"), SimpleNamespace(name="onnx-cpu", backend="onnx")]
    first = estimates(_ctx(cache), profiles, 98 * MB)  # nothing measured yet: the model-size estimate
    assert first == {"x86": (estimate_peak("openvino", 98 * MB), "model size"),
                     "onnx-cpu": (estimate_peak("onnx", 98 * MB), "model size")}
    meter = Meter()
    meter.peaks, meter.converted = {"x86": 700 * MB, "onnx-cpu": 300 * MB}, {"x86"}  # onnx-cpu came from the cache
    with caplog.at_level(logging.INFO, logger="edgebuild.schedule"):
        assert record(_ctx(cache), profiles, meter, first) == {"x86": True, "onnx-cpu": False}
    assert "x86: scheduled by" in caplog.text and "700 MB measured, recorded for the next build" in caplog.text
    second = estimates(_ctx(cache), profiles, 98 * MB)
    assert second["x86"] == (700 * MB, "measured") and second["onnx-cpu"][1] == "model size"
    meter.peaks["x86"] = 900 * MB  # a later build measures again but the record stays (written once)
    assert record(_ctx(cache), profiles, meter, second)["x86"] is False
    assert estimates(_ctx(cache), profiles, 98 * MB)["x86"] == (700 * MB, "measured")
    # another model, or the same model with another number of calibration samples: its own record
    assert estimates(_ctx(cache, model="b" * 64), profiles, 98 * MB)["x86"][1] == "model size"
    assert estimates(_ctx(cache, calib=50), profiles, 98 * MB)["x86"][1] == "model size"
    off = open_cache(None)  # --no-cache: nothing read, nothing written
    assert record(_ctx(off), profiles, meter, first) == {"x86": False, "onnx-cpu": False}
    assert estimates(_ctx(off), profiles, 98 * MB)["x86"][1] == "model size"


@pytest.mark.slow
def test_a_real_build_measures_its_converter_and_the_next_build_schedules_by_it(tmp_path, caplog):
    from edgebuild.pipeline.build import build
    from edgebuild.pipeline.spec import BuildSpec

    def run(out):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="edgebuild.schedule"):
            build(BuildSpec.from_dict({"targets": ["onnx-cpu"], "out": str(tmp_path / out), "auto": False,
                                       "cache_dir": str(tmp_path / "cache")}))
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("onnx-cpu: scheduled")]

    first = run("a")
    assert len(first) == 1 and "(model size)" in first[0] and "recorded for the next build" in first[0], first
    measured = int(first[0].split("children's peak ")[1].split(" MB")[0])
    assert 50 < measured < 4000  # a spawned Python with ONNX Runtime's quantizer: tens to hundreds of MB
    second = run("b")
    assert second and f"scheduled by {measured} MB (measured)" in second[0], second


def test_the_memory_benchmark_reads_the_lines_a_build_logs(tmp_path, caplog):
    """scripts/benchmark_memory.py reads what each target was scheduled by and measured from build.log."""
    import importlib.util
    from pathlib import Path

    from edgebuild.pipeline.cache_store import open_cache
    from edgebuild.pipeline.peaks import Meter, record

    spec = importlib.util.spec_from_file_location(
        "benchmark_memory", Path(__file__).resolve().parents[2] / "scripts" / "benchmark_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    profiles = [SimpleNamespace(name="arm64", backend="tflite"), SimpleNamespace(name="x86", backend="openvino")]
    meter = Meter()
    meter.peaks, meter.converted = {"arm64": 2649 * MB}, {"arm64"}
    with caplog.at_level(logging.INFO, logger="edgebuild.schedule"):
        record(_ctx(open_cache(tmp_path / "c")), profiles, meter, {"arm64": (1379 * MB, "model size"),
                                                                   "x86": (844 * MB, "measured")})
    (tmp_path / "build.log").write_text("".join(f"12:00:00 [info] {r.name}: {r.getMessage()}\n" for r in caplog.records))
    assert bench.schedule_lines(tmp_path) == {
        "arm64": {"scheduled_mb": 1379, "source": "model size", "measured_mb": 2649},
        "x86": {"scheduled_mb": 844, "source": "measured", "measured_mb": None}}
