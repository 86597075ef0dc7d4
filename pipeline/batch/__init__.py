"""``edgebuild batch``: many models x many targets, each cell one ordinary build, on Ray (a local one-machine cluster
by default, an existing cluster by address) or, without Ray, on a local process pool.

    matrix.py     the matrix file as frozen, validated types (``load_matrix``: every cell checked before any work)
    cell.py       one cell in its worker process (threads bounded to its CPUs; ``finished``: may a re-run skip it)
    executors.py  Ray tasks or local processes; retries of a dead worker; Ctrl-C keeps finished cells
    summary.py    batch.json and batch.html
    run.py        ``run_batch`` (what the CLI calls)

Ray is imported only when a batch runs on it (``edgebuild --help`` imports no Ray).
"""
from __future__ import annotations


def run_batch(*args, **kwargs):
    """See ``edgebuild.pipeline.batch.run.run_batch``."""
    from edgebuild.pipeline.batch.run import run_batch as run

    return run(*args, **kwargs)
