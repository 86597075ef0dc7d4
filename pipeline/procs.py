"""Child-process helpers and a build's scope live in the leaf module ``edgebuild.procs`` (pipeline/toplevel/procs.py),
which ``targets/`` imports without importing the pipeline; re-exported here."""
from __future__ import annotations

from edgebuild.procs import (  # noqa: F401
    OFFLINE_ENV, Children, Patch, Scope, bound, current, die_with_parent, entered, forget, kill_group, owners, patched,
    set_name, set_owner, tempdir, terminate_as_interrupt, track)
