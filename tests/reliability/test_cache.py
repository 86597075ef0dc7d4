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


# ---- the trust boundary: an HMAC with a key from outside the cache, or a cache private to one user ------------
KEY = b"k" * 32


def _swap_and_rehash(entry: Path, mac_key: bytes | None = None) -> None:
    """What a cache writer without the key can do: swap a file and record its new sha256 (and sign with its own key)."""
    import hashlib
    import hmac

    (entry / "model_int8.onnx").write_bytes(b"an FP32 model, not INT8" * 10)
    meta = json.loads((entry / "artifact.json").read_text())
    meta.pop("hmac", None)
    meta["sha256"]["model_int8.onnx"] = hashlib.sha256((entry / "model_int8.onnx").read_bytes()).hexdigest()
    if mac_key:
        body = json.dumps({"entry": entry.name, "meta": meta}, sort_keys=True).encode()
        meta["hmac"] = hmac.new(mac_key, body, hashlib.sha256).hexdigest()
    (entry / "artifact.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("resigned_with", [None, b"x" * 32], ids=["unsigned", "another key"])
def test_with_a_key_a_swapped_and_rehashed_entry_is_rejected(resigned_with, tmp_path):
    cache = StageCache(tmp_path / "cache", KEY)
    cache.put("k", _artifact(tmp_path / "src"))
    assert cache.get("k", tmp_path / "good") is not None  # signed and verified
    _swap_and_rehash(tmp_path / "cache" / "k", resigned_with)
    assert cache.get("k", tmp_path / "dst") is None
    assert "HMAC does not verify" in cache.rejected["k"]
    assert not (tmp_path / "dst" / "model_int8.onnx").exists()


def test_with_a_key_an_entry_moved_to_another_key_or_a_forged_result_is_rejected(tmp_path):
    cache = StageCache(tmp_path / "cache", KEY)
    cache.put("a", _artifact(tmp_path / "src"))
    os.rename(tmp_path / "cache" / "a", tmp_path / "cache" / "b")  # signed for "a", not for "b"
    assert cache.get("b", tmp_path / "dst") is None
    assert cache.put_result("lat", {"p50_ms": 3.2})
    entry = tmp_path / "cache" / "lat" / "result.json"
    meta = json.loads(entry.read_text())
    meta["payload"] = {"p50_ms": 0.000123}
    from edgebuild.pipeline.cache import payload_digest
    meta["payload_sha256"] = payload_digest(meta["payload"])
    entry.write_text(json.dumps(meta))
    assert cache.get_result("lat") is None


def test_without_a_key_the_same_swap_is_the_owner_s_own_business(tmp_path):
    """No key: the cache is private (0700, this user's): only its owner can swap an entry."""
    cache = StageCache(tmp_path / "cache")
    cache.put("k", _artifact(tmp_path / "src"))
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    assert cache.untrusted() is None


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "another user", "a file"])
def test_without_a_key_a_cache_others_can_write_is_not_used(how, tmp_path, caplog):
    root = tmp_path / "cache"
    StageCache(root).put("k", _artifact(tmp_path / "src"))
    StageCache(root).put_result("r", {"p50_ms": 1.0})
    if how == "world-writable":
        root.chmod(0o777)
    elif how == "group-writable":
        root.chmod(0o770)
    elif how == "another user":
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(root, 65534, 65534)
    else:
        import shutil
        shutil.rmtree(root)
        root.write_text("not a folder")
    cache = StageCache(root)
    with caplog.at_level("WARNING", logger="edgebuild.cache"):
        assert cache.get("k", tmp_path / "dst") is None and cache.get_result("r") is None
    assert "not used" in caplog.text and "EDGEBUILD_CACHE_KEY" in caplog.text
    art = _artifact(tmp_path / "new")
    cache.put("k2", art)
    assert any("not stored in the stage cache" in n for n in art.notes), art.notes
    assert not cache.put_result("r2", {"x": 1})
    assert not cache.has("k")  # a build does not plan on entries it will not use
    assert StageCache(root, KEY).untrusted() is None  # a key makes a shared cache usable


def test_without_a_key_an_entry_of_another_user_is_dropped(tmp_path):
    if os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    cache = StageCache(tmp_path / "cache")
    cache.put("k", _artifact(tmp_path / "src"))
    os.chown(tmp_path / "cache" / "k", 65534, 65534)
    assert cache.get("k", tmp_path / "dst") is None
    assert "belongs to another user" in cache.rejected["k"]


def test_the_key_comes_from_the_environment_never_from_the_cache(tmp_path):
    from edgebuild.pipeline.cache import cache_key
    from edgebuild.pipeline.errors import BadInputError

    root = tmp_path / "cache"
    root.mkdir()
    assert cache_key(root, {}) is None
    assert cache_key(root, {"EDGEBUILD_CACHE_KEY": "s" * 16}) == b"s" * 16
    (tmp_path / "key").write_bytes(b"f" * 20 + b"\n")
    assert cache_key(root, {"EDGEBUILD_CACHE_KEY_FILE": str(tmp_path / "key")}) == b"f" * 20
    (root / "key").write_bytes(b"f" * 20)
    for env, message in [({"EDGEBUILD_CACHE_KEY_FILE": str(root / "key")}, "must not be stored in the cache"),
                         ({"EDGEBUILD_CACHE_KEY": "short"}, "at least 16 bytes"),
                         ({"EDGEBUILD_CACHE_KEY_FILE": str(tmp_path / "nope")}, "cannot read the cache key"),
                         ({"EDGEBUILD_CACHE_KEY": "s" * 16, "EDGEBUILD_CACHE_KEY_FILE": "x"}, "choose one")]:
        with pytest.raises(BadInputError, match=message):
            cache_key(root, env)


def test_a_bad_cache_key_is_one_line_exit_2_before_any_work(workdir, edgebuild, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_CACHE_KEY", "short")
    r = edgebuild("--target", "onnx-cpu", "--no-auto")
    r.check(2, "EDGEBUILD_CACHE_KEY: a cache key needs at least 16 bytes")
    assert list(workdir.iterdir()) == []
