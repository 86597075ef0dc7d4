"""Child processes die with the build: PR_SET_PDEATHSIG, their own process group, killed on the way out (a leaf
module: targets/ and pipeline/ both start children)."""
from __future__ import annotations

import os
import signal
import threading

_LIVE: set[int] = set()  # children of this build that lead their own process group
_LOCK = threading.Lock()
_OWNER = threading.local()  # the target the current thread works for (set_owner)
_OWNERS: dict[int, str] = {}  # tracked child -> the target whose thread started it (pipeline/peaks.py measures them)


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


def set_owner(name: str | None) -> None:
    """The target this thread works for: children it starts count in that target's measured memory."""
    _OWNER.name = name


def track(pid: int) -> None:
    """A child that leads its own process group (targets/isolated.py), killed by ``kill_tracked``."""
    with _LOCK:
        _LIVE.add(pid)
        owner = getattr(_OWNER, "name", None)
        if owner is not None:
            _OWNERS[pid] = owner


def forget(pid: int) -> None:
    with _LOCK:
        _LIVE.discard(pid)
        _OWNERS.pop(pid, None)


def owners() -> dict[int, str]:
    """The tracked children started for a target (``set_owner``), alive or not yet joined: pid -> target."""
    with _LOCK:
        return dict(_OWNERS)


def kill_tracked() -> None:
    """Kill every tracked child's group: an interrupted build stops the conversions of all its targets at once
    (a target's thread then gets a ConversionError instead of waiting for its converter to finish)."""
    with _LOCK:
        live = list(_LIVE)
    for pid in live:
        kill_group(pid)
        try:  # one that has not made its own group yet
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def terminate_as_interrupt(signum, frame):  # a SIGTERM/SIGINT handler: unwind like Ctrl-C (cleanup runs, exit 130)
    kill_tracked()
    raise KeyboardInterrupt(f"signal {signum}")
