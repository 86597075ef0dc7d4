"""``run_batch``: a matrix file -> every cell built (or skipped) -> ``batch.json`` + ``batch.html``; the CLI's
``edgebuild batch`` calls it, and so can a Python user."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgebuild.pipeline.batch.cell import RUNNING_DIR, finished
from edgebuild.pipeline.batch.executors import BatchInterrupted, make_executor
from edgebuild.pipeline.batch.matrix import load_matrix
from edgebuild.pipeline.batch.summary import write_summary


@dataclass
class BatchResult:
    summary: dict  # batch.json's content
    out: Path

    @property
    def exit_code(self) -> int:
        return self.summary["exit"]

    @property
    def cells(self) -> list[dict]:
        return self.summary["cells"]

    def raise_for_exit(self) -> None:
        """A batch whose worst cell is not 0 -> the matching EdgeBuildError (one line naming the cells)."""
        from edgebuild.pipeline.errors import BudgetError, ConversionError

        bad = [c for c in self.cells if c["exit"] != 0]
        names = ", ".join(f"{c['model']}/{c['target']} (exit {c['exit']})" for c in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        where = f"see {self.out / 'batch.html'}"
        if self.exit_code == 1:
            raise BudgetError(f"batch: {len(bad)} cell(s) missed a budget: {names}{more}; {where}")
        if self.exit_code:
            raise ConversionError(f"batch: {len(bad)} cell(s) failed: {names}{more}; {where}")


class _Progress:
    """Cells done / running / failed / skipped and an ETA: a live line in a terminal, one line per cell elsewhere."""

    def __init__(self, console, total: int, slots: int, quiet: bool):
        self.console, self.total, self.slots, self.quiet = console, total, max(1, slots), quiet
        self.done = self.failed = self.skipped = 0
        self.seconds: list[float] = []
        self.t0 = time.perf_counter()
        self.live = None
        if console is not None and console.is_terminal and not quiet:
            from rich.live import Live

            self.live = Live(self._line(), console=console, refresh_per_second=2, transient=True)
            self.live.start()

    def _line(self) -> str:
        left = self.total - self.done
        running = min(self.slots, left)
        eta = ""
        if self.seconds and left:
            eta = f" · ETA {sum(self.seconds) / len(self.seconds) * left / self.slots:.0f} s"
        return (f"batch: {self.done}/{self.total} cells done · {running} running · {self.failed} failed · "
                f"{self.skipped} skipped · {time.perf_counter() - self.t0:.0f} s{eta}")

    def cell(self, record: dict) -> None:
        self.done += 1
        self.failed += record.get("exit") not in (0, 1)
        self.skipped += bool(record.get("skipped"))
        if not record.get("skipped") and record.get("seconds"):
            self.seconds.append(record["seconds"])
        if self.console is None or self.quiet:
            return
        status = "skipped (built earlier)" if record.get("skipped") else f"{record.get('seconds', 0):.1f} s"
        colour = {0: "green", 1: "yellow"}.get(record.get("exit"), "red")
        text = (f"[{colour}]{str(record.get('verdict')).upper():<5}[/{colour}] {record['model']}/{record['target']} "
                f"exit {record.get('exit')} · {status}" + (f" · {record['error']}" if record.get("error")
                                                          and record.get("exit") not in (0, 1) else ""))
        self.console.print(text, highlight=False)
        if self.live is not None:
            self.live.update(self._line())

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def run_batch(matrix_file: str | Path, out: str | Path = "batch", address: str | None = None, resume: bool = True,
              local: bool = False, num_cpus: int | None = None, console=None, quiet: bool = False) -> BatchResult:
    """Build every cell of ``matrix_file`` under ``out/<model>/<target>/``; a cell an earlier run finished (same
    spec, files verified) is skipped unless ``resume`` is False. ``address``: a Ray cluster (default: a local one,
    or ``$RAY_ADDRESS``); ``local``: the process pool instead of Ray. Bad input (the matrix, a cell no node can hold)
    raises ``BadInputError`` before any cell runs; an interrupt raises KeyboardInterrupt after ``batch.json`` is
    written with the cells that finished."""
    t0 = time.perf_counter()
    out = Path(out)
    matrix = load_matrix(matrix_file, out)
    from edgebuild.pipeline.cache import cache_key, is_object_store
    from edgebuild.pipeline.cache_store import open_cache

    if is_object_store(matrix.cache):  # no key, no pyarrow, a bad URI: exit 2 before any cell runs
        open_cache(matrix.cache)
    else:
        cache_key(Path(matrix.cache))  # a bad EDGEBUILD_CACHE_KEY(_FILE): exit 2 before any cell runs
    out.mkdir(parents=True, exist_ok=True)
    _clean_markers(out)  # left by a batch that was killed: not earlier attempts of this one
    records: dict[str, dict] = {}
    todo = []
    for cell in matrix.cells:
        done = finished(cell) if resume else None
        if done is not None:
            records[cell.name] = done
        else:
            todo.append(cell)
    executor = make_executor(address, local, num_cpus)
    progress = _Progress(console, len(matrix.cells), 1, quiet)
    for record in records.values():
        progress.cell(record)
    interrupted = None
    if not todo:
        progress.close()
        description = {"name": executor.name, "note": "every cell was built earlier (skipped): nothing ran"}
    else:
        with executor:
            executor.check(todo)
            description = executor.description
            progress.slots = max(1, description["cpus"] // min(c.resources.num_cpus for c in todo))
            if console is not None and not quiet and description.get("note"):
                console.print(description["note"], style="dim", markup=False, highlight=False)
            try:
                records.update(executor.run(todo, out, matrix.retries, progress.cell))
            except BatchInterrupted as e:
                by_name = {c.name: c for c in todo}
                for name, record in e.results.items():
                    if record.get("verdict") == "interrupted":  # its build may have swapped its output in already
                        record = _finished_meanwhile(by_name[name]) or record
                    records.setdefault(name, record)
                interrupted = e
            finally:
                progress.close()
    _clean_markers(out)
    summary = write_summary(out, matrix, description, records, time.perf_counter() - t0)
    if interrupted is not None:
        raise KeyboardInterrupt
    return BatchResult(summary, out)


def _finished_meanwhile(cell) -> dict | None:
    """A cell stopped after its build had written its output whole (before its worker reported): it is done."""
    done = finished(cell)
    return None if done is None else {**done, "skipped": False}


def _clean_markers(out: Path) -> None:
    running = out / RUNNING_DIR
    if running.is_dir():
        for p in running.glob("*.json"):
            p.unlink(missing_ok=True)
        try:
            running.rmdir()
        except OSError:
            pass
