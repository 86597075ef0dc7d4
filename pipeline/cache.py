"""The stage cache: a converted artifact keyed on (stage, config, input content hash, tool versions).

Entries live under ``$EDGEBUILD_CACHE`` (default ``~/.cache/edgebuild``); each is a directory of files plus
``artifact.json``. A hit copies the files into the new artifact directory (inputs are never mutated).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from edgebuild.pipeline.errors import ConversionError
from edgebuild.targets.base import Artifact


def default_root() -> Path:
    return Path(os.environ.get("EDGEBUILD_CACHE") or Path.home() / ".cache" / "edgebuild")


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of edgebuild's own sources: a changed converter never gets a stale cache hit."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in ("targets", "calibration", "pipeline"):
        for f in sorted((root / folder).rglob("*")):
            if f.suffix in (".py", ".yaml") and f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")  # no '/', no '..', not hidden, not absolute


def plain_name(name: object) -> bool:
    return isinstance(name, str) and bool(PLAIN_NAME.fullmatch(name)) and ".." not in name


def file_hash(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _publish(tmp: Path, meta_file: Path, meta: dict, entry: Path) -> None:
    """Write an entry's metadata (synced) and move its directory into place; if another build stored the same
    key first, its entry stays and ours is dropped."""
    with open(meta_file, "w") as fh:
        fh.write(json.dumps(meta))
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


class BadEntry(Exception):
    """A cache entry that is not what was stored: removed, and the artifact is rebuilt."""


class StageCache:
    """Entries are verified on every read: plain file names, the sha256 of each file recorded at write.

    An entry is written in a private temporary directory and renamed into place (atomic; a concurrent
    build that stored the same key first wins). A bad entry (tampered, truncated, broken ``artifact.json``,
    names that leave the entry) is removed; the rebuilt artifact's notes say so.
    """

    def __init__(self, root: Path | None):
        self.root = root  # None: disabled
        self.rejected: dict[str, str] = {}  # key -> why its entry was dropped (noted on the rebuilt artifact)

    def get(self, k: str, directory: Path) -> Artifact | None:
        if self.root is None:
            return None
        entry = self.root / k
        if not (entry / "artifact.json").is_file():
            return None
        try:
            art, digests = self._read_entry(entry, directory)
        except BadEntry as e:
            self.rejected[k] = str(e)
            self._drop(entry)
            return None
        except OSError:  # unreadable or removed meanwhile by another build: a miss
            return None
        directory.mkdir(parents=True, exist_ok=True)
        copied = []
        try:
            for f in art.files:
                shutil.copyfile(entry / f, directory / f)
                copied.append(directory / f)
                if file_hash(directory / f) != digests[f]:  # changed between check and copy
                    raise BadEntry(f"{f} changed while being restored")
        except BadEntry as e:
            self._unlink(copied)
            self.rejected[k] = str(e)
            self._drop(entry)
            return None
        except FileNotFoundError:
            self._unlink(copied)
            return None
        except OSError as e:  # disk full, read-only output: this target cannot be written
            self._unlink(copied)
            raise ConversionError(f"{art.target}: cannot restore {art.main} from the stage cache into {directory} "
                                  f"({e.strerror or e})") from None
        art.notes = [*art.notes, "restored from the stage cache (sha256 verified)"]
        return art

    def _read_entry(self, entry: Path, directory: Path) -> tuple[Artifact, dict[str, str]]:
        try:
            meta = json.loads((entry / "artifact.json").read_text())
            if "sha256" not in meta:
                raise BadEntry("no sha256 recorded (an entry of an older edgebuild)")
            digests = meta.pop("sha256")
            art = Artifact.from_dict(meta, directory)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadEntry(f"artifact.json is broken ({type(e).__name__})") from None
        names = [*art.files, art.main]
        bad = [n for n in names if not plain_name(n)]
        if bad:
            raise BadEntry(f"file name {bad[0]!r} is not a plain file name")
        if not isinstance(digests, dict) or set(digests) != set(art.files) or art.main not in art.files:
            raise BadEntry("the recorded sha256 list does not match the files")
        for f in art.files:
            if not (entry / f).is_file() or (entry / f).is_symlink():
                raise BadEntry(f"{f} is missing")
            if file_hash(entry / f) != digests[f]:
                raise BadEntry(f"{f} does not match its recorded sha256 (tampered or truncated)")
        return art, digests

    def _drop(self, entry: Path) -> None:
        """Remove a bad entry: renamed away first, so no reader sees it half-deleted."""
        trash = entry.with_name(f".bad-{entry.name}-{os.getpid()}")
        try:
            os.replace(entry, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _unlink(paths: list[Path]) -> None:
        for p in paths:
            try:
                p.unlink()
            except OSError:
                pass

    def put(self, k: str, art: Artifact) -> None:
        if self.root is None:
            return
        if k in self.rejected:
            art.notes.append(f"the stage cache entry was bad ({self.rejected.pop(k)}): removed and rebuilt")
        try:
            self._put(k, art)
        except OSError as e:  # an unwritable cache costs speed, not the build
            art.notes.append(f"not stored in the stage cache ({type(e).__name__}: {e.strerror or e})")

    def _put(self, k: str, art: Artifact) -> None:
        bad = [n for n in [*art.files, art.main] if not plain_name(n)]
        if bad:
            raise OSError(f"file name {bad[0]!r} is not a plain file name")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            digests = {}
            for f in art.files:
                shutil.copyfile(art.directory / f, tmp / f)
                digests[f] = file_hash(tmp / f)
                if digests[f] != file_hash(art.directory / f):
                    raise OSError(f"{f} changed while being stored")
            _publish(tmp, tmp / "artifact.json", {**art.to_dict(), "sha256": digests}, self.root / k)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_result(self, k: str):
        """``(payload, arrays)`` stored under ``k``, or None (a miss, or a bad entry: removed)."""
        import numpy as np

        if self.root is None:
            return None
        entry = self.root / k
        if not (entry / RESULT_FILE).is_file():
            return None
        try:
            meta = json.loads((entry / RESULT_FILE).read_text())
            payload, files = meta["payload"], meta["files"]
            if _payload_digest(payload) != meta["payload_sha256"] or not isinstance(files, dict):
                raise BadEntry("result.json does not match its recorded sha256")
            if any(n != ARRAYS_FILE for n in files):
                raise BadEntry("an entry file is not a plain result file")
            arrays = {}
            if files:
                path = entry / ARRAYS_FILE
                if path.is_symlink() or file_hash(path) != files[ARRAYS_FILE]:
                    raise BadEntry(f"{ARRAYS_FILE} does not match its recorded sha256")
                with np.load(path, allow_pickle=False) as z:
                    arrays = {n: z[n] for n in z.files}
            return payload, arrays
        except (BadEntry, ValueError, KeyError, TypeError) as e:
            self.rejected[k] = str(e) if isinstance(e, BadEntry) else f"result.json is broken ({type(e).__name__})"
            self._drop(entry)
            return None
        except OSError:
            return None


    def put_result(self, k: str, payload, arrays: dict | None = None) -> bool:
        """Store a JSON-serialisable ``payload`` (and arrays); False when it was not stored (disabled, not JSON,
        unwritable cache: it costs speed, never the build)."""
        import numpy as np

        if self.root is None:
            return False
        self.rejected.pop(k, None)
        try:
            meta = {"payload": payload, "payload_sha256": _payload_digest(payload), "files": {}}
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        except (TypeError, ValueError, OSError):
            return False
        try:
            if arrays:
                with open(tmp / ARRAYS_FILE, "wb") as fh:
                    np.savez(fh, **arrays)
                meta["files"][ARRAYS_FILE] = file_hash(tmp / ARRAYS_FILE)
            _publish(tmp, tmp / RESULT_FILE, meta, self.root / k)
            return True
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False


# ---- result entries: JSON (and optionally arrays) that a stage computed, e.g. validation metrics, latency,
# the FP32 reference outputs, an accuracy search's choice. Same trust model as artifacts: a directory with plain
# file names, every file's sha256 recorded in ``result.json`` (whose payload carries its own sha256), arrays read
# with ``allow_pickle=False``. A bad entry is removed and the result computed again.
RESULT_FILE, ARRAYS_FILE = "result.json", "arrays.npz"


def _payload_digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
