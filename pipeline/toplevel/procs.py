"""Child processes die with the build: PR_SET_PDEATHSIG, their own process group, killed on the way out (a leaf
module: targets/ and pipeline/ both start children)."""
from __future__ import annotations

import os
import signal


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child: ask the kernel to send ``sig`` when the parent dies (Linux; a no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def child_setup() -> None:
    """``preexec_fn`` for subprocesses: die with the parent (the child also leads its own process group)."""
    die_with_parent()


def kill_group(pid: int) -> None:
    """Kill a child that leads its own process group, and everything it started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def terminate_as_interrupt(signum, frame):  # a SIGTERM handler: unwind like Ctrl-C (cleanup runs, exit 130)
    raise KeyboardInterrupt(f"signal {signum}")
