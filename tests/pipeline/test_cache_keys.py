"""Stage-cache keys (pipeline/cache.py ``cached``): the stage's own version, the backend's declared packages, the
inputs and the config key an entry; an edit of edgebuild's sources or another backend's package does not."""
from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from edgebuild.pipeline import cache, versions
from edgebuild.targets import base

ROOT = Path(__file__).resolve().parents[2]
INPUTS, CONFIG = {"model": "m" * 16, "calib": "c" * 16}, {"precision": "int8", "settings": {"per_channel": True}}


@pytest.fixture
def fake_versions(monkeypatch):
    """Installed versions as a test says ({dist: version}; the real one for any other)."""
    table: dict[str, str] = {}
    real = versions.metadata.version
    monkeypatch.setattr(versions.metadata, "version", lambda name: table.get(name) or real(name))
    versions._versions.cache_clear()
    yield table
    versions._versions.cache_clear()


def test_a_key_depends_on_inputs_config_stage_version_and_the_backends_own_packages(fake_versions, monkeypatch):
    k = cache.cached("convert", INPUTS, CONFIG, backend="onnx")
    assert k == cache.cached("convert", dict(INPUTS), dict(CONFIG), backend="onnx")
    assert k != cache.cached("convert", {**INPUTS, "model": "n" * 16}, CONFIG, backend="onnx")
    assert k != cache.cached("convert", INPUTS, {**CONFIG, "precision": "fp16"}, backend="onnx")
    assert k != cache.cached("convert", INPUTS, CONFIG, backend="openvino")
    monkeypatch.setitem(cache.STAGES, "convert", cache.STAGES["convert"] + 1)  # the stage's code changed
    assert k != cache.cached("convert", INPUTS, CONFIG, backend="onnx")
    monkeypatch.setitem(cache.STAGES, "convert", cache.STAGES["convert"] - 1)
    assert k == cache.cached("convert", INPUTS, CONFIG, backend="onnx")

    assert "onnxruntime" in base.backend_info("onnx").versions and "tensorflow" not in base.backend_info("onnx").versions
    fake_versions["tensorflow"] = "0.0.1"  # another backend's converter changed: this entry stays
    versions._versions.cache_clear()
    assert k == cache.cached("convert", INPUTS, CONFIG, backend="onnx")
    fake_versions["onnxruntime"] = "0.0.1"  # its own runtime changed: a new entry
    versions._versions.cache_clear()
    assert k != cache.cached("convert", INPUTS, CONFIG, backend="onnx")


def test_a_backends_cache_version_keys_its_entries(monkeypatch):
    k = cache.cached("validate", INPUTS, CONFIG, backend="tflite")
    info = base.backend_info("tflite")
    monkeypatch.setitem(base._INFOS, "tflite", replace(info, cache_version=info.cache_version + 1))
    assert k != cache.cached("validate", INPUTS, CONFIG, backend="tflite")


def test_keys_do_not_hash_edgebuilds_sources(monkeypatch):
    """An edit anywhere in the tree changed every key when they carried code_hash(); now it changes none."""
    k = cache.cached("reference", INPUTS, CONFIG, backend=base.REFERENCE_BACKEND)
    monkeypatch.setattr(cache, "code_hash", lambda: "an-edited-tree")
    assert k == cache.cached("reference", INPUTS, CONFIG, backend=base.REFERENCE_BACKEND)


def test_a_stage_without_a_version_is_refused():
    with pytest.raises(ValueError, match="no cache version"):
        cache.cached("no-such-stage", INPUTS)


def test_every_stage_builds_its_keys_with_cached():
    """No hand-made stage key (``key(stage=...)``) and no source hash in a key outside pipeline/cache_keys.py."""
    bad = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name == "cache_keys.py" and path.parent.name == "pipeline":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if (name == "key" and any(k.arg == "stage" for k in node.keywords)) or name == "code_hash":
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("cached", "stage_key"):
                stage = node.args[0] if node.args else None
                if isinstance(stage, ast.Constant) and stage.value not in cache.STAGES:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: stage {stage.value!r} not in STAGES")
    assert not bad, "\n".join(bad)
