"""One isolation mechanism: native code that can crash runs in a spawned child process.

Every conversion (the TFLite converter, OpenVINO/NNCF, ONNX Runtime quantization) and every runner of a native
runtime that can crash (LiteRT, OpenVINO, TensorFlow Lite Micro) runs in a ``Child``:

* started with multiprocessing's *spawn*: a fresh interpreter that holds none of the build's memory, and that
  does not re-run the user's script (``_without_callers_main``);
* in its own process group and with PR_SET_PDEATHSIG: it dies with the build (even a ``kill -9`` of it), and on
  a timeout, Ctrl-C or SIGTERM (the build's ``edgebuild.procs.Children``) its whole group is killed, whatever it started;
* its output goes to its log file, or its stdout to stderr (``edgebuild --json`` keeps stdout for the manifest);
* a crash (a signal, or an exit without an answer), a timeout or an exception in the child is a
  ``ConversionError`` of one line (the signal's name and the phase the child had reached, "timed out after N s",
  the exception's line) — a failed target, never a dead build. An ``EdgeBuildError`` raised in a conversion
  child keeps its type and message (a bad setting stays exit 2).

``run_isolated(fn, job, timeout)`` runs one module-level function in a child and returns its picklable result:
one child per conversion (``run_with_samples`` hands it the calibration samples as files it maps, never through
the pipe, never whole in memory). ``Served`` (targets/served.py) keeps an object in a child for many calls: ``IsolatedRunner`` (one
child per artifact: runs, timing, the memory probe of targets/memory_probe.py) and the ONNX backend's
``FakeQuant`` (one child for a whole per-layer sensitivity ranking).

Tests: ``EDGEBUILD_FAULT=crash:NAME`` (``hang:NAME``) makes the child named NAME (``convert:onnx``, ``convert:tflite``,
``runtime:openvino``, ``fake-quant``, ...) kill itself with SIGSEGV (hang) before its job."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgebuild.errors import ConversionError, EdgeBuildError
from edgebuild.procs import Patch

START_TIMEOUT_S = 120  # a runner's child: start-up and loading the artifact
CONVERT_TIMEOUT_S = 3600  # an OpenVINO/NNCF or ONNX Runtime conversion (the TFLite converter's is quant.timeout_s)
FAULT_ENV = "EDGEBUILD_FAULT"
POLL_S = 0.2
SAMPLE_CHUNK = 64  # samples copied at once into the child's sample files
_STARTING = threading.Lock()  # targets built side by side start their children from several threads
_PHASE: list[Path] = []  # in a child: the file its progress goes to (``set_phase``)
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours (onnx2tf's ERROR:) stripped from echoed logs
# onnx2tf's ERROR lines that follow every failure whatever its cause: advice for its own CLI, never the cause
O2T_BOILERPLATE = re.compile(r"The trace log is below|input_onnx_file_path:|onnx_op_name:|Read this and deal with it|"
                             r"Alternatively, if the input OP has a dynamic dimension|If the input OP of ONNX before "
                             r"conversion is NHWC|for models that include NonMaxSuppression")


# Patches every child of a build runs within (edgebuild.procs.patched; restored when its job ends): no third-party
# telemetry. OpenVINO and NNCF report usage through the ``openvino_telemetry`` package unless it cannot be imported,
# then they use their own no-op stub (targets/openvino.py ``import_without_telemetry``, issue 27).
NO_TELEMETRY = (
    Patch("sys.modules", "openvino_telemetry", None,
          why="openvino and nncf fall back to their no-op telemetry stub when openvino_telemetry cannot be imported"),
    Patch("os.environ", "NNCF_CI", "1", why="NNCF's own switch to its telemetry stub (affects nothing else)"),
)


@contextmanager
def _without_callers_main():
    """Start a spawned child without it re-running the caller's script (``python my_build.py``).

    multiprocessing's spawn re-imports the parent's ``__main__`` in the child; a user script calling
    ``edgebuild.build`` without an ``if __name__ == "__main__"`` guard would then start a build in every child.
    The child runs only edgebuild's own code, so it is told there is no main script to import."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _STARTING:
        saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        try:
            yield
        finally:
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                del main.__spec__


# ---- in the child ---------------------------------------------------------------------------------------


def _child_main(conn, name: str, log: str | None, phase: str | None, cwd: str | None, env: dict, entry,
                payload) -> None:
    """The child's first code: its own process group, death with the build, its name, output, directory and
    environment; then ``entry(conn, payload)``."""
    from edgebuild.procs import die_with_parent, patched, set_name

    os.setpgid(0, 0)
    die_with_parent()
    mp.current_process().daemon = False  # a converter may start processes of its own
    set_name(name)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log else os.dup(2)
    for fd in (1, 2):  # stdout too: ``edgebuild --json`` prints the manifest on the build's own
        os.dup2(out, fd)
    os.close(out)
    if cwd:
        os.chdir(cwd)
    os.environ.update(env)
    if env.get("PYTHONWARNINGS") == "ignore":
        import warnings

        warnings.simplefilter("ignore")
    if phase:
        _PHASE.append(Path(phase))
    fault(name)
    with patched(NO_TELEMETRY):  # whatever imports openvino here (the memory probe's runtime import too)
        entry(conn, payload)


def fault(name: str) -> None:
    fault, _, who = os.environ.get(FAULT_ENV, "").partition(":")
    if who == name:
        if fault == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif fault == "hang":
            time.sleep(10**6)


def set_phase(text: str) -> None:
    """In a child: what it is doing now (named in the build's message if it crashes or times out)."""
    if _PHASE:
        _PHASE[0].write_text(text)


def describe_error(e: BaseException) -> dict:
    text = str(e).strip()
    info = {"line": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:400],
            "traceback": traceback.format_exc(limit=8)}
    if isinstance(e, EdgeBuildError) and type(e).__module__ == "edgebuild.errors":
        attrs = {k: v for k, v in vars(e).items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
        info["error"] = (type(e).__name__, str(e), attrs)
    return info


def _call(conn, payload) -> None:
    """A one-shot child: ``fn(job)``, its result or its error sent back."""
    fn, job = payload
    try:
        answer = ("ok", fn(job))
    except BaseException as e:  # everything goes back to the parent, which turns it into a ConversionError
        answer = ("error", describe_error(e))
    sys.stdout.flush()
    try:
        conn.send(answer)
    except Exception as e:  # noqa: BLE001 — an unpicklable result
        conn.send(("error", describe_error(e)))


# ---- in the build ---------------------------------------------------------------------------------------


class Child:
    """One spawned child process (see the module docstring) answering ``(status, value)`` on a pipe."""

    def __init__(self, entry, payload, name: str, what: str, role: str = "converter", log: Path | None = None,
                 phase: Path | None = None, cwd: Path | None = None, env: dict | None = None):
        from edgebuild.procs import current

        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.what, self.role, self.log, self.phase, self._done = what, role, log, phase, False
        scope = current()  # the build's: its children's environment, its registry of children (edgebuild.procs)
        self._children = scope.children
        args = (theirs, name, *(str(p) if p else None for p in (log, phase, cwd)), scope.child_env(env), entry, payload)
        self.proc = ctx.Process(target=_child_main, name=name, args=args, daemon=True)
        with _without_callers_main():
            self.proc.start()
        theirs.close()  # the child's end lives in the child only: its death is an EOF here
        self._children.track(self.proc.pid)

    def receive(self, timeout: float | None = None, keep_errors: bool = True, hint: str = "") -> Any:
        """The child's next answer; its crash, a timeout (the child is killed) or its error as a ConversionError
        (``keep_errors``: an EdgeBuildError raised in the child keeps its type and message)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.conn.poll(POLL_S):
            if not self.proc.is_alive() and not self.conn.poll(0):
                break
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                raise ConversionError(f"{self.what}: the {self.role} timed out after {timeout:g} s{self._during()}"
                                      f"{hint}")
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise ConversionError(f"{self.what}: the {self.role} crashed ({_how(self.proc.exitcode)})"
                                  f"{self._during()}{log_hint(self.log)}") from None
        if status != "ok":
            raise _error(self.what, value, keep_errors)
        return value

    def kill(self) -> None:
        """Kill the child and everything it started (its process group); idempotent."""
        from edgebuild.procs import kill_group

        if self._done:
            return
        self._done = True
        kill_group(self.proc.pid)
        if self.proc.is_alive():
            self.proc.kill()
        self._children.forget(self.proc.pid)
        self.proc.join()
        self.conn.close()

    def _during(self) -> str:
        if self.phase is None:
            return ""
        return f" during {self.phase.read_text() if self.phase.is_file() else 'start-up'}"


def _how(code: int | None) -> str:
    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _error(what: str, info: dict, keep_errors: bool) -> EdgeBuildError:
    if keep_errors and "error" in info:
        import edgebuild.errors as errors

        name, message, attrs = info["error"]
        cls = getattr(errors, name, ConversionError)
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        err.__dict__.update(attrs)
    else:
        err = ConversionError(f"{what}: {info['line']}")
    err.child_traceback = info["traceback"]  # for a bug report; the message stays one line
    return err


def log_hint(log: Path | None) -> str:
    """A child's last error line, when its log has one (onnx2tf's closing advice lines are not errors)."""
    if log is None or not log.is_file():
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    lines = [ln.strip() for ln in text.splitlines()
             if re.search(r"\bERROR:|Error:|Fatal Python error", ln) and not O2T_BOILERPLATE.search(ln)]
    return f" — {lines[-1][:200]}" if lines else ""


def run_isolated(fn: Callable[[Any], Any], job: Any, timeout: float, *, what: str = "conversion",
                 name: str = "convert", log: Path | None = None, phase: Path | None = None, cwd: Path | None = None,
                 env: dict | None = None, hint: str = "", echo: bool = False) -> Any:
    """``fn(job)`` (a module-level function, a picklable job) in a child process of its own; its result.

    ``what`` starts every error message; ``name`` names the process; ``log`` takes its output (``echo``: copied to
    this process's stderr afterwards, so into the build log); ``phase`` is the file ``set_phase`` writes (named
    when it crashes or times out); ``hint`` ends a timeout's message."""
    child = Child(_call, (fn, job), name, what, "converter", log, phase, cwd, env)
    try:
        return child.receive(timeout, hint=hint)
    finally:  # done, failed, timed out, Ctrl-C or SIGTERM: nothing is left running
        child.kill()
        if echo and log is not None and log.is_file():
            # named by process and target (``what`` is the error's prefix: "onnx-cpu: ONNX int8 conversion failed")
            sys.stderr.write(f"---- {name}, {what.partition(': ')[0]}: the converter's output ({log.name}) ----\n")
            with open(log, encoding="utf-8", errors="replace") as f:
                while text := f.read(1 << 16):
                    sys.stderr.write(ANSI.sub("", text))  # colour codes cut at a chunk's end stay: harmless
            sys.stderr.write(f"---- end of {log.name} ----\n")


def run_with_samples(fn: Callable[[dict], Any], job: dict, calib, timeout: float | None = None, **kwargs) -> Any:
    """``run_isolated`` (``timeout`` by default ``CONVERT_TIMEOUT_S``) with ``job["samples"]`` = ``calib`` (a
    SampleSet or None) as files in a temporary directory, which also holds the child's log (echoed) and
    phase; ``samples_from_disk`` reads them back in the child."""
    from edgebuild.procs import tempdir

    with tempfile.TemporaryDirectory(prefix="edgebuild-job-", dir=tempdir()) as tmp:
        job = {**job, "samples": samples_to_disk(calib, Path(tmp)) if calib is not None else None}
        return run_isolated(fn, job, CONVERT_TIMEOUT_S if timeout is None else timeout, log=Path(tmp) / "child.log",
                            phase=Path(tmp) / "phase", echo=True, **kwargs)


def samples_to_disk(calib, directory: Path) -> dict:
    """A SampleSet as ``.npy`` files (copied ``SAMPLE_CHUNK`` samples at a time: a disk-backed set is never
    whole in memory) and what rebuilds it around them."""
    files = {}
    for i, (name, array) in enumerate(calib.inputs.items()):
        path = directory / f"samples-{i}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
        for start in range(0, len(array), SAMPLE_CHUNK):
            out[start:start + SAMPLE_CHUNK] = array[start:start + SAMPLE_CHUNK]
        out.flush()
        del out
        files[name] = str(path)
    return {"name": calib.name, "files": files, "labels": calib.labels, "origin": calib.origin,
            "shapes": calib.shapes}


def samples_from_disk(spec: dict | None):
    """In the child: the SampleSet ``samples_to_disk`` wrote, its arrays mapped from disk (None: none)."""
    if spec is None:
        return None
    from edgebuild.calibration.dataset import SampleSet

    inputs = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in spec["files"].items()}
    return SampleSet(spec["name"], inputs, spec["labels"], spec["origin"], spec["shapes"])


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a moment (native log lines); errors still raise."""
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no real stderr (embedded interpreters, some test runners)
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
