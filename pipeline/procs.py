"""Child-process helpers live in the leaf module ``edgebuild.procs`` (pipeline/toplevel/procs.py), which
``targets/`` imports without importing the pipeline; re-exported here."""
from __future__ import annotations

from edgebuild.procs import child_setup, die_with_parent, kill_group, terminate_as_interrupt  # noqa: F401
