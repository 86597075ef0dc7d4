"""Timing alone on a node: latency measurements of one cell never overlap another cell's work on the same machine.

A reader/writer lock on two files of the node (``fcntl.flock``, so every process of every batch on the machine
shares it, and a dead worker's locks go with it):

* a cell's **work** (loading, export, conversions, evaluation) holds ``<lock>`` shared, from the start of its task
  to its end; at every stage of its build it passes through the gate, so a cell waiting to time gets in at the
  next stage boundary of the others (one conversion or evaluation at most), not at their end;
* a cell's **timing** (the build's ``<target>: timing ...`` stage, and compression's ``measuring`` stages) drops its own shared hold, takes ``<lock>.gate``
  and then ``<lock>`` exclusive: it starts once every other cell on the node stands at a gate, and none starts
  working again before it is done. Timings of different cells take turns (the gate is theirs in order).

The lock file is node-wide (``$EDGEBUILD_NODE_LOCK``, default ``<tmp>/edgebuild-node.lock``): two Ray nodes started
on one machine (the tests' cluster) share their cores, and so share the lock. What it cannot hold back: processes
that are not edgebuild batch cells (another user's work), and each worker's own start (its Python and Ray imports,
before the task runs).
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

TIMING_STAGE = ": timing "  # the stage in which a build times its artifacts (pipeline/stages/per_target.finish_target)
COMPRESSION, MEASURING = "compression", ": measuring"  # compression's before/after (latency too: stages/compress)


def is_timing(text: str) -> bool:
    """Whether a build's stage measures latency (then it runs alone on the node)."""
    return TIMING_STAGE in text or (text.startswith(COMPRESSION) and MEASURING in text)
LOCK_ENV = "EDGEBUILD_NODE_LOCK"
MERGE_S = 0.01  # a hold released and taken back sooner than this (no timing came in between) is one interval


def node_lock_path() -> Path:
    return Path(os.environ.get(LOCK_ENV) or Path(tempfile.gettempdir()) / "edgebuild-node.lock")


class NodeTurns:
    """One cell's side of the node's lock. ``work()`` once at the cell's start, ``stage(text)`` as the build's stage
    callable, ``close()`` at the end; ``record()`` says when the cell worked and timed (wall clock, for the test and
    for ``batch_cell.json``) and how long its timing waited for the node."""

    def __init__(self, path: Path | None = None):
        path = Path(path or node_lock_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        self.main = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        self.gate = os.open(path.with_name(path.name + ".gate"), os.O_RDONLY | os.O_CREAT, 0o666)
        self.mutex = threading.Lock()  # the build's threads share this process's holds
        self.timing_depth = 0
        self.work_spans: list[list[float]] = []
        self.timing_spans: list[list[float]] = []
        self.waited_s = 0.0
        self.held = False

    def _take_shared(self) -> None:
        fcntl.flock(self.gate, fcntl.LOCK_EX)  # behind any timing that waits or runs
        try:
            fcntl.flock(self.main, fcntl.LOCK_SH)
        finally:
            fcntl.flock(self.gate, fcntl.LOCK_UN)
        now = time.time()
        if self.work_spans and now - self.work_spans[-1][1] < MERGE_S:
            self.work_spans[-1][1] = now  # nobody timed in between: the same span goes on
        else:
            self.work_spans.append([now, now])
        self.held = True

    def _drop_shared(self) -> None:
        if self.held:
            self.work_spans[-1][1] = time.time()  # before the release: a timing may start the moment after it
            fcntl.flock(self.main, fcntl.LOCK_UN)
            self.held = False

    def work(self) -> None:
        """Hold the node for work (shared with other cells' work, never with a timing)."""
        with self.mutex:
            if not self.held and not self.timing_depth:
                self._take_shared()

    def pass_gate(self) -> None:
        """Let a timing that waits for the node run now (then go on working)."""
        with self.mutex:
            if self.timing_depth:
                return
            self._drop_shared()
            self._take_shared()

    @contextmanager
    def timing(self):
        """The node to this cell alone while it times."""
        with self.mutex:
            self.timing_depth += 1
            nested = self.timing_depth > 1
            if not nested:
                self._drop_shared()
                t0 = time.time()
                fcntl.flock(self.gate, fcntl.LOCK_EX)
                fcntl.flock(self.main, fcntl.LOCK_EX)
                start = time.time()
                self.waited_s += start - t0
        try:
            yield
        finally:
            with self.mutex:
                self.timing_depth -= 1
                if not nested:
                    self.timing_spans.append([start, time.time()])
                    fcntl.flock(self.main, fcntl.LOCK_SH)  # back to work, before anyone waiting at the gate
                    fcntl.flock(self.gate, fcntl.LOCK_UN)
                    now = time.time()
                    self.work_spans.append([now, now])
                    self.held = True

    @contextmanager
    def stage(self, text: str):
        """The build's stage callable: its timing stage alone on the node, every other stage a gate."""
        if is_timing(text):
            with self.timing():
                yield
        else:
            self.pass_gate()
            yield

    def close(self) -> None:
        with self.mutex:
            self._drop_shared()
            for fd in (self.main, self.gate):
                os.close(fd)  # closing releases whatever this process still held
            self.main = self.gate = -1

    def record(self) -> dict:
        r = lambda spans: [[round(a, 3), round(b, 3)] for a, b in spans]  # noqa: E731
        return {"lock": "exclusive", "timing_waited_s": round(self.waited_s, 2), "timing_spans": r(self.timing_spans),
                "work_spans": r(self.work_spans)}


def overlaps(spans_a: list[list[float]], spans_b: list[list[float]], slack: float = 0.0) -> list[tuple]:
    """Pairs of spans of ``a`` and ``b`` that overlap by more than ``slack`` seconds."""
    return [(a, b) for a in spans_a for b in spans_b if min(a[1], b[1]) - max(a[0], b[0]) > slack]
