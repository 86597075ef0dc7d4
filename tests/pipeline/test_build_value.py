"""A build is a value (issue 21, items 6 and 7): everything it needs is passed in, nothing process-wide changes while
it runs, builds side by side in threads of one process give what each gives alone, and a target's result does not
depend on the order targets are built in."""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgebuild.errors import BadInputError
from edgebuild.procs import Children, Patch, Scope, bound, current, entered, patched, tempdir

# What a manifest holds that is not a function of the build's inputs: clocks, this run's paths, the stage cache's
# history. Everything else (verdicts, artifacts and their sha256, settings, metrics, search records) must be equal.
UNTIMED = {"created", "seconds", "cwd", "latency", "memory", "speedup_vs_fp32", "speedup_vs_fp32_spread", "cache",
           "source", "out", "calib", "eval", "objective"}


def comparable(manifest: dict):
    def scrub(v):
        if isinstance(v, dict):
            return {k: scrub(x) for k, x in v.items() if k not in UNTIMED}
        if isinstance(v, list):
            return [scrub(x) for x in v]
        return v
    return json.loads(json.dumps(scrub(manifest), sort_keys=True, default=str))


def differences(a, b, path="") -> list[str]:
    """Where two comparable manifests differ (paths and both values), for the assertion's message."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:200]} != {str(b)[:200]}"]


# ---- the pieces ----------------------------------------------------------------------------------------------------


def test_patches_are_data_applied_and_restored_whatever_way_the_block_ends(monkeypatch):
    monkeypatch.delenv("EDGEBUILD_PATCH_PROBE", raising=False)
    import json as victim

    real_dumps = victim.dumps
    patches = [Patch("sys.modules", "edgebuild_absent_probe", None, why="made unimportable"),
               Patch("os.environ", "EDGEBUILD_PATCH_PROBE", "1", why="an environment switch"),
               Patch("json", "dumps", wrap=lambda real: lambda *a, **k: "patched:" + real(*a, **k), why="a wrapper"),
               Patch("json:JSONDecoder", "edgebuild_probe", 7, why="a class attribute that did not exist")]
    with pytest.raises(RuntimeError), patched(patches):
        assert sys.modules["edgebuild_absent_probe"] is None and os.environ["EDGEBUILD_PATCH_PROBE"] == "1"
        assert victim.dumps(1) == "patched:1" and victim.JSONDecoder.edgebuild_probe == 7
        with pytest.raises(ImportError):
            import edgebuild_absent_probe  # noqa: F401
        raise RuntimeError("the block fails")
    assert "edgebuild_absent_probe" not in sys.modules and "EDGEBUILD_PATCH_PROBE" not in os.environ
    assert victim.dumps is real_dumps and not hasattr(victim.JSONDecoder, "edgebuild_probe")


def test_a_scope_reaches_the_threads_a_build_starts_and_no_other_build(tmp_path):
    a, b = Scope(scratch=tmp_path / "a"), Scope(scratch=tmp_path / "b", env={"X": "1"})
    seen, system_tempdir = {}, tempfile.tempdir

    def build(name, scope):
        with entered(scope), ThreadPoolExecutor(2) as pool:  # a build's own worker threads
            seen[name] = [f.result() for f in [pool.submit(bound(tempdir)) for _ in range(3)]] + [tempdir()]
            seen[name + "-env"] = current().child_env()

    threads = [threading.Thread(target=build, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen["a"] == [str(tmp_path / "a")] * 4 and seen["b"] == [str(tmp_path / "b")] * 4
    assert seen["a-env"]["TMPDIR"] == str(tmp_path / "a") and "X" not in seen["a-env"]
    assert seen["b-env"]["X"] == "1" and seen["b-env"]["HF_HUB_OFFLINE"] == "1"
    assert tempdir() is None and tempfile.tempdir == system_tempdir  # outside a build: the system's, never changed


def _child_env(names):  # runs in a child process (targets/isolated.py)
    import tempfile as t

    return {**{n: os.environ.get(n) for n in names}, "tempdir": t.gettempdir()}


def test_a_builds_children_get_its_scratch_and_environment_and_its_process_keeps_its_own(tmp_path):
    from edgebuild.targets.isolated import run_isolated

    with entered(Scope(scratch=tmp_path, env={"EDGEBUILD_PROBE": "7"})):
        seen = run_isolated(_child_env, ("EDGEBUILD_PROBE", "HF_HUB_OFFLINE", "DO_NOT_TRACK"), 120)
    assert seen == {"EDGEBUILD_PROBE": "7", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "tempdir": str(tmp_path)}
    assert "EDGEBUILD_PROBE" not in os.environ


def test_an_interrupted_build_kills_its_own_children_and_no_other_builds(tmp_path):
    import subprocess

    mine, theirs = Children(), Children()
    procs = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2)]
    mine.track(procs[0].pid)
    theirs.track(procs[1].pid)
    try:
        mine.kill_all()
        assert procs[0].wait(10) == -signal.SIGKILL
        time.sleep(0.2)
        assert procs[1].poll() is None, "another build's child was killed"
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_stage_output_is_shared_by_key_and_one_cut_short_by_the_clock_is_not():
    from edgebuild.pipeline.stages.context import Memo

    memo, made = Memo(), []

    def make(value, keep):
        def run():
            time.sleep(0.05)
            made.append(value)
            return value, keep
        return run

    with ThreadPoolExecutor(4) as pool:  # four targets asking for one key at once: one measurement
        assert set(pool.map(lambda _: memo.get("k", make("full", True)), range(4))) == {"full"}
    assert made == ["full"]
    assert memo.get("t", make("partial", False)) == "partial" and memo.get("t", make("again", True)) == "again"


def test_a_spec_names_a_python_object_model_as_such_and_building_it_from_the_spec_alone_says_so():
    torch = pytest.importorskip("torch")
    from edgebuild.pipeline import api
    from edgebuild.pipeline.spec import BuildSpec
    from edgebuild.pipeline.stages.load import load_model

    class Net(torch.nn.Module):
        def forward(self, x):
            return x * 2

    models: dict = {}
    ref = api._model_source(Net(), Path("."), models)
    assert ref == f"python-object:{__name__}.test_a_spec_names_a_python_object_model_as_such_and_building_it_from_" \
                  "the_spec_alone_says_so.<locals>.Net"
    assert list(models) == [ref] and not [k for k in vars(api) if k.startswith("live_")]
    spec = BuildSpec.from_dict({"model": ref, "inputs": [{"name": "x", "shape": [1, 3]}]})
    assert load_model(spec, models).module is models[ref]
    with pytest.raises(BadInputError, match=r"a Python object handed to edgebuild.build\(model=...\).*re-run that "
                                            r"build from Python"):
        load_model(spec)


# ---- whole builds --------------------------------------------------------------------------------------------------


def _tiny(kind: str):
    import torch

    torch.manual_seed(0 if kind == "conv" else 1)
    if kind == "conv":
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(64, 3)).eval()
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Tanh(),
                               torch.nn.Linear(12, 5)).eval()


def _api_build(kind: str, out: Path, net=None):
    from edgebuild import build

    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 1, 4, 4)).astype(np.float32)
    return build(model=_tiny(kind) if net is None else net, input_shape=(1, 1, 4, 4), calib=x[:24], eval=x[24:], targets=["onnx-cpu"],
                 out=str(out), cache=False, budgets={"cosine_min": 0.9})


def _process_state() -> dict:
    from edgebuild.pipeline import api

    return {"tempdir": tempfile.tempdir, "environ": dict(os.environ),
            "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
            "api": sorted(vars(api)), "telemetry": sys.modules.get("openvino_telemetry", "absent")}


@pytest.mark.slow
def test_two_builds_in_threads_of_one_process_give_what_each_gives_alone(tmp_path):
    alone = {k: _api_build(k, tmp_path / f"alone-{k}") for k in ("conv", "mlp")}
    before, changes, running = _process_state(), [], threading.Event()
    before["environ"].pop("ORT_DISABLE_TELEMETRY", None)  # the one one-way switch (pipeline/offline.py), set above

    def watch():  # nothing process-wide may change while the builds run
        while not running.is_set():
            time.sleep(0.01)
        while running.is_set():
            now = _process_state()
            now["environ"].pop("ORT_DISABLE_TELEMETRY", None)
            if now != before:
                changes.append({k: now[k] for k in now if now[k] != before[k]})
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    running.set()
    nets = {k: _tiny(k) for k in ("conv", "mlp")}  # made here: torch's random generator is the process's own
    try:
        with ThreadPoolExecutor(2) as pool:
            together = dict(zip(("conv", "mlp"), pool.map(lambda k: _api_build(k, tmp_path / f"together-{k}", nets[k]),
                                                         ("conv", "mlp"))))
    finally:
        running.clear()
        watcher.join(30)
    assert not changes, changes[:3]
    for k in ("conv", "mlp"):
        assert alone[k].exit_code == together[k].exit_code == 0
        assert not differences(comparable(alone[k].manifest), comparable(together[k].manifest)), \
            (k, differences(comparable(alone[k].manifest), comparable(together[k].manifest))[:8])
        art = alone[k].manifest["targets"]["onnx-cpu"]["artifact"]
        assert (alone[k].out / "onnx-cpu" / art).read_bytes() == (together[k].out / "onnx-cpu" / art).read_bytes()
    assert comparable(alone["conv"].manifest)["model"]["sha256"] != comparable(alone["mlp"].manifest)["model"]["sha256"]
    assert not list(tmp_path.glob(".*.tmp-*")), "a build left its scratch directory"


PROFILE = """name: {name}
backend: onnx
description: ONNX Runtime CPU with its own accuracy budget (tests/pipeline/test_build_value.py)
precision: int8
precisions: [int8, fp16, fp32]
io_dtype: float32
threads: 1
budgets: {{max_accuracy_drop: {drop}}}
quant: {{activation_type: uint8, weight_type: int8, per_channel: true, reduce_range: false}}
"""


@pytest.mark.slow
def test_each_target_gets_the_same_result_whatever_order_the_targets_are_built_in(tmp_path, monkeypatch):
    """Two targets whose searches rank layers with different budgets: each one's sensitivity (and so its float
    layers, artifact and record) is its own, whether it is built first or second, one at a time or side by side."""
    from edgebuild import build
    from edgebuild.targets import onnx

    # the model's Linear layers hold most of its weights, so after the static collapse the search would ship dynamic
    # INT8 before it measures any sensitivity: not offered here, this test is about the sensitivity stage
    monkeypatch.setattr(onnx, "DYNAMIC_SHARE", 1.01)

    profiles = []
    for name, drop in (("strict-cpu", 0.5), ("loose-cpu", 3.0)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(PROFILE.format(name=name, drop=drop))
        profiles.append(str(path))
    common = dict(model="tests.outlier_model:outlier_demo", input_shape=(1, 1, 8, 8), calib="digits:train",
                  eval="digits:test", profile_files=profiles, cache=False, auto_max_seconds=1200)
    first = build(targets=["strict-cpu", "loose-cpu"], out=str(tmp_path / "ab"), jobs=1, **common)
    second = build(targets=["loose-cpu", "strict-cpu"], out=str(tmp_path / "ba"), jobs=2, **common)
    a, b = comparable(first.manifest), comparable(second.manifest)
    for name in ("strict-cpu", "loose-cpu"):
        search = a["targets"][name]["search"]
        assert "sensitivity" in search and "time_limit" not in search, search.get("time_limit")
        assert not differences(a["targets"][name], b["targets"][name]), (name, differences(a["targets"][name],
                                                                                 b["targets"][name])[:8])
    sens = [a["targets"][n]["search"]["sensitivity"]["layers"] for n in ("strict-cpu", "loose-cpu")]
    assert sens[0] != sens[1], "the two budgets rank with their own losses (each target's own sensitivity)"
