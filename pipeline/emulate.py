"""`edgebuild validate DIR --emulate`: the arm64 artifact on the aarch64 build of its runtime, under qemu-user: a
.tflite on LiteRT, a .pte on ExecuTorch.

The emulator is an arm64 Debian root with Python and the aarch64 wheels of numpy and ai-edge-litert (the
versions of requirements.lock), made once by ``edgebuild setup-emulator`` (pipeline/assets/setup_arm64_emulator.sh) under
``$EDGEBUILD_ARM64_ROOT`` (default ``~/.cache/edgebuild/arm64-root``); ``EDGEBUILD_EMULATOR_EXECUTORCH=1`` adds
the aarch64 executorch runtime of the host's version (``EXECUTORCH_MARK``). Its Python runs the same self-contained
runner a board runs (``pipeline/assets/device_runner.py``) through ``qemu-aarch64-static -L ROOT``, offline.

The emulated outputs are judged against the FP32 reference like any validation (``revalidate.judged``, no
latency: time under emulation says nothing about a board), and compared with the host's x86-64 runtime on the
same feeds: top-1 agreement, max abs error and cosine go into ``emulation.vs_host``; agreement below
``HOST_AGREEMENT`` is a failed check. The runner's invoke time under qemu is kept apart, in
``emulation.qemu_invoke_ms`` (what the emulation cost on this host, never a device number). A missing emulator is
one line and exit 4 (``DeviceError``).

A .pte runs on the aarch64 executorch wheel's prebuilt C++ runtime (libexecutorch, kernels, XNNPACK delegate)
through ``edgebuild_et`` (pipeline/assets/edgebuild_et.cpp/.py, compiled against that wheel by the setup): the
wheel's Python bindings link libtorch, whose aarch64 build on PyPI is the CUDA one (~2.7 GB with its CUDA wheels).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgebuild.pipeline.device import DeviceError, RUNNER, read_results, runner_failed, write_job
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.stages import validate as V
from edgebuild.procs import tempdir

SITE = "/opt/edgebuild/site"  # inside the root: where the setup script installed the aarch64 wheels
RUNTIMES = ("ai_edge_litert",)  # what the root has (setup_arm64_emulator.sh): a backend whose device runtimes include it
OPTIONAL = {"executorch": "EDGEBUILD_EMULATOR_EXECUTORCH=1 edgebuild setup-emulator"}  # added on request
EXECUTORCH_MARK = ".edgebuild-executorch"  # in the root: the executorch version and edgebuild_et's hash installed
NAMES = {"ai_edge_litert": "LiteRT", "executorch": "ExecuTorch"}
RUN_TIMEOUT_S = 900
QEMU_RUNS = 10  # timed invokes under qemu (emulation cost, not latency)
CPU = "cortex-a76"  # the Raspberry Pi 5's core; the setup script's ROOT/proc/cpuinfo describes the same
# emulated (aarch64 LiteRT) vs host (x86-64 LiteRT), same artifact and feeds: the same kernels (XNNPACK) on two
# ISAs. Float rounding (FMA) and the NEON vs AVX requantization may differ by a unit in the last place, which can
# flip a near-tie decision now and then; anything beyond that is a runtime that does not give the same answers.
HOST_AGREEMENT = V.HOST_AGREEMENT  # the judge's (pipeline/stages/validate.py), named here for the record


def emulator_root() -> Path:
    return Path(os.environ.get("EDGEBUILD_ARM64_ROOT") or Path.home() / ".cache" / "edgebuild" / "arm64-root")


def missing() -> str | None:
    """Why the emulator cannot run here (None: it can)."""
    root = emulator_root()
    if not shutil.which("qemu-aarch64-static"):
        return "qemu-aarch64-static is not installed (apt-get install qemu-user-static)"
    if not (root / ".edgebuild-ready").is_file() or not (root / "usr" / "bin" / "python3").exists():
        return f"no arm64 root at {root}"
    return None


def command() -> tuple[list[str], dict]:
    """The runner under the emulator (run in the job directory) and its environment."""
    root = emulator_root()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": SITE, "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8"}
    python = str(root / "usr" / "bin" / "python3")
    return ["qemu-aarch64-static", "-cpu", CPU, "-L", str(root), python, RUNNER.name, "."], env


def validate_emulated(artifact_dir: Path, eval_source: str, evaluator: str | None = None) -> dict:
    from edgebuild.pipeline.revalidate import judged, load
    from edgebuild.pipeline.stages.per_target import open_runner
    from edgebuild.targets.base import backend_info

    why = missing()
    if why:
        raise DeviceError(f"--emulate: the arm64 emulator is not set up: {why}; run `edgebuild setup-emulator`")
    loaded = load(artifact_dir, eval_source, evaluator)
    wanted = backend_info(loaded.meta["backend"]).device_runtimes
    runtime = next((r for r in wanted if r in RUNTIMES or r in OPTIONAL), None)
    if runtime is None:
        raise BadInputError(f"--emulate runs .tflite artifacts on aarch64 LiteRT and .pte on aarch64 ExecuTorch; "
                            f"{artifact_dir} is a {loaded.meta['backend']} artifact")
    if runtime == "executorch" and not (emulator_root() / EXECUTORCH_MARK).is_file():
        raise DeviceError(f"--emulate: the arm64 emulator at {emulator_root()} has no ExecuTorch runtime; run "
                          f"`{OPTIONAL[runtime]}` (adds the aarch64 executorch wheel's runtime, ~18 MB)")
    with tempfile.TemporaryDirectory(prefix="edgebuild-emulate-", dir=tempdir()) as tmp:
        job = Path(tmp)
        write_job(loaded, job, timed=True)  # the invoke times are the emulation's cost, kept apart from latency
        spec = json.loads((job / "job.json").read_text())
        spec["timing"] = {"warmup": 1, "runs": QEMU_RUNS, "budget_s": 0}  # a few: emulation is ~100x slower
        (job / "job.json").write_text(json.dumps(spec))
        argv, env = command()
        try:
            done = subprocess.run(argv, cwd=job, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"--emulate: the emulated runner did not finish within {RUN_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise runner_failed(f"aarch64 {NAMES[runtime]} under qemu", done.returncode, done.stderr)
        emulated, result = read_results(job, len(loaded.evalset))
    with open_runner(loaded.backend, loaded.artifact, loaded.meta["runtime"]["threads"]) as runner:
        host = V.collect(runner, loaded.evalset)
    vs_host = agreement(host, emulated, loaded.evalset.labels, loaded.judging)
    binding = {"edgebuild_et": ", C++ runtime through edgebuild_et"}.get(result.get("binding"), "")
    emulation = {"runtime": f"{result['runtime']} {result['runtime_version']} ({result['machine']}, Python "
                            f"{result['python']}{binding}) under qemu-user -cpu {CPU}", "root": str(emulator_root()),
                 "vs_host": vs_host, "tolerance": {k: {op: limit} for k, limit, op in HOST_AGREEMENT},
                 "latency": "not measured: time under emulation is not device latency",
                 "qemu_invoke_ms": qemu_time(result["times_ms"])}
    return judged(loaded, emulated, None, vs_host=vs_host, emulation=emulation)  # agreement judged in V.assess


def qemu_time(times_ms: list) -> dict | None:
    """The runner's invoke times under qemu-user on this host: the emulation's cost, not a device latency."""
    if not times_ms:
        return None
    return {"p50": round(float(np.median(times_ms)), 3), "runs": len(times_ms),
            "note": "emulated (qemu-user on this x86-64 host), not a device number"}


def host_failures(vs_host: dict) -> list[V.Check]:
    """The ``HOST_AGREEMENT`` checks the emulated outputs miss (``V.agreement_checks`` that fail)."""
    return [c for c in V.agreement_checks(vs_host) if not c.ok]


def agreement(host: list, emulated: list, labels, judging: V.Judging) -> dict:
    """Emulated vs host outputs: top-1 agreement (class scores), worst max abs error and cosine over the outputs
    (the labels only let the outputs be told apart as they are in the build; accuracies are not kept)."""
    m = V.compare(host, emulated, labels, judging).to_dict()
    keys = ("top1_agreement", "max_abs_error", "cosine_min", "cosine_mean", "samples")
    out = {k: m[k] for k in keys if k in m}
    ref = V.stacked(host, tuple(m["outputs"]))
    out["max_abs_error_relative"] = max(o["max_abs_error"] / max(float(np.abs(ref[name]).max()), 1e-12)
                                        for name, o in m["outputs"].items())
    return out
