"""What one build runs within — its scratch directory, the environment of its child processes and the children it
started — and how a child dies with the build (a leaf module: targets/ and pipeline/ both start children).

A build is a value, not a process: nothing here is set for the whole process. ``build()`` makes a ``Scope`` and
enters it for its own call stack (``entered``: a context variable); the threads it starts for its targets run in a
copy of its context (``bound``). So two builds in threads of one process each write their temp files to their own
scratch directory (``tempdir()``), give their children their own environment (``Scope.child_env``) and, when one is
interrupted, kill their own children only (``Scope.children``). Code outside any build (``edgebuild validate``, a test
calling a backend) runs in a default scope: the system's temp directory, the offline environment.
"""
from __future__ import annotations

import contextvars
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

# No child of a build touches the network (pipeline/offline.py says why each is here). Given to every child's
# environment (``Scope.child_env``); the CLI, which owns its process, also sets them in its own.
OFFLINE_ENV: Mapping[str, str] = MappingProxyType({
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
})


_OWNER = threading.local()  # the target the current thread works for (set_owner)


def set_owner(name: str | None) -> None:
    """The target this thread works for: children it starts count in that target's measured memory."""
    _OWNER.name = name


class Children:
    """The children of one build that lead their own process group (targets/isolated.py ``Child``), and the target
    whose thread started each (``set_owner``; pipeline/peaks.py measures them)."""

    def __init__(self) -> None:
        self._live: set[int] = set()
        self._owners: dict[int, str] = {}
        self._lock = threading.Lock()

    def track(self, pid: int) -> None:
        with self._lock:
            self._live.add(pid)
            owner = getattr(_OWNER, "name", None)
            if owner is not None:
                self._owners[pid] = owner

    def forget(self, pid: int) -> None:
        with self._lock:
            self._live.discard(pid)
            self._owners.pop(pid, None)

    def owners(self) -> dict[int, str]:
        """The children started for a target (``set_owner``), alive or not yet joined: pid -> target."""
        with self._lock:
            return dict(self._owners)

    def live(self) -> list[int]:
        with self._lock:
            return sorted(self._live)

    def kill_all(self) -> None:
        """Kill every child's group: an interrupted build stops the conversions of all its targets at once (a
        target's thread then gets a ConversionError instead of waiting for its converter to finish)."""
        for pid in self.live():
            kill_group(pid)
            try:  # one that has not made its own group yet
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@dataclass(frozen=True)
class Scope:
    scratch: Path | None = None  # temp files of the build and of its children (None: the system's temp directory)
    env: Mapping[str, str] = field(default_factory=dict)  # set in every child's environment, after OFFLINE_ENV
    children: Children = field(default_factory=Children, compare=False)

    def child_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment variables a child of this build sets for itself (on top of the build process's own)."""
        tmp = {"TMPDIR": str(self.scratch)} if self.scratch is not None else {}
        return {**OFFLINE_ENV, **self.env, **tmp, **(extra or {})}


_OUTSIDE = Scope()  # code that runs outside any build
_CURRENT: contextvars.ContextVar[Scope] = contextvars.ContextVar("edgebuild_scope", default=_OUTSIDE)


def current() -> Scope:
    """The scope of the build this code runs for (the default one outside a build)."""
    return _CURRENT.get()


def tempdir() -> str | None:
    """Where this build's temp files go: ``tempfile.*(dir=tempdir())`` (None: the system's temp directory)."""
    scratch = current().scratch
    return None if scratch is None else str(scratch)


@contextmanager
def entered(scope: Scope) -> Iterator[Scope]:
    """Run the block (this thread's call stack, and threads started through ``bound``) within ``scope``; on the way
    out, whatever way, the children it left running are killed."""
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        scope.children.kill_all()
        _CURRENT.reset(token)


def bound(fn: Callable) -> Callable:
    """``fn`` to be called once in another thread, within the scope of the thread that binds it (a copy of its
    context: a new thread otherwise starts with an empty one, the default scope)."""
    return _Bound(contextvars.copy_context(), fn)


class _Bound:
    def __init__(self, ctx: contextvars.Context, fn: Callable):
        self.ctx, self.fn = ctx, fn

    def __call__(self, *args, **kwargs):
        return self.ctx.run(self.fn, *args, **kwargs)


# ---- patches to third-party internals: declared as data, applied and restored in one place ----------------------

_MISSING = object()


@dataclass(frozen=True)
class Patch:
    """One change to a third-party library's internals, as data: in ``where`` — ``"sys.modules"``, ``"os.environ"``,
    or an importable ``module`` / ``module:Class`` — the entry or attribute ``name`` becomes ``value``, or
    ``wrap(the original)`` (``None`` for an entry that is absent). ``why`` says what it is for."""

    where: str
    name: str
    value: Any = None
    why: str = ""
    wrap: Callable[[Any], Any] | None = None


def _holder(where: str):
    import importlib
    import sys

    if where == "sys.modules":
        return sys.modules, True
    if where == "os.environ":
        return os.environ, True
    module, _, attrs = where.partition(":")
    obj = importlib.import_module(module)
    for a in filter(None, attrs.split(".")):
        obj = getattr(obj, a)
    return obj, False


@contextmanager
def patched(patches) -> Iterator[None]:
    """Apply ``patches`` in order within the block and restore each on the way out (in reverse order), whatever way
    the block ends: nothing of them is left behind. Used inside the child process that needs them."""
    undo: list[tuple[Any, bool, str, Any]] = []
    try:
        for p in patches:
            holder, mapping = _holder(p.where)
            old = holder.get(p.name, _MISSING) if mapping else getattr(holder, p.name, _MISSING)
            new = p.wrap(None if old is _MISSING else old) if p.wrap is not None else p.value
            undo.append((holder, mapping, p.name, old))
            if mapping:
                holder[p.name] = new
            else:
                setattr(holder, p.name, new)
        yield
    finally:
        for holder, mapping, name, old in reversed(undo):
            if mapping and old is _MISSING:
                holder.pop(name, None)
            elif mapping:
                holder[name] = old
            elif old is _MISSING:
                delattr(holder, name)
            else:
                setattr(holder, name, old)


def safe_signal_stack() -> bool:
    """Make the calling thread's alternate signal stack safe to take a signal on; True when it had to be disabled.

    Python installs every signal handler with SA_ONSTACK: the kernel builds the handler's frame on the thread's
    alternate stack (``sigaltstack``) when one is set. OpenVINO's CPU plugin sets one on each thread that compiles a
    model and puts the previous one back when the compiled model goes; two of them released in the order they were
    made (not the reverse) leave the thread's alternate stack pointing at memory already unmapped. The next signal to
    that thread (a SIGTERM, a Ctrl-C) then cannot be delivered and the kernel kills the process with SIGSEGV at the
    ``kill`` call, before any handler runs (tests/reliability/test_trust_paths.py crashed so after tests/targets ran
    OpenVINO in the pytest process). A stack whose memory is no longer mapped is disabled here (handlers then run on
    the thread's own stack); any other is left as it is. Linux only; elsewhere a no-op."""
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    ss_disable = 2
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        current_stack = StackT()
        if libc.sigaltstack(None, ctypes.byref(current_stack)) != 0 or current_stack.ss_flags & ss_disable:
            return False
        start = current_stack.ss_sp or 0
        end = start + current_stack.ss_size
        with open("/proc/self/maps") as maps:
            for line in maps:
                lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                if lo <= start and end <= hi:
                    return False  # mapped: a live alternate stack
        return libc.sigaltstack(ctypes.byref(StackT(None, ss_disable, 0)), None) == 0
    except (OSError, AttributeError, ValueError):
        return False


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child: ask the kernel to send ``sig`` when the parent dies (Linux; a no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def set_name(name: str) -> None:
    """In a child: its process name (``/proc/PID/comm``, what ``top`` shows), e.g. ``convert:tflite``."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        return


def kill_group(pid: int) -> None:
    """Kill a child that leads its own process group, and everything it started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def track(pid: int) -> None:
    """A child of the current build that leads its own process group, killed when the build is interrupted."""
    current().children.track(pid)


def forget(pid: int) -> None:
    current().children.forget(pid)


def owners() -> dict[int, str]:
    """The current build's children started for a target: pid -> target."""
    return current().children.owners()


def terminate_as_interrupt(signum, frame):  # a SIGTERM/SIGINT handler: unwind like Ctrl-C (cleanup runs, exit 130)
    """Unwinding kills the interrupted build's children (``entered``; the scheduler as soon as its wait is
    interrupted), and no other build's."""
    raise KeyboardInterrupt(f"signal {signum}")
