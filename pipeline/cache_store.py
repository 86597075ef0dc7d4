"""The stage cache in an object store: ``EDGEBUILD_CACHE=s3://bucket/prefix`` (or ``gs://bucket/prefix``), through
``pyarrow.fs`` (the ``store`` extra). The same entries as a directory cache (pipeline/cache.py), laid out as:

- ``<prefix>/blobs/<sha256>``: one object per file content, named by the sha256 of its bytes. Two builds that upload
  the same file upload the same bytes under the same name; a file two entries share is stored once.
- ``<prefix>/<key>/artifact.json`` or ``<prefix>/<key>/result.json``: the entry's metadata (which records the sha256
  of each of its files), signed with the cache key: an HMAC-SHA256 over the entry's name and its metadata. It is
  written last, after every blob it names, by one PUT (an object store replaces an object whole): an entry without
  its metadata does not exist (a writer that died half-way leaves only blobs nobody reads), and two builds storing
  the same key at once each leave a complete signed entry, the last one staying.

A read downloads the metadata, checks its HMAC, downloads each blob into a private folder beside the destination on
the local disk, checks its sha256 there and only then moves it into place. Whatever does not verify (metadata
re-hashed or written without the key or with another one, a blob swapped, truncated or missing) is never used:
that metadata (and a blob whose bytes are not its name) is deleted, the stage runs again and stores a new entry,
and the rebuilt artifact's notes say why.

Trust: an object store needs the key (``EDGEBUILD_CACHE_KEY`` or ``EDGEBUILD_CACHE_KEY_FILE``); edgebuild cannot
see who may write in a bucket, so a keyless store is refused (exit 2) rather than trusted.

Credentials and the endpoint come from the store library's usual environment (AWS: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / an instance role, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``;
GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server) or from the URI's query
(``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``). edgebuild connects to nothing else, and to nothing
at all unless the cache names a store. A store that cannot be reached costs speed, never the build: after the first
failure this build stops asking it (every lookup a miss, nothing stored, the artifacts' notes say why).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from edgebuild.pipeline.cache import (ARRAYS_FILE, KEY_ENV, KEY_FILE_ENV, RESULT_FILE, BadEntry, StageCache,
                                      cache_key, file_hash, is_object_store, payload_digest, plain_name)
from edgebuild.pipeline.errors import BadInputError, ConversionError, MissingToolError
from edgebuild.targets.base import Artifact

ARTIFACT_FILE = "artifact.json"
BLOBS = "blobs"
BLOCK = 1 << 20
log = logging.getLogger("edgebuild.cache")


def open_cache(location: Path | str | None) -> StageCache:
    """The stage cache at ``location``: a directory (``StageCache``), an object-store URI (``StoreCache``), or None
    (disabled), with the key from the environment, if any. An object store without a key, or without pyarrow, is a
    ``BadInputError`` (exit 2)."""
    if is_object_store(location):
        return StoreCache.open(location, cache_key(location))
    root = Path(location) if location is not None else None
    return StageCache(root, cache_key(root) if root is not None else None)


class StoreDown(Exception):
    """The object store failed (unreachable, denied, throttled): this build stops using it."""


class StoreCache(StageCache):
    """The stage cache's entries in an object store (see the module's doc); the same interface as ``StageCache``."""

    def __init__(self, uri: str, secret: bytes, fs=None, base: str = "", down: str | None = None):
        super().__init__(None, secret)
        self.root = uri  # a URI, not a directory: only for messages
        self.fs, self.base = fs, base.strip("/")
        self.down = down  # why the store is not used any more by this build (None: it is)

    @classmethod
    def open(cls, uri: str, secret: bytes | None) -> "StoreCache":
        """The store at ``uri`` with the cache key ``secret``: no key is a ``BadInputError``, no pyarrow a
        ``MissingToolError`` (both exit 2), a URI pyarrow cannot parse a ``BadInputError``; a store that cannot be
        reached is opened 'down' (every lookup a miss)."""
        if secret is None:
            raise BadInputError(f"cache {uri}: an object-store cache needs a key ({KEY_ENV} or {KEY_FILE_ENV}, the "
                                "same for every build that shares it): edgebuild cannot see who may write in a "
                                "bucket, and whoever can would choose what a build ships")
        try:
            import pyarrow
            from pyarrow import fs as pafs
        except ModuleNotFoundError:
            raise MissingToolError("", "pyarrow", needed_by=f"the object-store cache {uri}", extra="store") from None
        scheme = uri.split("://", 1)[0]
        if scheme == "gcs":
            uri = "gs://" + uri.split("://", 1)[1]
        try:
            fs, base = pafs.FileSystem.from_uri(uri)
        except (ValueError, TypeError, pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError) as e:
            raise BadInputError(f"cache {uri}: not an object-store location pyarrow can open ({e})") from None
        except (OSError, pyarrow.ArrowException) as e:  # e.g. resolving the bucket's region: the network
            cache = cls(uri, secret, down=_why(uri, e))
            log.warning("stage cache %s", cache.down)
            return cache
        if not base.strip("/"):
            raise BadInputError(f"cache {uri}: name a bucket (s3://bucket/prefix)")
        return cls(uri, secret, fs, base)

    # ---- the store: every call that can fail for the store's sake raises StoreDown ----------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _blob(self, digest: str) -> str:
        return self._path(BLOBS, digest)

    def _errors(self):
        import pyarrow

        return (OSError, pyarrow.ArrowException)

    def _fail(self, e: BaseException) -> None:
        if self.down is None:
            self.down = _why(self.root, e)
            log.warning("stage cache %s: not used for the rest of this build", self.down)

    def _read(self, path: str) -> bytes | None:
        """An object's bytes (None: there is no such object)."""
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except self._errors() as e:
            raise StoreDown(e) from None

    def _write(self, path: str, data: bytes) -> None:
        try:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        except self._errors() as e:
            raise StoreDown(e) from None

    def _delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except self._errors():
            pass

    def _download(self, digest: str, dest: Path, name: str) -> None:
        """Blob ``digest`` into the local file ``dest``, its sha256 checked on the way (``BadEntry``: missing or
        not what it is named; the bad blob is deleted). A failure writing ``dest`` is an OSError."""
        h = hashlib.sha256()
        try:
            src = self.fs.open_input_stream(self._blob(digest))
        except FileNotFoundError:
            raise BadEntry(f"{name} is missing (its blob {digest[:16]}… is not in the store)") from None
        except self._errors() as e:
            raise StoreDown(e) from None
        with src, open(dest, "wb") as out:
            while True:
                try:
                    block = src.read(BLOCK)
                except self._errors() as e:
                    raise StoreDown(e) from None
                if not block:
                    break
                h.update(block)
                out.write(block)
        if h.hexdigest() != digest:
            self._delete(self._blob(digest))
            raise BadEntry(f"{name} does not match its recorded sha256 (tampered or truncated)")

    def _upload(self, src: Path, digest: str) -> None:
        """A private local file (its content fixed) to the blob named by its sha256."""
        try:
            with open(src, "rb") as f, self.fs.open_output_stream(self._blob(digest)) as out:
                for block in iter(lambda: f.read(BLOCK), b""):
                    out.write(block)
        except self._errors() as e:
            if isinstance(e, OSError) and getattr(e, "filename", None) == str(src):
                raise  # our own file, not the store
            raise StoreDown(e) from None

    def _drop_entry(self, k: str, marker: str) -> None:
        self._delete(self._path(k, marker))

    # ---- the StageCache interface ------------------------------------------------------------------------------
    def untrusted(self) -> str | None:
        return None  # a store always has a key (``open``)

    def has(self, k: str) -> bool:
        if self.down:
            return False
        try:
            from pyarrow import fs as pafs

            return self.fs.get_file_info(self._path(k, ARTIFACT_FILE)).type == pafs.FileType.File
        except self._errors() as e:
            self._fail(e)
            return False

    def get(self, k: str, directory: Path) -> Artifact | None:
        if self.down:
            return None
        try:
            text = self._read(self._path(k, ARTIFACT_FILE))
            if text is None:
                return None
            art, digests = self._artifact_meta(k, f"{self.root}/{k}", text, directory)
            directory.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tmp-restore-"))
            try:
                for f in art.files:  # downloaded and checked on the local disk, then moved into place
                    self._download(digests[f], tmp / f, f)
                for f in art.files:
                    os.replace(tmp / f, directory / f)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except BadEntry as e:
            self.rejected[k] = str(e)
            self._drop_entry(k, ARTIFACT_FILE)
            return None
        except StoreDown as e:
            self._fail(e.args[0] if e.args else e)
            return None
        except OSError as e:  # the local disk: this target cannot be written
            raise ConversionError(f"cannot restore an artifact from the stage cache {self.root} into {directory} "
                                  f"({e.strerror or e})") from None
        art.notes = [*art.notes, f"restored from the stage cache (sha256 and HMAC verified; {self.root})"]
        return art

    def put(self, k: str, art: Artifact) -> None:
        if self.down:
            art.notes.append(f"not stored in the stage cache: {self.down}")
            return
        if k in self.rejected:
            art.notes.append(f"the stage cache entry was bad ({self.rejected.pop(k)}): removed and rebuilt")
        bad = [n for n in [*art.files, art.main] if not plain_name(n)]
        if bad:
            art.notes.append(f"not stored in the stage cache (file name {bad[0]!r} is not a plain file name)")
            return
        try:
            tmp = Path(tempfile.mkdtemp(dir=art.directory.parent, prefix=".tmp-store-"))
        except OSError as e:
            art.notes.append(f"not stored in the stage cache ({e.strerror or e})")
            return
        try:
            digests = {}
            for f in art.files:  # a private copy: what is uploaded is what was hashed
                shutil.copyfile(art.directory / f, tmp / f)
                digests[f] = file_hash(tmp / f)
                if digests[f] != file_hash(art.directory / f):
                    raise OSError(f"{f} changed while being stored")
            for f in art.files:
                self._upload(tmp / f, digests[f])
            meta = self._sign(k, {**art.to_dict(), "sha256": digests})
            self._write(self._path(k, ARTIFACT_FILE), json.dumps(meta).encode())  # last: the entry exists now
        except StoreDown as e:
            self._fail(e.args[0] if e.args else e)
            art.notes.append(f"not stored in the stage cache: {self.down}")
        except OSError as e:
            art.notes.append(f"not stored in the stage cache ({type(e).__name__}: {e.strerror or e})")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_result(self, k: str):
        import numpy as np

        if self.down:
            return None
        try:
            text = self._read(self._path(k, RESULT_FILE))
            if text is None:
                return None
            payload, files = self._result_meta(k, f"{self.root}/{k}", text)
            arrays = {}
            if files:
                with tempfile.TemporaryDirectory(prefix="edgebuild-cache-") as tmp:
                    path = Path(tmp) / ARRAYS_FILE
                    self._download(files[ARRAYS_FILE], path, ARRAYS_FILE)
                    with np.load(path, allow_pickle=False) as z:
                        arrays = {n: z[n] for n in z.files}
            return payload, arrays
        except (BadEntry, ValueError, KeyError, TypeError) as e:
            self.rejected[k] = str(e) if isinstance(e, BadEntry) else f"result.json is broken ({type(e).__name__})"
            self._drop_entry(k, RESULT_FILE)
            return None
        except StoreDown as e:
            self._fail(e.args[0] if e.args else e)
            return None
        except OSError:
            return None

    def put_result(self, k: str, payload, arrays: dict | None = None) -> bool:
        import numpy as np

        if self.down:
            return False
        self.rejected.pop(k, None)
        try:
            meta = {"payload": payload, "payload_sha256": payload_digest(payload), "files": {}}
            with tempfile.TemporaryDirectory(prefix="edgebuild-cache-") as tmp:
                if arrays:
                    path = Path(tmp) / ARRAYS_FILE
                    with open(path, "wb") as fh:
                        np.savez(fh, **arrays)
                    meta["files"][ARRAYS_FILE] = digest = file_hash(path)
                    self._upload(path, digest)
                self._write(self._path(k, RESULT_FILE), json.dumps(self._sign(k, meta)).encode())
            return True
        except (TypeError, ValueError, OSError):
            return False
        except StoreDown as e:
            self._fail(e.args[0] if e.args else e)
            return False


def _why(uri: str, e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{uri} cannot be used ({type(e).__name__}: {text[:300]})"
