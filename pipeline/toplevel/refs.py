"""``package.module:attr`` references (a user's model, evaluator, distillation teacher; a runner opener): one
importer, so every reference is checked and reported the same way (a leaf module)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from edgebuild.errors import BadInputError


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception as one line for the user (its type's name when it has no message)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def import_ref(ref: str, what: str, search=()):
    """The object ``package.module:attr`` names (``attr`` may be dotted). A malformed reference, a module that
    does not import (missing, SyntaxError, raising) or a missing attribute is a ``BadInputError`` naming ``what``.

    ``search``: folders (the config's, the current directory) where the reference's top-level module or package is
    looked for first; found there, it is imported from its own file and no folder is ever put on ``sys.path`` (a
    ``ml_dtypes.py`` in the working directory must not shadow a library for the whole process). Otherwise the
    ordinary import path (installed packages)."""
    mod_name, sep, attr = str(ref).partition(":")
    if not sep or not all(part.isidentifier() for part in [*mod_name.split("."), *attr.split(".")]):
        raise BadInputError(f"{what} {ref!r}: use package.module:attr")
    try:
        _load_top_level(mod_name.split(".")[0], search)
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


def _load_top_level(top: str, search) -> None:
    """Import ``top`` from the first of ``search`` that holds ``top.py`` or ``top/__init__.py``, by its file path
    (a package's submodules then import through its ``__path__``). The same file already imported is kept; a
    module of that name from another file (another build's) is replaced."""
    for folder in search:
        folder = Path(folder)
        package, single = folder / top / "__init__.py", folder / f"{top}.py"
        path = package if package.is_file() else single if single.is_file() else None
        if path is None:
            continue
        current = getattr(sys.modules.get(top), "__file__", None)
        if current and Path(current).resolve() == path.resolve():
            return
        spec = importlib.util.spec_from_file_location(
            top, path, submodule_search_locations=[str(path.parent)] if path is package else None)
        module = importlib.util.module_from_spec(spec)
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
        sys.modules[top] = module
        try:
            spec.loader.exec_module(module)
        except ModuleNotFoundError as e:
            sys.modules.pop(top, None)
            sibling = (e.name or "").split(".")[0]
            if sibling and ((folder / f"{sibling}.py").is_file() or (folder / sibling / "__init__.py").is_file()):
                raise ModuleNotFoundError(f"{e} ({path.name} is imported by its own path and no folder is put on "
                                          f"sys.path: import its sibling as part of a package (a folder with "
                                          f"__init__.py), or set PYTHONPATH={folder})", name=e.name) from None
            raise
        except BaseException:
            sys.modules.pop(top, None)
            raise
        return
