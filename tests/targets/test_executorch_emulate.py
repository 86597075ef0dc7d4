""".pte artifacts on ExecuTorch's aarch64 runtime under qemu-user (`validate --emulate`), and the C ABI it runs through.

The emulator root runs the executorch wheel's prebuilt C++ runtime through edgebuild_et (pipeline/assets/
edgebuild_et.cpp + .py), because the wheel's Python bindings link libtorch. The same shim is compiled here against
the host's executorch wheel and must give the bindings' outputs; under the emulator (when `EDGEBUILD_EMULATOR_EXECUTORCH=1
edgebuild setup-emulator` has been run; otherwise those tests skip, saying why) the INT8 transformer encoder and
LSTM give the host runtime's outputs. The demo's (a CNN) `validate --emulate` on a .pte is in test_executorch.py.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.targets.test_executorch import MODELS, _exported

pytest.importorskip("executorch")

ASSETS = Path(__file__).resolve().parents[2] / "pipeline" / "assets"
DEFINES = ["-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL"]  # the wheel's
LIBS = ["-lexecutorch", "-lexecutorch_kernels_optimized", "-lexecutorch_kernels_quantized",
        "-lexecutorch_backend_xnnpack", "-lexecutorch_threadpool"]  # as setup_arm64_emulator.sh links them


def _int8(name, tmp_path):
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue

    module, model, calib, feeds = _exported(name, tmp_path)
    art = get_backend("executorch").convert(model, catalogue()["arm64-executorch"], "int8", calib, tmp_path / "int8")
    return art, feeds


def _host(art, feeds):
    from edgebuild.targets.served import IsolatedRunner

    with IsolatedRunner("executorch", art, 1) as runner:
        return [np.asarray(runner.run(f)[0], dtype=np.float32) for f in feeds]


def _job(art, feeds, job: Path, dtype: str) -> Path:
    """A job directory as `validate --emulate/--device` writes it: artifact, feeds.npz, job.json, the runner."""
    from edgebuild.pipeline.device import RUNNER

    job.mkdir()
    shutil.copy2(art.path, job / art.main)
    shutil.copy2(RUNNER, job / RUNNER.name)
    np.savez(job / "feeds.npz", x0=np.stack([f["x"] for f in feeds]))
    (job / "job.json").write_text(json.dumps({
        "backend": "executorch", "artifact": art.main, "inputs": ["x"], "samples": len(feeds), "threads": 2,
        "io": {"inputs": [{"name": "x", "dtype": dtype}], "outputs": [{"name": "y"}]},
        "timing": {"warmup": 1, "runs": 3, "budget_s": 0}}))
    return job


@pytest.mark.slow
def test_the_c_abi_gives_the_bindings_outputs_on_the_host(tmp_path):
    """edgebuild_et compiled against the host's executorch wheel (x86-64) runs the INT8 CNN like the bindings."""
    import executorch

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ here to compile edgebuild_et.cpp against the host's executorch wheel")
    et = Path(list(executorch.__path__)[0])  # a namespace package: no __file__
    site = tmp_path / "site"
    site.mkdir()
    (site / "executorch").symlink_to(et)  # the layout of the root's site: executorch/lib beside the shim
    subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-w", *DEFINES, "-I", str(et / "include"),
                    "-I", str(et / "include/executorch/runtime/core/portable_type/c10"), str(ASSETS / "edgebuild_et.cpp"),
                    "-L", str(et / "lib"), "-Wl,--no-as-needed", *LIBS, "-Wl,--as-needed",
                    "-Wl,-rpath,$ORIGIN/executorch/lib", "-o", str(site / "libedgebuild_et.so")],
                   check=True, timeout=600)
    shutil.copy2(ASSETS / "edgebuild_et.py", site / "edgebuild_et.py")
    art, feeds = _int8("cnn", tmp_path)
    job = _job(art, feeds, tmp_path / "job", "float32")
    # no torch on the path: the runner falls back to edgebuild_et, as in the emulator root
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'): raise ImportError('no torch here')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "import device_runner; sys.exit(device_runner.main(['device_runner.py', '.']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=job, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{job}"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((job / "result.json").read_text())
    assert result["binding"] == "edgebuild_et" and result["runtime"] == "executorch" and len(result["times_ms"]) == 3
    got = np.load(job / "outputs.npz")["y0"]
    np.testing.assert_array_equal(got.reshape(len(feeds), -1),
                                  np.stack(_host(art, feeds)).reshape(len(feeds), -1))


def _emulator_with_executorch():
    from edgebuild.pipeline import emulate

    why = emulate.missing()
    if why is None and not (emulate.emulator_root() / emulate.EXECUTORCH_MARK).is_file():
        why = f"the arm64 root at {emulate.emulator_root()} has no ExecuTorch runtime"
    if why:
        pytest.skip(f"{why}: EDGEBUILD_EMULATOR_EXECUTORCH=1 bash scripts/setup_arm64_emulator.sh")
    return emulate


@pytest.mark.slow
@pytest.mark.parametrize("name", ["encoder", "lstm"])  # the CNN: the demo's --emulate in test_executorch.py
def test_int8_pte_on_aarch64_executorch_under_qemu_matches_the_host(name, tmp_path):
    emulate = _emulator_with_executorch()
    art, feeds = _int8(name, tmp_path)
    job = _job(art, feeds, tmp_path / "job", MODELS[name][2])
    argv, env = emulate.command()
    done = subprocess.run(argv, cwd=job, env=env, capture_output=True, text=True, timeout=emulate.RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((job / "result.json").read_text())
    assert result["machine"] == "aarch64" and result["binding"] == "edgebuild_et"
    from importlib.metadata import version
    assert result["runtime"] == "executorch" and result["runtime_version"] == version("executorch")
    emulated = [[y] for y in np.load(job / "outputs.npz")["y0"]]
    host = [[y.reshape(emulated[0][0].shape)] for y in _host(art, feeds)]
    from edgebuild.pipeline.stages.validate import Judging

    vs_host = emulate.agreement(host, emulated, np.zeros(len(feeds), dtype=np.int64), Judging())
    assert emulate.host_failures(vs_host) == [], (name, vs_host)
    assert vs_host["cosine_min"] > 0.9999, (name, vs_host)
