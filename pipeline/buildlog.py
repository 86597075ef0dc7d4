"""The build log: everything a CLI build prints, timestamped, in ``<out>/build.log``.

While the build runs, file descriptors 1 and 2 point into pipes that two threads drain into the log, one line at
a time with the time and the stream (``out``/``err``): Python's prints, warnings and logging, and what native
libraries (ONNX Runtime's calibration, TensorFlow, OpenVINO) and child processes write — so stdout carries only
what the user asked for (``--json``: the manifest, printed after the build). The progress (its own console on
the saved terminal stderr), edgebuild's debug lines (logger ``edgebuild``) and every Python warning (``[warning]``,
whatever holds ``sys.stderr``) are written into the same file.
``--verbose`` echoes the third-party output and the debug lines to stderr as well.

The capture ends when the build ends, not when every writer has gone: multiprocessing's resource tracker (a
helper process the first spawned child starts, alive until edgebuild exits) is started before fds 1 and 2 are
redirected, so it never holds the pipes; and once the build returns, the readers drain what the pipes hold and stop
(a grandchild that outlives the build cannot keep the command waiting for an EOF).

The log is written beside the output while the build runs (``.<out>.log-<pid>``) and moved into the output
directory once the build has written it; a build that stops on bad input leaves no log behind.
"""
from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

LOGGER = "edgebuild"
JOIN_SECONDS = 5.0  # the most the readers take to write what the pipes hold once the build has returned
POLL_SECONDS = 0.1  # how often an idle reader looks whether the build has returned


def _stamp() -> str:
    t = time.time()
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}"


class BuildLog:
    """A log file that several threads write whole lines into, each with a UTC time and a tag."""

    def __init__(self, path: Path, echo: TextIO | None = None):
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)  # never through
        self.file = os.fdopen(fd, "w", encoding="utf-8", errors="replace")  # a planted file or symlink (issue 27)
        self.echo = echo  # --verbose: third-party output and debug lines also go here (the terminal's stderr)
        self.lock = threading.Lock()
        self.file.write(f"# edgebuild build log, started {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC; "
                        f"pid {os.getpid()}; command: {' '.join(sys.argv)}\n")

    def line(self, tag: str, text: str, echo: bool = False) -> None:
        with self.lock:
            if self.file.closed:
                return
            self.file.write(f"{_stamp()} [{tag}] {text}\n")
            self.file.flush()
            if echo and self.echo is not None:
                try:
                    self.echo.write(f"{text}\n" if tag != "debug" else f"[debug] {text}\n")
                    self.echo.flush()
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        with self.lock:
            self.file.close()


class _LogHandler(logging.Handler):
    def __init__(self, log: BuildLog):
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record):
        try:
            tag = "debug" if record.levelno <= logging.DEBUG else record.levelname.lower()
            self.log.line(tag, f"{record.name}: {record.getMessage()}", echo=True)
        except Exception:  # a log line never breaks a build
            self.handleError(record)


def _drain(fd: int, log: BuildLog, tag: str, done: threading.Event) -> None:
    """Lines from the pipe ``fd`` into the log until EOF, or until ``done`` is set and the pipe is empty: every
    writer of the build has flushed by then, and a process that outlives the build does not hold the log open."""
    pending = b""
    try:
        while True:
            readable, _, _ = select.select([fd], [], [], POLL_SECONDS)
            if not readable:
                if done.is_set():
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                log.line(tag, raw.decode("utf-8", "replace").rstrip("\r"), echo=True)
        if pending:
            log.line(tag, pending.decode("utf-8", "replace"), echo=True)
    finally:
        os.close(fd)


def _warning_to(log: BuildLog):
    """``warnings.showwarning`` for the build: a warning (edgebuild's stages' or a library's) is a ``[warning]`` line of
    the log, echoed to the terminal only with ``--verbose``, whoever holds ``sys.stderr`` (a live display, a test)."""
    def show(message, category, filename, lineno, file=None, line=None):
        log.line("warning", f"{category.__name__}: {message} ({filename}:{lineno})", echo=True)
    return show


def _start_helpers() -> None:
    """Start multiprocessing's resource tracker now, on the terminal's fds: started later by the build's first
    spawned child, it would inherit the log pipes and hold them until edgebuild exits."""
    if os.name != "posix":
        return
    try:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    except Exception as e:  # noqa: BLE001 — without it the readers still stop on ``done``
        logging.getLogger(LOGGER).debug("multiprocessing resource tracker not started early: %s", e)


@contextmanager
def captured(log: BuildLog):
    """fd 1 and fd 2 into the log while the block runs (Python and native writers, children included); restored
    on the way out, however the block ends. Yields a text stream on the saved stderr, for the progress."""
    sys.stdout.flush()
    sys.stderr.flush()
    _start_helpers()
    saved = (os.dup(1), os.dup(2))
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    readers, done = [], threading.Event()
    for fd, tag in ((1, "out"), (2, "err")):
        r, w = os.pipe()
        os.set_inheritable(r, False)
        os.dup2(w, fd)
        os.close(w)
        t = threading.Thread(target=_drain, args=(r, log, tag, done), name=f"edgebuild-log-{tag}", daemon=True)
        t.start()
        readers.append(t)
    logger = logging.getLogger(LOGGER)
    handler, level = _LogHandler(log), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    shown = warnings.showwarning
    warnings.showwarning = _warning_to(log)
    try:
        yield terminal
    finally:
        warnings.showwarning = shown
        logger.removeHandler(handler)
        logger.setLevel(level)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        done.set()  # the build's own writes are in the pipes: the readers write them out and stop
        for t in readers:
            t.join(JOIN_SECONDS)
        terminal.close()


def log_path_for(out: Path) -> Path:
    """Where the log is written while the build runs: beside the output, named with the pid."""
    return out.parent / f".{out.name}.log-{os.getpid()}"


@contextmanager
def build_log(out: Path, verbose: bool):
    """A BuildLog for a build writing ``out``, its fds captured; yields (log, terminal stream). On success the
    caller moves the log in with ``keep``; on an exception it is removed."""
    from edgebuild.pipeline.errors import BadInputError

    tmp = log_path_for(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        log = BuildLog(tmp)
    except OSError as e:  # the build itself would say the same
        raise BadInputError(f"--out {out}: cannot write in {out.parent.resolve()} ({e.strerror or e})") from None
    try:
        saved_err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    except OSError:
        saved_err = None
    log.echo = saved_err if verbose else None
    ok = False
    try:
        with captured(log) as terminal:
            yield log, terminal
        ok = True
    finally:
        log.close()
        if saved_err is not None:
            saved_err.close()
        if not ok:
            tmp.unlink(missing_ok=True)


def keep(log: BuildLog, result) -> Path | None:
    """Move the finished log into the build's output directory as ``build.log``; None when this build did not
    write the output (every target failed and an earlier build's output stays as it was, its log with it)."""
    out = Path(result.out)
    if not out.is_dir() or result.manifest.get("output"):
        log.path.unlink(missing_ok=True)
        return None
    dest = out / "build.log"
    os.replace(log.path, dest)
    log.path.unlink(missing_ok=True)  # still there when the swap already linked it in (output._link_running_log)
    return dest
