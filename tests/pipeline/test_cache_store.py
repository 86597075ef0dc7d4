"""The stage cache in an object store (pipeline/cache_store.py), against a real S3 server on 127.0.0.1 (moto's server
mode, tests/stores.py): entries round-trip, are verified on read (sha256 per blob, the HMAC with the cache key),
a tampered or half-written entry is never used, two writers of one entry are safe, and a build without the key or
without a reachable store behaves as documented. The two end-to-end builds sharing a bucket are marked slow."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgebuild.pipeline.cache_store import open_cache
from edgebuild.pipeline.errors import BadInputError
from edgebuild.targets.base import Artifact
from tests.stores import client_env, make_bucket, moto_server

KEY = b"k" * 32
BUCKET = "edgebuild-cache"


@pytest.fixture(scope="module")
def server():
    with moto_server() as endpoint:
        make_bucket(endpoint, BUCKET)
        yield endpoint


@pytest.fixture
def store(server, monkeypatch, request):
    for k, v in client_env(server).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("EDGEBUILD_CACHE_KEY", KEY.decode())
    prefix = f"t/{request.node.name.replace('[', '-').replace(']', '')}-{time.monotonic_ns()}"
    uri = f"s3://{BUCKET}/{prefix}"
    return open_cache(uri), make_bucket_fs(server), f"{BUCKET}/{prefix}"


def make_bucket_fs(endpoint):
    from pyarrow import fs as pafs

    return pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                             endpoint_override=endpoint.split("://", 1)[1])


def _artifact(d: Path, payload: bytes = b"model-bytes" * 100) -> Artifact:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model_int8.onnx").write_bytes(payload)
    (d / "side.txt").write_text("side")
    return Artifact("onnx-cpu", "onnx", "int8", d, "model_int8.onnx", ["model_int8.onnx", "side.txt"])


def _objects(fs, base: str) -> set[str]:
    from pyarrow import fs as pafs

    return {i.path[len(base) + 1:] for i in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File}


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _write(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def test_artifact_round_trip_through_the_store(store, tmp_path):
    cache, fs, base = store
    assert type(cache).__name__ == "StoreCache" and not cache.has("k") and cache.get("k", tmp_path / "x") is None
    src = _artifact(tmp_path / "src")
    cache.put("k", src)
    digest = __import__("hashlib").sha256((tmp_path / "src" / "model_int8.onnx").read_bytes()).hexdigest()
    assert f"blobs/{digest}" in _objects(fs, base) and "k/artifact.json" in _objects(fs, base)
    meta = json.loads(_read(fs, f"{base}/k/artifact.json"))
    assert meta["sha256"]["model_int8.onnx"] == digest and len(meta["hmac"]) == 64
    assert cache.has("k")
    got = open_cache(cache.root).get("k", tmp_path / "dst")  # another build (a new cache object) reads it
    assert got is not None and got.files == src.files and got.directory == tmp_path / "dst"
    assert (tmp_path / "dst" / "model_int8.onnx").read_bytes() == (tmp_path / "src" / "model_int8.onnx").read_bytes()
    assert any(n.startswith("restored from the stage cache") and cache.root in n for n in got.notes)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the download folder is gone


def test_result_round_trip_with_arrays(store):
    cache, fs, base = store
    arrays = {"logits": np.arange(12, dtype=np.float32).reshape(3, 4)}
    assert cache.get_result("r") is None
    assert cache.put_result("r", {"p50_ms": 1.5}, arrays)
    payload, got = open_cache(cache.root).get_result("r")
    assert payload == {"p50_ms": 1.5} and np.array_equal(got["logits"], arrays["logits"])
    assert cache.put_result("plain", [1, 2]) and open_cache(cache.root).get_result("plain") == ([1, 2], {})


def test_entry_rehashed_without_the_key_is_refused_and_rebuilt(store, tmp_path):
    """Whoever can write in the bucket swaps the model and records its honest sha256, but cannot sign it."""
    cache, fs, base = store
    cache.put("k", _artifact(tmp_path / "src"))
    evil = b"evil-model" * 50
    digest = __import__("hashlib").sha256(evil).hexdigest()
    _write(fs, f"{base}/blobs/{digest}", evil)
    meta = json.loads(_read(fs, f"{base}/k/artifact.json"))
    meta["sha256"]["model_int8.onnx"] = digest
    for forged in (meta.pop("hmac"), "0" * 64):  # re-hashed and left unsigned, or signed with another key
        if forged != "0" * 64:
            _write(fs, f"{base}/k/artifact.json", json.dumps(meta).encode())
        else:
            _write(fs, f"{base}/k/artifact.json", json.dumps({**meta, "hmac": forged}).encode())
        reader = open_cache(cache.root)
        assert reader.get("k", tmp_path / "dst") is None
        assert "HMAC does not verify" in reader.rejected["k"]
        assert "k/artifact.json" not in _objects(fs, base)  # dropped, not left for the next build
        assert not (tmp_path / "dst" / "model_int8.onnx").exists()
    rebuilt = _artifact(tmp_path / "rebuilt")
    reader.put("k", rebuilt)
    assert any("was bad" in n and "rebuilt" in n for n in rebuilt.notes)
    assert open_cache(cache.root).get("k", tmp_path / "dst2") is not None


def test_swapped_blob_bytes_are_refused_and_the_blob_deleted(store, tmp_path):
    cache, fs, base = store
    cache.put("k", _artifact(tmp_path / "src"))
    meta = json.loads(_read(fs, f"{base}/k/artifact.json"))
    blob = f"{base}/blobs/{meta['sha256']['model_int8.onnx']}"
    data = bytearray(_read(fs, blob))
    data[10] ^= 1
    _write(fs, blob, bytes(data))
    reader = open_cache(cache.root)
    assert reader.get("k", tmp_path / "dst") is None
    assert "does not match its recorded sha256" in reader.rejected["k"]
    assert not (tmp_path / "dst" / "model_int8.onnx").exists()
    left = _objects(fs, base)
    assert "k/artifact.json" not in left and blob[len(base) + 1:] not in left
    cache.put_result("r", {"a": 1}, {"x": np.ones(3)})  # a result's arrays are checked the same way
    rmeta = json.loads(_read(fs, f"{base}/r/result.json"))
    _write(fs, f"{base}/blobs/{rmeta['files']['arrays.npz']}", b"not the arrays")
    assert reader.get_result("r") is None and "arrays.npz does not match" in reader.rejected["r"]


def test_half_written_entry_is_not_used(store, tmp_path):
    """A writer that died before its metadata: blobs only, no entry. Metadata naming a missing blob: refused."""
    cache, fs, base = store
    cache.put("k", _artifact(tmp_path / "src"))
    meta = _read(fs, f"{base}/k/artifact.json")
    fs.delete_file(f"{base}/k/artifact.json")
    assert not cache.has("k") and open_cache(cache.root).get("k", tmp_path / "dst") is None
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())
    _write(fs, f"{base}/k/artifact.json", meta)  # the metadata back, a blob gone
    fs.delete_file(f"{base}/blobs/{json.loads(meta)['sha256']['side.txt']}")
    reader = open_cache(cache.root)
    assert reader.get("k", tmp_path / "dst") is None and "side.txt is missing" in reader.rejected["k"]
    assert not (tmp_path / "dst" / "model_int8.onnx").exists()


def test_two_writers_of_one_entry_at_once(store, tmp_path):
    """Conversions are not always byte-identical: writers racing on one key with different bytes leave one complete,
    signed entry (never one writer's metadata with the other's files)."""
    cache, fs, base = store
    payloads = [bytes([65 + i]) * (200_000 + i) for i in range(4)]
    arts = [_artifact(tmp_path / f"w{i}", p) for i, p in enumerate(payloads)]
    for rnd in range(3):
        writers = [threading.Thread(target=open_cache(cache.root).put, args=(f"k{rnd}", a)) for a in arts]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        reader = open_cache(cache.root)
        got = reader.get(f"k{rnd}", tmp_path / f"dst{rnd}")
        assert got is not None and not reader.rejected, \
            f"round {rnd}: no usable entry: {reader.rejected} {reader.down} {[a.notes for a in arts]}"
        assert (tmp_path / f"dst{rnd}" / "model_int8.onnx").read_bytes() in payloads


def test_object_store_needs_the_key_and_a_bucket(server, monkeypatch):
    for k, v in client_env(server).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("EDGEBUILD_CACHE_KEY", raising=False)
    monkeypatch.delenv("EDGEBUILD_CACHE_KEY_FILE", raising=False)
    with pytest.raises(BadInputError, match="object-store cache needs a key"):
        open_cache(f"s3://{BUCKET}/x")
    monkeypatch.setenv("EDGEBUILD_CACHE_KEY", KEY.decode())
    with pytest.raises(BadInputError, match="name a bucket"):
        open_cache("s3://")


def test_unreachable_store_costs_speed_not_the_build(monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in client_env(f"http://127.0.0.1:{port}").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("EDGEBUILD_CACHE_KEY", KEY.decode())
    t0 = time.monotonic()
    cache = open_cache(f"s3://{BUCKET}/x")
    assert cache.get("k", tmp_path / "d") is None and not cache.has("k") and cache.get_result("r") is None
    art = _artifact(tmp_path / "src")
    cache.put("k", art)
    assert cache.down and any("not stored in the stage cache" in n for n in art.notes)
    assert not cache.put_result("r", {"a": 1})
    assert time.monotonic() - t0 < 30  # the first failure stops the asking


def test_matrix_accepts_an_object_store_cache(tmp_path):
    from edgebuild.pipeline.batch.matrix import cache_location

    assert cache_location("s3://bucket/cache", tmp_path) == "s3://bucket/cache"
    assert cache_location("gs://bucket/cache", tmp_path) == "gs://bucket/cache"
    with pytest.raises(BadInputError, match="not a store the cache can use"):
        cache_location("az://container/cache", tmp_path)


def test_default_location_keeps_the_uri(monkeypatch):
    from edgebuild.pipeline.cache import default_location, default_root

    monkeypatch.setenv("EDGEBUILD_CACHE", "s3://bucket/prefix")
    assert default_location() == "s3://bucket/prefix"
    assert "s3:" not in str(default_root())


@pytest.mark.slow
def test_builds_share_an_s3_cache(store, tmp_path, capsys, monkeypatch):
    """Two builds of the demo share a bucket: the second restores every artifact from it (the same bytes); an entry
    re-hashed without the key is refused and rebuilt by the third."""
    from edgebuild.pipeline.cli import main

    cache, fs, base = store

    def build(out):
        t0 = time.perf_counter()
        code = main(["--target", "onnx-cpu", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 0, err
        return json.loads((out / "manifest.json").read_text())["targets"]["onnx-cpu"], time.perf_counter() - t0

    monkeypatch.setenv("EDGEBUILD_CACHE", cache.root)
    first, cold = build(tmp_path / "a")
    stored = _objects(fs, base)
    entries = sorted(p.split("/")[0] for p in stored if p.endswith("/artifact.json"))
    assert entries and any(p.endswith("/result.json") for p in stored)
    assert not any(n.startswith("restored from the stage cache") for n in first["notes"])
    second, warm = build(tmp_path / "b")
    assert any(n.startswith("restored from the stage cache") and cache.root in n for n in second["notes"])
    assert first["files"] == second["files"]
    with capsys.disabled():
        print(f"\nonnx-cpu demo build: cold {cold:.1f} s, restored from s3 {warm:.1f} s")

    evil = b"evil-model" * 50  # the attacker swaps the shipped model and records its honest sha256, unsigned
    digest = __import__("hashlib").sha256(evil).hexdigest()
    _write(fs, f"{base}/blobs/{digest}", evil)
    for k in entries:
        meta = json.loads(_read(fs, f"{base}/{k}/artifact.json"))
        meta.pop("hmac")
        meta["sha256"][meta["main"]] = digest
        _write(fs, f"{base}/{k}/artifact.json", json.dumps(meta).encode())
    third, _ = build(tmp_path / "c")
    assert not any(n.startswith("restored from the stage cache") for n in third["notes"])
    assert any("was bad" in n and "HMAC does not verify" in n for n in third["notes"]), third["notes"]
    shipped = tmp_path / "c" / "onnx-cpu" / third["artifact"]
    assert shipped.read_bytes() != evil
    for k in entries:  # rebuilt and signed again
        assert "hmac" in json.loads(_read(fs, f"{base}/{k}/artifact.json"))


def test_a_gcs_bucket_keeps_entries_the_same_way(tmp_path):
    """gs:// through pyarrow's GCS client against a GCS emulator (the JSON API): a round trip, an entry re-hashed
    without the key refused, metadata missing not used. The client is built here (anonymous, the emulator's
    endpoint): `open_cache("gs://...")` itself takes Google's credentials from the environment, untested."""
    from edgebuild.pipeline.cache_store import StoreCache
    from tests.stores import gcs_filesystem, gcs_server

    with gcs_server("gbk") as endpoint:
        fs = gcs_filesystem(endpoint)

        def opened():
            return StoreCache("gs://gbk/cache", KEY, gcs_filesystem(endpoint), "gbk/cache")

        cache = opened()
        src = _artifact(tmp_path / "src")
        cache.put("k", src)
        assert not cache.down and not [n for n in src.notes if "not stored" in n], src.notes
        got = opened().get("k", tmp_path / "dst")
        assert got is not None and (tmp_path / "dst" / "model_int8.onnx").read_bytes() == b"model-bytes" * 100
        assert cache.put_result("r", {"a": 1}, {"x": np.arange(3)}) and opened().get_result("r")[0] == {"a": 1}

        evil = b"evil-model" * 50
        digest = __import__("hashlib").sha256(evil).hexdigest()
        _write(fs, f"gbk/cache/blobs/{digest}", evil)
        meta = json.loads(_read(fs, "gbk/cache/k/artifact.json"))
        meta.pop("hmac")
        meta["sha256"]["model_int8.onnx"] = digest
        _write(fs, "gbk/cache/k/artifact.json", json.dumps(meta).encode())
        reader = opened()
        assert reader.get("k", tmp_path / "dst2") is None and "HMAC does not verify" in reader.rejected["k"]
        assert not (tmp_path / "dst2" / "model_int8.onnx").exists()

        cache.put("k2", _artifact(tmp_path / "src2"))
        fs.delete_file("gbk/cache/k2/artifact.json")  # a writer that died before its metadata
        assert not opened().has("k2") and opened().get("k2", tmp_path / "dst3") is None


def test_batch_with_a_keyless_store_is_one_line_exit_2_before_any_cell(tmp_path, monkeypatch, capsys):
    from edgebuild.pipeline.cli import main

    monkeypatch.delenv("EDGEBUILD_CACHE_KEY", raising=False)
    monkeypatch.delenv("EDGEBUILD_CACHE_KEY_FILE", raising=False)
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("models: {demo: {}}\ntargets: [onnx-cpu]\ncache: s3://bucket/cache\n")
    code = main(["batch", str(matrix), "-o", str(tmp_path / "out"), "--local"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("edgebuild: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "s3://bucket/cache: an object-store cache needs a key" in lines[0]
    assert not (tmp_path / "out").exists()
