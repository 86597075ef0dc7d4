"""``package.module:attr`` references (a user's model, evaluator, distillation teacher; a runner opener): one
importer, so every reference is checked and reported the same way (a leaf module)."""
from __future__ import annotations

import importlib
from pathlib import Path

from edgebuild.errors import BadInputError


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception as one line for the user (its type's name when it has no message)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def import_ref(ref: str, what: str):
    """The object ``package.module:attr`` names (``attr`` may be dotted). A malformed reference, a module that
    does not import (missing, SyntaxError, raising) or a missing attribute is a ``BadInputError`` naming ``what``."""
    mod_name, sep, attr = str(ref).partition(":")
    if not sep or not all(part.isidentifier() for part in [*mod_name.split("."), *attr.split(".")]):
        raise BadInputError(f"{what} {ref!r}: use package.module:attr")
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise BadInputError(f"cannot import {what} {ref}: {first_line(e, 300)}") from None
    except SyntaxError as e:
        raise BadInputError(f"cannot import {what} {ref}: SyntaxError in {Path(e.filename or '?').name} "
                            f"line {e.lineno}: {e.msg}") from None
    except Exception as e:  # the user's module raised while being imported
        raise BadInputError(f"cannot import {what} {ref}: importing {mod_name} raised "
                            f"{type(e).__name__}: {first_line(e, 300)}") from None
    return obj
