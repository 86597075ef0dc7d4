""".npy/.npz files read as data only: never unpickled, each header checked before anything is allocated
(``read_npz``, ``read_npy``); anything else is one ``BadInputError`` that says what the file is. Calibration and
evaluation data (calibration/sources.py), sequences (calibration/sequences.py) and stored references read through
these."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.errors import BadInputError


def read_npz(path: Path, what: str = ".npz archive") -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` file. Anything else (a directory, a text file, a pickled object array, a header
    claiming more bytes than the member holds, a truncated or corrupt member) is one ``BadInputError`` that says
    what the file is; numpy's advice to load it with ``allow_pickle`` is never repeated."""
    import zipfile

    path = Path(path)
    _need_file(path, what)
    if not zipfile.is_zipfile(path):
        raise BadInputError(f"{path}: not a {what} (not a zip archive of .npy arrays)")
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise BadInputError(f"{path}: not a {what} (member {info.filename[:80]!r} is not a .npy array)")
                with zf.open(info) as fh:
                    _check_npy_header(fh, info.file_size, path, f"member {info.filename[:-4][:80]}", what)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except BadInputError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ValueError, OSError, MemoryError: corrupt or truncated
        raise BadInputError(f"{path}: not a readable {what} ({_npy_reason(e)})") from None


def read_npy(path: Path) -> np.ndarray:
    """One ``.npy`` array, checked like ``read_npz``'s members."""
    path = Path(path)
    _need_file(path, ".npy file")
    try:
        with open(path, "rb") as fh:
            _check_npy_header(fh, path.stat().st_size, path, "the array", ".npy file")
        return np.load(path, allow_pickle=False)
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(f"{path}: not a readable .npy file ({_npy_reason(e)})") from None


def _need_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory, not a {what}")
    if not path.is_file():
        raise BadInputError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")


def _check_npy_header(fh, size: int, path: Path, member: str, what: str) -> None:
    """Refuse, from the header alone, an object (pickled) dtype and a shape whose bytes the data cannot hold."""
    from numpy.lib import _format_impl as fmt

    try:
        version = fmt.read_magic(fh)
        shape, _, dtype = fmt._read_array_header(fh, version)
    except Exception as e:
        raise BadInputError(f"{path}: not a readable {what}: {member} is not a .npy array ({_npy_reason(e)})") from None
    if dtype.hasobject:
        raise BadInputError(f"{path}: not a readable {what}: {member} holds Python objects (a pickle); edgebuild "
                            "reads numbers only and never unpickles data")
    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if needed > size:
        raise BadInputError(f"{path}: not a readable {what}: {member} claims {list(shape)} {dtype} "
                            f"({_bytes(needed)}) but holds {_bytes(size)}: corrupt or truncated")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _npy_reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "pickle" in text:  # numpy's "...load it unsafely using allow_pickle=..." is not advice edgebuild gives
        return "it holds pickled data, which is never unpickled"
    return f"{type(e).__name__}: {text[:160]}"
