"""Run a backend's Runner in a spawned subprocess, so a native crash becomes a ConversionError."""
from __future__ import annotations

import multiprocessing as mp
import sys
import threading
import traceback
from contextlib import contextmanager

import numpy as np

from edgebuild.errors import ConversionError
from edgebuild.targets.base import Artifact, Runner, get_backend

START_TIMEOUT_S = 120
_STARTING = threading.Lock()  # targets built side by side start their children from several threads


@contextmanager
def _without_callers_main():
    """Start a spawned child without it re-running the caller's script (``python my_build.py``).

    multiprocessing's spawn re-imports the parent's ``__main__`` in the child; a user script calling
    ``edgebuild.build`` without an ``if __name__ == "__main__"`` guard would then start a build in every child.
    The child runs only edgebuild's own ``_serve``, so it is told there is no main script to import."""
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


def _serve(conn, backend: str, artifact: dict, threads: int, opener: str = "", memory: bool = False) -> None:
    from edgebuild.targets import memory_probe as mem
    from edgebuild.procs import die_with_parent

    die_with_parent()  # a killed build takes its runtime with it
    try:
        # memory probe: import the runtime, then take the resident set as the baseline and reset the peak
        base = mem.baseline(backend, opener) if memory else None
        runner = mem.open_with(opener, Artifact.from_dict(artifact), threads) if opener else \
            get_backend(backend).runner(Artifact.from_dict(artifact), threads)
        conn.send(("ok", None))
    except BaseException as e:  # report, then stop: the parent turns it into a ConversionError
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):  # the build is gone
            return
        if op == "close":
            return
        try:
            result = {"run": runner.run, "time": runner.time_ms, "threads": runner.threads_used,
                      "memory": lambda: mem.snapshot(base, runner)}[op](*args)
            conn.send(("ok", result))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


class IsolatedRunner(Runner):
    def __init__(self, backend: str, artifact: Artifact, threads: int, opener: str = "", memory: bool = False):
        """``opener`` ("module:function(artifact, threads) -> Runner") replaces the backend's runner (TFLM);
        ``memory`` measures the child's resident memory above its baseline (targets/memory_probe.py)."""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, backend, artifact.to_dict(), threads, opener, memory),
                                 daemon=True)
        with _without_callers_main():
            self._proc.start()
        self._what = f"{artifact.target}/{artifact.main}"
        self._wait(START_TIMEOUT_S)

    def _wait(self, timeout: float | None = None):
        waited = 0.0
        while not self._conn.poll(0.5):
            waited += 0.5
            if not self._proc.is_alive():
                raise ConversionError(f"{self._what}: the runtime crashed (exit code {self._proc.exitcode})")
            if timeout is not None and waited > timeout:
                self.close()
                raise ConversionError(f"{self._what}: the runtime did not start within {timeout} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise ConversionError(f"{self._what}: the runtime crashed (exit code {self._proc.exitcode})") from None
        if status != "ok":
            raise ConversionError(f"{self._what}: {value.splitlines()[0]}")
        return value

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._conn.send(("run", (feed,)))
        return self._wait()

    def time_ms(self, feed, warmup, runs, budget_s) -> list[float]:
        self._conn.send(("time", (feed, warmup, runs, budget_s)))
        return self._wait()

    def threads_used(self) -> int | None:
        self._conn.send(("threads", ()))
        return self._wait()

    def memory(self) -> dict:
        """The child's memory now (started with ``memory=True``): baseline, resident, peak, runtime's report."""
        self._conn.send(("memory", ()))
        return self._wait()

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
