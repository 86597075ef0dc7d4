"""The stage cache: a converted artifact keyed on (stage, config, input content hash, tool versions).

Entries live under ``$EDGEBUILD_CACHE`` (default ``~/.cache/edgebuild``); each is a directory of files plus
``artifact.json``. A hit copies the files into the new artifact directory (inputs are never mutated).

Trust boundary: whoever can write in the cache can choose what a build ships, so an entry is used only when its
writer is trusted, in one of two ways:

- **a key** (``EDGEBUILD_CACHE_KEY``: the key itself, or ``EDGEBUILD_CACHE_KEY_FILE``: a file holding it, at least
  16 bytes, never inside the cache): every entry carries an HMAC-SHA256 of its key name and its metadata (which
  records each file's sha256); an entry whose HMAC does not verify (swapped and re-hashed, written without the
  key or with another) is dropped and rebuilt. This is the way to share a cache (several users, Ray workers on a
  shared filesystem): every writer uses the same key; ``open_cache(location)`` (pipeline/cache_store.py)
  reads it from the environment.
- **no key**: the cache is private to one user: its folder (and each entry) must belong to the user running the
  build and must not be writable by group or others (it is created ``0700``). Otherwise it is not used: every
  lookup is a miss, nothing is stored, a warning is logged and each artifact's notes say why.

``EDGEBUILD_CACHE`` (or a spec's ``cache_dir``) may also name an object store, ``s3://bucket/prefix`` or
``gs://bucket/prefix``: ``pipeline/cache_store.py`` keeps the same entries there (it needs a key: nobody can check who
may write in a bucket); its ``open_cache(location)`` opens either kind.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.targets.base import Artifact
from edgebuild.pipeline.cache_keys import STAGES, cached, code_hash, key  # noqa: F401 (re-exported)

KEY_ENV, KEY_FILE_ENV = "EDGEBUILD_CACHE_KEY", "EDGEBUILD_CACHE_KEY_FILE"
MIN_KEY_BYTES = 16
log = logging.getLogger("edgebuild.cache")


OBJECT_STORES = ("s3://", "gs://", "gcs://")  # URIs of an object-store cache (pipeline/cache_store.py)


def is_object_store(location: object) -> bool:
    """``location`` is an object-store URI (``s3://…``, ``gs://…``), not a directory."""
    return isinstance(location, str) and location.startswith(OBJECT_STORES)


def default_location() -> str | Path:
    """Where the stage cache is: ``$EDGEBUILD_CACHE`` (a directory or an object-store URI, kept a string), else
    ~/.cache/edgebuild."""
    env = os.environ.get("EDGEBUILD_CACHE")
    return env if is_object_store(env) else default_root()


def default_root() -> Path:
    env = os.environ.get("EDGEBUILD_CACHE")
    if is_object_store(env):  # not a directory: callers that need one get the default folder
        env = None
    return Path(env or Path.home() / ".cache" / "edgebuild")


def cache_key(root: Path | None = None, environ=None) -> bytes | None:
    """The cache key from ``EDGEBUILD_CACHE_KEY`` or ``EDGEBUILD_CACHE_KEY_FILE`` (None: no key). A key that is too
    short, a key file that cannot be read or that lies inside the cache ``root`` is a ``BadInputError``."""
    env = os.environ if environ is None else environ
    if env.get(KEY_ENV) and env.get(KEY_FILE_ENV):
        raise BadInputError(f"{KEY_ENV} and {KEY_FILE_ENV} are both set: choose one")
    if env.get(KEY_ENV):
        secret, where = env[KEY_ENV].encode(), KEY_ENV
    elif env.get(KEY_FILE_ENV):
        path = Path(env[KEY_FILE_ENV]).expanduser()
        if root is not None and not is_object_store(str(root)) and path.resolve().is_relative_to(Path(root).resolve()):
            raise BadInputError(f"{KEY_FILE_ENV}={path}: the cache key must not be stored in the cache ({root})")
        try:
            secret, where = path.read_bytes().strip(), f"{KEY_FILE_ENV}={path}"
        except OSError as e:
            raise BadInputError(f"{KEY_FILE_ENV}={path}: cannot read the cache key ({e.strerror or e})") from None
    else:
        return None
    if len(secret) < MIN_KEY_BYTES:
        raise BadInputError(f"{where}: a cache key needs at least {MIN_KEY_BYTES} bytes")
    return secret


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")  # no '/', no '..', not hidden, not absolute
SHA256 = re.compile(r"[0-9a-f]{64}")


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

    def __init__(self, root: Path | None, secret: bytes | None = None):
        self.root = root  # None: disabled
        self.secret = secret  # the HMAC key (None: a private cache, checked by owner and mode)
        self.rejected: dict[str, str] = {}  # key -> why its entry was dropped (noted on the rebuilt artifact)
        self._warned = False

    # ---- trust: an HMAC with a key from outside the cache, or a cache only this user can write ----------------
    def untrusted(self) -> str | None:
        """Why the cache cannot be used (None: it can). With a key, entries prove themselves; without one, the
        folder must be this user's and not writable by group or others."""
        if self.root is None or self.secret is not None:
            return None
        why = _not_private(self.root)
        if why and not self._warned:
            self._warned = True
            log.warning("stage cache %s %s and no %s is set: not used (every stage runs); make it private "
                        "(chmod 700) or share it with a key", self.root, why, KEY_ENV)
        return why

    def _sign(self, k: str, meta: dict) -> dict:
        if self.secret is None:
            return meta
        body = json.dumps({"entry": k, "meta": meta}, sort_keys=True).encode()
        return {**meta, "hmac": hmac.new(self.secret, body, hashlib.sha256).hexdigest()}

    def _verified(self, k: str, entry: Path, meta) -> dict:
        """``meta`` without its signature, once the entry proved who wrote it (else ``BadEntry``)."""
        if not isinstance(meta, dict):
            raise BadEntry("metadata is not a mapping")
        meta = dict(meta)
        mac = meta.pop("hmac", None)
        if self.secret is not None:
            if not isinstance(mac, str) or not hmac.compare_digest(mac, self._sign(k, meta)["hmac"]):
                raise BadEntry("its HMAC does not verify with this cache key (written without the key, or changed)")
        elif _not_private(entry):
            raise BadEntry(f"the entry {_not_private(entry)}")
        return meta

    def has(self, k: str) -> bool:
        """An artifact entry is stored under ``k`` in a cache this build may use (``get`` still verifies it)."""
        return self.root is not None and not self.untrusted() and (self.root / k / "artifact.json").is_file()

    def get(self, k: str, directory: Path) -> Artifact | None:
        if self.root is None or self.untrusted():
            return None
        entry = self.root / k
        if not (entry / "artifact.json").is_file():
            return None
        try:
            art, digests = self._read_entry(k, entry, directory)
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

    def _artifact_meta(self, k: str, entry, text: str | bytes, directory: Path) -> tuple[Artifact, dict[str, str]]:
        """The artifact an entry's ``artifact.json`` describes and each file's recorded sha256, once its signature
        (or the entry's privacy), its file names and its digest list are checked (else ``BadEntry``)."""
        try:
            meta = self._verified(k, entry, json.loads(text))
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
        if not isinstance(digests, dict) or set(digests) != set(art.files) or art.main not in art.files \
                or not all(isinstance(d, str) and SHA256.fullmatch(d) for d in digests.values()):
            raise BadEntry("the recorded sha256 list does not match the files")
        return art, digests

    def _read_entry(self, k: str, entry: Path, directory: Path) -> tuple[Artifact, dict[str, str]]:
        art, digests = self._artifact_meta(k, entry, (entry / "artifact.json").read_text(), directory)
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
        why = self.untrusted()
        if why:
            art.notes.append(f"not stored in the stage cache: {self.root} {why} (no {KEY_ENV})")
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
        _make_root(self.root)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            digests = {}
            for f in art.files:
                shutil.copyfile(art.directory / f, tmp / f)
                digests[f] = file_hash(tmp / f)
                if digests[f] != file_hash(art.directory / f):
                    raise OSError(f"{f} changed while being stored")
            _publish(tmp, tmp / "artifact.json", self._sign(k, {**art.to_dict(), "sha256": digests}), self.root / k)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_result(self, k: str):
        """``(payload, arrays)`` stored under ``k``, or None (a miss, or a bad entry: removed)."""
        import numpy as np

        if self.root is None or self.untrusted():
            return None
        entry = self.root / k
        if not (entry / RESULT_FILE).is_file():
            return None
        try:
            payload, files = self._result_meta(k, entry, (entry / RESULT_FILE).read_text())
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


    def _result_meta(self, k: str, entry, text: str | bytes) -> tuple[object, dict[str, str]]:
        """A result entry's payload and its files' recorded sha256, once its signature (or the entry's privacy) and
        the payload's own digest are checked (``BadEntry``; a broken file raises ValueError/KeyError/TypeError)."""
        meta = self._verified(k, entry, json.loads(text))
        payload, files = meta["payload"], meta["files"]
        if payload_digest(payload) != meta["payload_sha256"] or not isinstance(files, dict):
            raise BadEntry("result.json does not match its recorded sha256")
        if any(n != ARRAYS_FILE for n in files) or not all(isinstance(d, str) and SHA256.fullmatch(d)
                                                         for d in files.values()):
            raise BadEntry("an entry file is not a plain result file")
        return payload, files

    def put_result(self, k: str, payload, arrays: dict | None = None) -> bool:
        """Store a JSON-serialisable ``payload`` (and arrays); False when it was not stored (disabled, not JSON,
        unwritable cache: it costs speed, never the build)."""
        import numpy as np

        if self.root is None or self.untrusted():
            return False
        self.rejected.pop(k, None)
        try:
            meta = {"payload": payload, "payload_sha256": payload_digest(payload), "files": {}}
            _make_root(self.root)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        except (TypeError, ValueError, OSError):
            return False
        try:
            if arrays:
                with open(tmp / ARRAYS_FILE, "wb") as fh:
                    np.savez(fh, **arrays)
                meta["files"][ARRAYS_FILE] = file_hash(tmp / ARRAYS_FILE)
            _publish(tmp, tmp / RESULT_FILE, self._sign(k, meta), self.root / k)
            return True
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False


# ---- result entries: JSON (and optionally arrays) that a stage computed, e.g. validation metrics, latency,
# the FP32 reference outputs, an accuracy search's choice. Same trust model as artifacts: a directory with plain
# file names, every file's sha256 recorded in ``result.json`` (whose payload carries its own sha256), arrays read
# with ``allow_pickle=False``. A bad entry is removed and the result computed again.
RESULT_FILE, ARRAYS_FILE = "result.json", "arrays.npz"


def payload_digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _not_private(path: Path) -> str | None:
    """Why ``path`` (the cache, or an entry in it) could be written by someone else (None: only by this user)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None  # created 0700 by this user when first needed
    except OSError as e:
        return f"cannot be checked ({e.strerror or e})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"is writable by {'group and others' if st.st_mode & 0o022 == 0o022 else 'others' if st.st_mode & 0o002 else 'its group'} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _make_root(root: Path) -> None:
    """The cache folder, created private (0700) when missing."""
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
