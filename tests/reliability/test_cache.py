"""The stage cache verifies every entry: plain names, sha256 per file; a bad entry is dropped and rebuilt."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from edgebuild.pipeline.cache import StageCache
from edgebuild.pipeline.errors import ConversionError
from edgebuild.targets.base import Artifact


def _artifact(d: Path, payload: bytes = b"model-bytes" * 100) -> Artifact:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model_int8.onnx").write_bytes(payload)
    (d / "side.txt").write_text("side")
    return Artifact("onnx-cpu", "onnx", "int8", d, "model_int8.onnx", ["model_int8.onnx", "side.txt"])


@pytest.fixture
def stored(tmp_path):
    cache = StageCache(tmp_path / "cache")
    cache.put("k", _artifact(tmp_path / "src"))
    return cache, tmp_path / "cache" / "k"


def _edit_meta(entry: Path, fn) -> None:
    meta = json.loads((entry / "artifact.json").read_text())
    fn(meta)
    (entry / "artifact.json").write_text(json.dumps(meta))


def _flip(entry: Path) -> None:
    data = bytearray((entry / "model_int8.onnx").read_bytes())
    data[10] ^= 1
    (entry / "model_int8.onnx").write_bytes(bytes(data))


def _truncate(entry: Path) -> None:
    (entry / "model_int8.onnx").write_bytes((entry / "model_int8.onnx").read_bytes()[:7])


def _traversal(entry: Path) -> None:
    def fn(meta):
        meta["files"].append("../../escaped.txt")
        meta["sha256"]["../../escaped.txt"] = meta["sha256"]["side.txt"]
    _edit_meta(entry, fn)


def _absolute(entry: Path) -> None:
    def fn(meta):
        meta["files"] = ["/tmp/edgebuild-abs-x"]
        meta["sha256"] = {"/tmp/edgebuild-abs-x": "0"}
    _edit_meta(entry, fn)


def _hidden(entry: Path) -> None:
    def fn(meta):
        meta["files"].append(".bashrc")
        meta["sha256"][".bashrc"] = "0"
    _edit_meta(entry, fn)


def _main_elsewhere(entry: Path) -> None:
    _edit_meta(entry, lambda meta: meta.update(main="../model.onnx"))


def _broken_json(entry: Path) -> None:
    (entry / "artifact.json").write_text("{not json")


def _no_hashes(entry: Path) -> None:
    _edit_meta(entry, lambda meta: meta.pop("sha256"))


def _missing_file(entry: Path) -> None:
    (entry / "side.txt").unlink()


def _symlink(entry: Path) -> None:
    (entry / "side.txt").unlink()
    (entry / "side.txt").symlink_to("/etc/hostname")


def _hash_list_mismatch(entry: Path) -> None:
    _edit_meta(entry, lambda meta: meta["sha256"].pop("side.txt"))


BAD = {"bit flip": _flip, "truncated": _truncate, "path traversal": _traversal, "absolute path": _absolute,
       "hidden name": _hidden, "main outside": _main_elsewhere, "broken artifact.json": _broken_json,
       "no sha256 (old entry)": _no_hashes, "missing file": _missing_file, "symlink": _symlink,
       "sha256 list mismatch": _hash_list_mismatch}


def test_a_good_entry_is_restored_verified(stored, tmp_path):
    cache, _ = stored
    art = cache.get("k", tmp_path / "dst")
    assert art is not None and (tmp_path / "dst" / "model_int8.onnx").read_bytes() == b"model-bytes" * 100
    assert any("sha256 verified" in n for n in art.notes)


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_entry_is_dropped_never_shipped_and_noted_when_rebuilt(case, stored, tmp_path):
    cache, entry = stored
    BAD[case](entry)
    dst = tmp_path / "out" / "target"
    assert cache.get("k", dst) is None
    assert not entry.exists()  # removed
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "escaped.txt").exists()
    assert not Path("/tmp/edgebuild-abs-x").exists()
    assert not dst.exists() or not any(dst.iterdir())  # nothing restored
    rebuilt = _artifact(tmp_path / "rebuilt")
    cache.put("k", rebuilt)
    assert any("removed and rebuilt" in n for n in rebuilt.notes), rebuilt.notes
    assert cache.get("k", tmp_path / "again") is not None  # the rebuilt entry is good


def test_disk_full_while_restoring_is_one_conversion_error(stored, tmp_path, monkeypatch):
    import errno
    import shutil

    cache, entry = stored
    real = shutil.copyfile

    def full(src, dst, *a, **k):
        if "dst" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(ConversionError, match="cannot restore .*No space left on device"):
        cache.get("k", tmp_path / "dst")
    assert entry.exists()  # a good entry is kept
    assert not any((tmp_path / "dst").iterdir())


def test_a_file_name_that_leaves_the_entry_is_never_stored(tmp_path):
    cache = StageCache(tmp_path / "cache")
    art = _artifact(tmp_path / "src")
    art.files.append("../outside")
    cache.put("k", art)
    assert not (tmp_path / "cache" / "k").exists()
    assert any("not stored in the stage cache" in n for n in art.notes)


def test_concurrent_puts_of_one_key_leave_one_good_entry(tmp_path):
    cache = StageCache(tmp_path / "cache")
    arts = [_artifact(tmp_path / f"src{i}") for i in range(8)]
    threads = [threading.Thread(target=cache.put, args=("k", a)) for a in arts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.get("k", tmp_path / "dst") is not None
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k"]  # no temporary left
