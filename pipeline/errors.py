"""The error family lives in the leaf module ``edgebuild.errors`` (pipeline/toplevel/errors.py), which
``calibration/`` and ``targets/`` import without importing the pipeline; re-exported here, the same classes."""
from __future__ import annotations

from edgebuild.errors import (  # noqa: F401
    BadInputError,
    BudgetError,
    ConversionError,
    EdgeBuildError,
    IntegrityError,
    MissingToolError,
)
import edgebuild.targets.base  # noqa: E402,F401 — a missing backend library's error names its backend's extra
