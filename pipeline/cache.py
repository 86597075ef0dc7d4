"""The stage cache: a converted artifact keyed on (stage, config, input content hash, tool versions).

Entries live under ``$EDGEBUILD_CACHE`` (default ``~/.cache/edgebuild``); each is a directory of files plus
``artifact.json``. A hit copies the files into the new artifact directory (inputs are never mutated).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

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


class StageCache:
    def __init__(self, root: Path | None):
        self.root = root  # None: disabled

    def get(self, k: str, directory: Path) -> Artifact | None:
        if self.root is None:
            return None
        entry = self.root / k
        meta = entry / "artifact.json"
        if not meta.is_file():
            return None
        art = Artifact.from_dict(json.loads(meta.read_text()), directory)
        if not all((entry / f).is_file() for f in art.files):
            return None
        directory.mkdir(parents=True, exist_ok=True)
        for f in art.files:
            shutil.copyfile(entry / f, directory / f)
        art.notes = [*art.notes, "restored from the stage cache"]
        return art

    def put(self, k: str, art: Artifact) -> None:
        if self.root is None:
            return
        try:
            self._put(k, art)
        except OSError as e:  # an unwritable cache costs speed, not the build
            art.notes.append(f"not stored in the stage cache ({type(e).__name__}: {e.strerror or e})")

    def _put(self, k: str, art: Artifact) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            for f in art.files:
                shutil.copyfile(art.directory / f, tmp / f)
            (tmp / "artifact.json").write_text(json.dumps(art.to_dict()))
            try:
                os.replace(tmp, self.root / k)
            except OSError:  # another build stored the same key first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
