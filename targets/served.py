"""Objects served by a child process of their own (targets/isolated.py's isolation, one child for many calls):
``Served`` keeps ``factory(*args)`` in a child and answers ``call(method, *args)``; ``IsolatedRunner`` is a backend's
runner served that way (a crash of a runtime's native code fails that measurement, not the build), with the child's
memory measured on request (targets/memory_probe.py); the fake-quant helper (targets/onnx/fake_quant.py) is another."""
from __future__ import annotations

import numpy as np

from edgebuild.targets.base import Artifact, Runner, get_backend
from edgebuild.targets.isolated import START_TIMEOUT_S, Child, describe_error



def _serve(conn, payload) -> None:
    """A serving child: ``factory(*args)`` makes the object, then each request ``(method, args)`` is answered with
    ``object.method(*args)`` until ``close`` or the build's end."""
    factory, args = payload
    try:
        obj = factory(*args)
        conn.send(("ok", None))
    except BaseException as e:  # report, then stop: the parent turns it into a ConversionError
        conn.send(("error", describe_error(e)))
        return
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):  # the build is gone
            return
        if op == "close":
            return
        try:
            conn.send(("ok", getattr(obj, op)(*args)))
        except BaseException as e:
            conn.send(("error", describe_error(e)))


class Served:
    """An object living in a child process of its own (one child for all its calls): ``factory(*args)`` there,
    then ``call(method, *args)`` here is ``object.method(*args)`` there. Its errors, a crash of the child or a
    start-up past ``START_TIMEOUT_S`` are ConversionErrors starting with ``what``."""

    def __init__(self, factory, args: tuple, name: str, what: str, role: str = "runtime"):
        self.child = Child(_serve, (factory, args), name, what, role)
        try:
            self.child.receive(START_TIMEOUT_S, keep_errors=False, hint=" (starting)")
        except BaseException:
            self.child.kill()
            raise

    def call(self, op: str, *args):
        try:
            self.child.conn.send((op, args))
        except (BrokenPipeError, OSError):
            pass  # the child is gone: receive says how
        return self.child.receive(keep_errors=False)

    def alive(self) -> bool:
        return not self.child._done and self.child.proc.is_alive()

    def close(self) -> None:
        if self.alive():
            try:
                self.child.conn.send(("close", ()))
                self.child.proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        self.child.kill()


class _RunnerHost:
    """In a runner's child: the backend's runner (or ``opener``'s), and the memory probe when asked for."""

    def __init__(self, backend: str, artifact: dict, threads: int, opener: str, memory: bool):
        from edgebuild.targets import memory_probe as mem

        self._mem = mem
        # memory probe: import the runtime, then take the resident set as the baseline and reset the peak
        self._base = mem.baseline(backend, opener) if memory else None
        art = Artifact.from_dict(artifact)
        self.runner = mem.open_with(opener, art, threads) if opener else get_backend(backend).runner(art, threads)

    def run(self, feed):
        return self.runner.run(feed)

    def time(self, *args):
        return self.runner.time_ms(*args)

    def threads(self):
        return self.runner.threads_used()

    def memory(self):
        return self._mem.snapshot(self._base, self.runner)


class IsolatedRunner(Runner):
    def __init__(self, backend: str, artifact: Artifact, threads: int, opener: str = "", memory: bool = False):
        """``opener`` ("module:function(artifact, threads) -> Runner") replaces the backend's runner (TFLM);
        ``memory`` measures the child's resident memory above its baseline (targets/memory_probe.py)."""
        self._served = Served(_RunnerHost, (backend, artifact.to_dict(), threads, opener, memory),
                              f"runtime:{backend}", f"{artifact.target}/{artifact.main}")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._served.call("run", feed)

    def time_ms(self, feed, warmup, runs, budget_s) -> list[float]:
        return self._served.call("time", feed, warmup, runs, budget_s)

    def threads_used(self) -> int | None:
        return self._served.call("threads")

    def memory(self) -> dict:
        """The child's memory now (started with ``memory=True``): baseline, resident, peak, runtime's report."""
        return self._served.call("memory")

    def close(self) -> None:
        self._served.close()
