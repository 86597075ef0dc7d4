"""Who runs the cells: Ray (``RayExecutor``: a local one-machine cluster by default, an existing cluster by address)
or, without Ray installed, a local pool of processes (``LocalExecutor``). Both run ``cell.run_cell`` once per cell in
a fresh process with the cell's CPUs as its threads, retry a cell whose worker died (``retries`` times, then the cell
is failed, exit 3), and report each cell as it ends through ``on_done(record)``. Ctrl-C / SIGTERM (a
KeyboardInterrupt in the driver) cancels what has not finished; finished cells' outputs are complete (each build
swaps its output in atomically), the others are left as they were.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from edgebuild.pipeline.batch.cell import run_cell
from edgebuild.pipeline.batch.matrix import Cell
from edgebuild.pipeline.errors import BadInputError

OnDone = Callable[[dict], None]
# Sent to every Ray worker (whose environment is its node's, not the driver's): where the shared cache's key is and
# the node lock's path when the driver names one (pipeline/batch/turns.py; default: each node's temp directory). The key itself (EDGEBUILD_CACHE_KEY) is never sent: a task's environment is visible to
# whoever can inspect the cluster; give it to each node (`ray start`'s environment) or use EDGEBUILD_CACHE_KEY_FILE.
FORWARDED_ENV = ("EDGEBUILD_CACHE_KEY_FILE", "EDGEBUILD_NODE_LOCK")
OBJECT_STORE_BYTES = 100 << 20  # a local Ray's object store: cells return small dicts, artifacts go to disk
POLL_SECONDS = 0.2
CANCEL_GRACE_S = 10.0  # Ctrl-C: how long running builds get to clean up before their workers are killed


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def crashed(cell: Cell, attempts: int, why: str) -> dict:
    return {"model": cell.model, "target": cell.target, "out": str(cell.out), "skipped": False, "exit": 3,
            "verdict": "error", "error": f"the worker died {attempts} time(s) ({why}); not retried further",
            "attempts": attempts}


def interrupted(cell: Cell) -> dict:
    return {"model": cell.model, "target": cell.target, "out": str(cell.out), "skipped": False, "exit": 130,
            "verdict": "interrupted", "error": "the batch was interrupted before this cell finished"}


class RayExecutor:
    """Each cell one Ray task (``num_cpus``, ``memory``, ``max_retries``; ``max_calls=1``: a fresh worker process).

    ``address``: None starts a local cluster of this machine (``ray.init(address="local")``, no dashboard, a small
    object store, the workers' output kept out of the terminal); ``auto`` or ``host:port`` joins a running cluster
    (``RAY_ADDRESS`` when the flag is not given, as under ``ray job submit``)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = num_cpus
        self.started_local = False
        self.nodes: list[dict] = []

    def __enter__(self):
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network: Ray's usage report off
        common = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
        try:
            if self.address:
                ray.init(address=self.address, **common)
            else:
                from edgebuild.pipeline.timing import host_cores

                ray.init(address="local", num_cpus=self.num_cpus or host_cores(), include_dashboard=False,
                         object_store_memory=OBJECT_STORE_BYTES, **common)
                self.started_local = True
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BadInputError(f"cannot start or reach the Ray cluster ({self.address or 'local'}): "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return self

    def __exit__(self, *exc):
        import ray

        ray.shutdown()
        return False

    @property
    def description(self) -> dict:
        return {"name": self.name, "address": self.address or "local",
                "nodes": len(self.nodes), "cpus": sum(int(n.get("CPU", 0)) for n in self.nodes)}

    def check(self, cells: list[Cell]) -> None:
        """A cell no node can hold would wait for ever: say so before anything runs."""
        for c in cells:
            fits = [n for n in self.nodes if n.get("CPU", 0) >= c.resources.num_cpus
                    and n.get("memory", float("inf")) >= c.resources.memory_mb * 1e6]
            if not fits:
                most_cpu = max((int(n.get("CPU", 0)) for n in self.nodes), default=0)
                most_mem = max((n.get("memory", 0) / 1e6 for n in self.nodes), default=0)
                raise BadInputError(f"cell {c.name} needs {c.resources.num_cpus} CPU(s) and {c.resources.memory_mb} MB; "
                                    f"the largest node offers {most_cpu} CPU(s), {most_mem:.0f} MB: lower its "
                                    "resources (resources.num_cpus / memory_mb)")

    def run(self, cells: list[Cell], batch_out: Path, retries: int, on_done: OnDone) -> dict[str, dict]:
        import ray

        task = ray.remote(max_calls=1)(run_cell)
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        refs = {}
        for c in cells:
            refs[task.options(num_cpus=c.resources.num_cpus, memory=int(c.resources.memory_mb * 1e6),
                              max_retries=retries, retry_exceptions=False, name=f"edgebuild:{c.name}",
                              runtime_env={"env_vars": env} if env else None)
                 .remote(c.to_dict(), str(batch_out))] = c
        results: dict[str, dict] = {}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS * 5)
                for ref in done:
                    cell = refs[ref]
                    try:
                        record = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        record = crashed(cell, retries + 1, type(e).__name__)
                    results[cell.name] = record
                    on_done(record)
        except KeyboardInterrupt:
            for ref in pending:  # a KeyboardInterrupt in each running build: it removes its staging, kills its children
                ray.cancel(ref, force=False)
            _, stuck = ray.wait(pending, num_returns=len(pending), timeout=CANCEL_GRACE_S) if pending else ([], [])
            for ref in stuck:  # then the worker processes themselves (the next build of the cell cleans up after them)
                ray.cancel(ref, force=True)
            for ref in pending:
                results[refs[ref].name] = interrupted(refs[ref])
            raise BatchInterrupted(results) from None
        return results


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a batch, carrying the cells that finished (and the others, as interrupted)."""

    def __init__(self, results: dict[str, dict]):
        super().__init__()
        self.results = results


class LocalExecutor:
    """Without Ray: one spawned process per cell, as many at once as their CPUs fit on this host's cores."""

    name = "local"

    def __init__(self, num_cpus: int | None = None, why: str = "Ray is not installed (pip install 'edgebuild[batch]')"):
        from edgebuild.pipeline.timing import host_cores

        self.cores = num_cpus or host_cores()
        self.why = why

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def description(self) -> dict:
        return {"name": self.name, "address": None, "nodes": 1, "cpus": self.cores,
                "note": f"{self.why}: a local process pool ran the cells"}

    def check(self, cells: list[Cell]) -> None:
        for c in cells:
            if c.resources.num_cpus > self.cores:
                raise BadInputError(f"cell {c.name} needs {c.resources.num_cpus} CPU(s); this host has {self.cores}: "
                                    "lower its resources.num_cpus")

    def run(self, cells: list[Cell], batch_out: Path, retries: int, on_done: OnDone) -> dict[str, dict]:
        import multiprocessing as mp
        from multiprocessing.connection import wait

        ctx = mp.get_context("spawn")  # a fresh interpreter: thread limits set before any runtime loads
        queue = list(cells)
        attempts = {c.name: 0 for c in cells}
        running: dict = {}  # process sentinel -> (process, receiving end, cell)
        results: dict[str, dict] = {}
        try:
            while queue or running:
                used = sum(c.resources.num_cpus for _, _, c in running.values())
                while queue and (not running or used + queue[0].resources.num_cpus <= self.cores):
                    c = queue.pop(0)
                    recv, send = ctx.Pipe(duplex=False)
                    p = ctx.Process(target=_child, args=(send, c.to_dict(), str(batch_out)), name=f"edgebuild:{c.name}")
                    p.start()
                    send.close()
                    attempts[c.name] += 1
                    running[p.sentinel] = (p, recv, c)
                    used += c.resources.num_cpus
                for sentinel in wait(list(running), timeout=POLL_SECONDS * 5):
                    p, recv, c = running.pop(sentinel)
                    record = recv.recv() if recv.poll() else None
                    p.join()
                    recv.close()
                    if record is None and attempts[c.name] <= retries:
                        queue.insert(0, c)  # the worker died: run it again
                        continue
                    record = record or crashed(c, attempts[c.name], f"exit code {p.exitcode}")
                    results[c.name] = record
                    on_done(record)
        except KeyboardInterrupt:
            for p, recv, c in running.values():
                p.terminate()
            for p, recv, c in running.values():
                p.join(5)
                if p.is_alive():
                    p.kill()
                results[c.name] = interrupted(c)
            for c in queue:
                results[c.name] = interrupted(c)
            raise BatchInterrupted(results) from None
        return results


def _child(send, cell_data: dict, batch_out: str) -> None:
    import signal

    from edgebuild.procs import terminate_as_interrupt

    signal.signal(signal.SIGTERM, terminate_as_interrupt)  # the batch stopping: the build cleans up, kills its children
    send.send(run_cell(cell_data, batch_out))
    send.close()


def make_executor(address: str | None, local: bool, num_cpus: int | None = None):
    """Ray unless ``local`` (or Ray is missing: then the pool, and the summary says so)."""
    if address and local:
        raise BadInputError("--address and --local: choose one")
    if local:
        return LocalExecutor(num_cpus, why="--local")
    if not ray_available():
        if address or os.environ.get("RAY_ADDRESS"):
            raise BadInputError("--address needs Ray: pip install 'edgebuild[batch]'")
        return LocalExecutor(num_cpus)
    return RayExecutor(address, num_cpus)
