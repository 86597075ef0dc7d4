"""One isolation mechanism (targets/isolated.py): a crash, a hang or an error of native code in a child process
is a ConversionError of one line — a failed target, never a dead build — for every backend's conversion."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgebuild.errors import BadInputError, ConversionError
from edgebuild.targets import isolated
from edgebuild.targets.base import get_backend
from edgebuild.targets.isolated import FAULT_ENV, run_isolated
from edgebuild.targets.profiles import catalogue


def _children(name: str) -> list[int]:
    """This process's live children named ``name`` (the child's ``/proc/PID/comm``)."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "comm").read_text().strip() == name[:15]:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(p.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def raise_bad_input(message: str):  # run in a child: an EdgeBuildError keeps its type
    raise BadInputError(message)


# ---- the mechanism ----------------------------------------------------------------------------------------
def test_the_function_runs_in_a_child_of_its_own_process_group():
    pgid = run_isolated(os.getpgid, 0, 60)
    assert pgid != os.getpgid(0)
    assert run_isolated(sorted, [3, 1, 2], 60) == [1, 2, 3]  # the result comes back


def test_a_crash_is_a_conversion_error_naming_the_signal():
    with pytest.raises(ConversionError, match=r"^demo: the converter crashed \(SIGSEGV\)$"):
        run_isolated(signal.raise_signal, signal.SIGSEGV, 60, what="demo")
    with pytest.raises(ConversionError, match=r"crashed \(exit code 3\)"):
        run_isolated(os._exit, 3, 60, what="demo")


def test_a_timeout_kills_the_child_and_says_so(tmp_path):
    phase = tmp_path / "phase"
    with pytest.raises(ConversionError, match=r"^demo: the converter timed out after 1 s during start-up \(hint\)$"):
        run_isolated(time.sleep, 60, 1, what="demo", name="convert:sleepy", phase=phase, hint=" (hint)")
    assert _children("convert:sleepy") == []


def test_an_exception_is_one_line_and_an_edgebuild_error_keeps_its_type():
    with pytest.raises(ConversionError, match=r"^demo: ValueError: invalid literal for int\(\) with base 10: 'x'$") as e:
        run_isolated(int, "x", 60, what="demo")
    assert "Traceback" in e.value.child_traceback and "\n" not in str(e.value)
    with pytest.raises(BadInputError, match=r"^x86: quant\.preset must be one of$"):
        run_isolated(raise_bad_input, "x86: quant.preset must be one of", 60, what="demo")


def test_an_interrupt_kills_every_child_at_once():
    """An interrupted build kills its children (``Children.kill_all``) in every target's thread, not only the main
    thread's: the thread waiting on one gets a ConversionError at once."""
    from edgebuild.procs import current

    errors = []

    def convert():
        try:
            run_isolated(time.sleep, 120, 300, what="waiting", name="convert:waiting")
        except ConversionError as e:
            errors.append(str(e))

    t = threading.Thread(target=convert)
    t.start()
    deadline = time.monotonic() + 60
    while not _children("convert:waiting") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _children("convert:waiting")
    current().children.kill_all()  # outside a build: the default scope, shared by this test's threads
    t.join(30)
    assert not t.is_alive() and errors == ["waiting: the converter crashed (SIGKILL)"]


def test_a_script_without_a_main_guard_does_not_run_again_in_the_child(tmp_path):
    runs = tmp_path / "runs.txt"
    script = tmp_path / "my_build.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from edgebuild.targets.isolated import run_isolated
        with open({str(runs)!r}, "a") as f:
            f.write("run\\n")
        print(run_isolated(os.getpgid, 0, 60) != os.getpgid(0))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
    assert runs.read_text() == "run\n"


def test_calibration_samples_reach_the_child_through_files(tmp_path, small_sets):
    calib, _ = small_sets
    spec = isolated.samples_to_disk(calib, tmp_path)
    back = isolated.samples_from_disk(spec)
    assert len(back) == len(calib) and back.name == calib.name
    np.testing.assert_array_equal(back.feed(7)["input"], calib.feed(7)["input"])
    np.testing.assert_array_equal(back.labels, calib.labels)


# ---- every backend's conversion -------------------------------------------------------------------------
CRASHES = [("onnx", "onnx-cpu", "int8", "convert:onnx", "onnx-cpu: ONNX int8 conversion failed"),
           ("onnx", "onnx-cpu", "dynamic", "convert:onnx", "onnx-cpu: ONNX dynamic conversion failed"),
           ("openvino", "x86", "int8", "convert:openvino", "x86: OpenVINO int8 conversion failed"),
           ("openvino", "x86", "fp32", "convert:openvino", "x86: OpenVINO fp32 conversion failed"),
           ("tflite", "arm64", "int8", "convert:tflite", "arm64: TFLite int8")]


@pytest.mark.parametrize("backend_name, target, precision, child, what", CRASHES)
def test_a_crashing_converter_fails_the_target_not_the_build(backend_name, target, precision, child, what, model,
                                                              small_sets, tmp_path, monkeypatch):
    backend = get_backend(backend_name)
    for module in backend.requires:
        pytest.importorskip(module)
    monkeypatch.setenv(FAULT_ENV, f"crash:{child}")
    with pytest.raises(ConversionError) as e:
        backend.convert(model, catalogue()[target], precision, small_sets[0], tmp_path / "out", None)
    assert str(e.value).startswith(f"{what}: the converter crashed (SIGSEGV) during start-up"), str(e.value)
    assert "\n" not in str(e.value)


def test_a_hanging_converter_times_out(model, small_sets, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "hang:convert:onnx")
    monkeypatch.setattr(isolated, "CONVERT_TIMEOUT_S", 2)
    with pytest.raises(ConversionError, match=r"^onnx-cpu: ONNX int8 conversion failed: the converter timed out "
                                              r"after 2 s during start-up$"):
        get_backend("onnx").convert(model, catalogue()["onnx-cpu"], "int8", small_sets[0], tmp_path, None)
    assert _children("convert:onnx") == []


def test_a_crashing_runtime_is_a_conversion_error(tmp_path, monkeypatch):
    from edgebuild.targets.base import Artifact
    from edgebuild.targets.served import IsolatedRunner

    monkeypatch.setenv(FAULT_ENV, "crash:runtime:openvino")
    art = Artifact("x86", "openvino", "fp32", tmp_path, "model_fp32.xml", ["model_fp32.xml"])
    with pytest.raises(ConversionError, match=r"^x86/model_fp32.xml: the runtime crashed \(SIGSEGV\)$"):
        IsolatedRunner("openvino", art, 1)


def test_a_crashing_conversion_is_exit_3_with_one_line_and_the_build_goes_on(tmp_path, capsys, monkeypatch):
    from edgebuild.pipeline.cli import main

    monkeypatch.setenv(FAULT_ENV, "crash:convert:onnx")
    out = tmp_path / "out"
    code = main(["--target", "onnx-cpu", "--no-auto", "--no-cache", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("edgebuild: ")]
    assert code == 3 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and "onnx-cpu: ONNX int8 conversion failed: the converter crashed (SIGSEGV)" in lines[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"]["onnx-cpu"]["verdict"] == "error"


def test_a_crashing_fake_quantization_leaves_the_layer_unranked(demo_onnx, small_sets, tmp_path, monkeypatch):
    """The per-layer sensitivity's fake quantization runs in one child: its crash fails that call, not the build."""
    from edgebuild.targets.onnx import FakeQuant

    monkeypatch.setenv(FAULT_ENV, "crash:fake-quant")
    with FakeQuant(demo_onnx, small_sets[0], tmp_path) as fq:
        with pytest.raises(ConversionError, match=r"^fake quantization: the quantizer crashed \(SIGSEGV\)$"):
            fq.runner(["/features/features.0/Conv"])
        monkeypatch.delenv(FAULT_ENV)  # the next call starts a new child
        with fq.runner(["/features/features.0/Conv"]) as runner:
            assert runner.run(small_sets[1].feed(0))[0].shape == (1, 10)
    assert _children("fake-quant") == []
