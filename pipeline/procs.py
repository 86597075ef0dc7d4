"""Child-process helpers live in the leaf module ``edgebuild.procs`` (pipeline/toplevel/procs.py), which
``targets/`` imports without importing the pipeline; re-exported here."""
from __future__ import annotations

from edgebuild.procs import (  # noqa: F401
    die_with_parent, forget, kill_group, kill_tracked, set_name, terminate_as_interrupt, track)
