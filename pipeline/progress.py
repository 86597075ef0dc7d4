"""Progress a person can read, on stderr: what runs now, how far (k/N), for how long, and what is done.

In a terminal: a live line per running stage (several when targets build in parallel) with elapsed time, a
bar and an ETA for counted stages ("arm64: accuracy search 3/12 — …"), and a trail of finished stages, each
with its time, that stays on screen. Outside a terminal (CI logs, ``| tee``): one plain timestamped line per
stage. Stages come from ``with stage("text"):`` in the build (``ctx.stage``); they may run in threads.
"""
from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager

COUNT = re.compile(r"\b(\d+)/(\d+)\b")  # "3/12": step 3 of 12
SUBSTEP = "· "  # a stage's inner steps (sensitivity: layer 7/64): a live bar with ETA, no line of their own in the trail


def _series(text: str) -> str:
    """The stage's text with its count blanked: every step of one counted loop shares it."""
    return COUNT.sub("#/#", text, count=1)


def _fmt_seconds(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min {int(s % 60):02d} s"


class Progress:
    """Base: timing, ETA of counted stages; subclasses show it. ``stage`` is the build's stage callable."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.steps: dict[str, list[float]] = {}  # series -> durations of its finished steps
        self.finished: list[tuple[str, float, bool]] = []
        self.log = None  # a BuildLog (pipeline/buildlog.py): every stage's start and end, timestamped

    def eta(self, text: str) -> float | None:
        m = COUNT.search(text)
        if not m:
            return None
        done = self.steps.get(_series(text))
        if not done:
            return None
        k, n = int(m[1]), int(m[2])
        return sum(done) / len(done) * max(n - k + 1, 0)

    @contextmanager
    def stage(self, text: str):
        start = time.monotonic()
        if self.log is not None:
            self.log.line("stage", text)
        handle = self._begin(text)
        ok = False
        try:
            yield
            ok = True
        finally:
            seconds = time.monotonic() - start
            with self.lock:
                if COUNT.search(text):
                    self.steps.setdefault(_series(text), []).append(seconds)
                self.finished.append((text, seconds, ok))
            if self.log is not None:
                self.log.line("stage", f"{text}: {'done in' if ok else 'stopped after'} {_fmt_seconds(seconds)}")
            self._end(handle, text, seconds, ok)

    def _begin(self, text):
        return None

    def _end(self, handle, text, seconds, ok):
        pass

    def close(self):
        pass


class PlainProgress(Progress):
    """One line per stage, as it starts: ``[  12.3 s] arm64: accuracy search 3/12 — … (about 40 s left)``."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def _begin(self, text):
        eta = self.eta(text)
        left = f" (about {_fmt_seconds(eta)} left)" if eta is not None else ""
        with self.lock:
            self.stream.write(f"[{time.monotonic() - self.t0:7.1f} s] {text}{left}\n")
            self.stream.flush()

    def _end(self, handle, text, seconds, ok):
        if not ok:
            with self.lock:
                self.stream.write(f"[{time.monotonic() - self.t0:7.1f} s] {text}: stopped after {_fmt_seconds(seconds)}\n")
                self.stream.flush()


class LiveProgress(Progress):
    """rich: a spinner line per running stage (bar + ETA when counted); finished stages print above it and stay."""

    def __init__(self, console):
        super().__init__()
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.console = console
        self.live = RichProgress(SpinnerColumn(), TextColumn("{task.description}"),
                                 BarColumn(bar_width=16), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                                 console=console, transient=True,
                                 redirect_stdout=False, redirect_stderr=False)  # Python's prints and warnings go
        # to fds 1 and 2, i.e. into build.log (pipeline/buildlog.py), not onto the terminal around the live lines
        self.live.start()

    def _begin(self, text):
        m = COUNT.search(text)
        eta = self.eta(text)
        total, done = (int(m[2]), int(m[1]) - 1) if m else (None, 0)
        with self.lock:
            return self.live.add_task(text, total=total, completed=done,
                                      eta=f"~{_fmt_seconds(eta)} left" if eta is not None else "")

    def _end(self, handle, text, seconds, ok):
        mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
        with self.lock:
            self.live.remove_task(handle)
            if ok and text.startswith(SUBSTEP):
                return
            self.live.console.print(f"{mark} {text} [dim]({_fmt_seconds(seconds)})[/dim]", highlight=False)

    def close(self):
        self.live.stop()
        self.console.print(f"[dim]{len(self.finished)} stages in {_fmt_seconds(time.monotonic() - self.t0)}[/dim]")


class QuietProgress(Progress):
    pass


def make_progress(console, quiet: bool = False, log=None) -> Progress:
    """Live in a terminal, plain lines elsewhere, nothing shown with ``quiet``; every stage also into ``log``."""
    if quiet:
        progress = QuietProgress()
    elif console.is_terminal:
        progress = LiveProgress(console)
    else:
        progress = PlainProgress(console.file)
    progress.log = log
    return progress
