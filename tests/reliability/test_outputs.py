"""Output ownership, merging, failed builds, stale directories, locks, and `validate`'s integrity check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.conftest import listing, read_manifest

BUILD = ("--calib", "data.npz", "--no-auto", "--max-accuracy-drop", "100")


def test_a_folder_with_a_foreign_manifest_is_never_wiped(here, edgebuild):
    out = here / "mine"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "thesis.tex").write_text("years of work")
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", "-o", out, *BUILD).check(2, "not an edgebuild output")
    assert listing(out) == {"manifest.json", "thesis.tex"}


def test_building_some_targets_keeps_the_others_and_merges_the_manifest(here, edgebuild):
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
    first = read_manifest(here / "out")
    edgebuild("--model", "other.onnx", "--target", "jetson-orin", *BUILD).check(0)
    m = read_manifest(here / "out")
    assert set(m["targets"]) == {"onnx-cpu", "jetson-orin"}
    assert m["targets"]["onnx-cpu"]["from_earlier_build"] == first["created"]
    assert m["kept_from_earlier_build"] == ["onnx-cpu"]
    meta = json.loads((here / "out" / "onnx-cpu" / "metadata.json").read_text())
    assert meta["reference"].startswith("../reference-")  # built from the other model: its own reference kept
    # the kept target still validates against its own reference, and its hashes hold
    edgebuild("validate", here / "out" / "onnx-cpu", "--eval", "data.npz").check(0)
    assert not [p for p in here.iterdir() if ".staging-" in p.name or ".tmp-" in p.name or ".old-" in p.name]


def test_a_build_whose_every_target_fails_keeps_the_earlier_output(here, edgebuild, monkeypatch):
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
    before = {p: p.read_bytes() for p in (here / "out").rglob("*") if p.is_file()}
    from edgebuild.pipeline.errors import ConversionError
    from edgebuild.targets.onnx import OnnxBackend

    def broken(*a, **k):
        raise ConversionError("simulated converter failure")

    monkeypatch.setattr(OnnxBackend, "convert", broken)
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", "--no-cache", *BUILD).check(3, "simulated converter failure")
    assert {p: p.read_bytes() for p in (here / "out").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("out", [".", "..", "~"])
def test_the_current_directory_its_parents_and_home_are_refused(out, here, edgebuild):
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", "-o", os.path.expanduser(out), *BUILD) \
        .check(2, "refusing to replace the current directory")
    assert (here / "tiny.onnx").exists()


def test_an_unwritable_parent_is_one_line(here, edgebuild):
    blocker = here / "file"
    blocker.write_text("x")
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", "-o", blocker / "out", *BUILD).check(2, "cannot write in")


def test_an_output_that_is_a_file_is_refused(here, edgebuild):
    (here / "out").write_text("not a dir")
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(2, "it is a file")
    assert (here / "out").read_text() == "not a dir"


def test_stale_directories_of_dead_builds_are_cleaned(here, edgebuild):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    for name in (f".out.staging-{pid}-abc", f".out.tmp-{pid}-abc", f".out.old-{pid}"):
        (here / name).mkdir()
        (here / name / "calib.npz").write_text("user data")
    alive = here / f".out.staging-{os.getppid()}-xyz"  # a live process's: left alone
    alive.mkdir()
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
    left = sorted(p.name for p in here.iterdir() if p.name.startswith(".out."))
    assert left == [".out.lock", alive.name]


def _swap_file(target_dir: Path, name: str, data: bytes) -> None:
    (target_dir / name).write_bytes(data)


def test_validate_catches_a_swapped_and_a_bit_flipped_artifact(here, edgebuild):
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
    t = here / "out" / "onnx-cpu"
    art = read_manifest(here / "out")["targets"]["onnx-cpu"]["artifact"]
    edgebuild("validate", t, "--eval", "data.npz").check(0)
    original = (t / art).read_bytes()
    _swap_file(t, art, (here / "out" / "reference" / "model_fp32.onnx").read_bytes())  # FP32 in place of INT8
    edgebuild("validate", t, "--eval", "data.npz").check(2, rf"{art} does not match metadata.json")
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x10
    _swap_file(t, art, bytes(flipped))
    edgebuild("validate", t, "--eval", "data.npz").check(2, rf"{art} does not match metadata.json")
    _swap_file(t, art, original)
    (here / "out" / "reference" / "model_fp32.onnx").write_bytes(b"garbage")
    edgebuild("validate", t, "--eval", "data.npz").check(2, "FP32 reference .* does not match")


def test_validate_refuses_metadata_naming_files_outside(here, edgebuild):
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
    t = here / "out" / "onnx-cpu"
    meta = json.loads((t / "metadata.json").read_text())
    meta["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    (t / "metadata.json").write_text(json.dumps(meta))
    edgebuild("validate", t, "--eval", "data.npz").check(2, "not a file of this directory")


def test_a_tampered_cache_entry_is_rebuilt_not_shipped(here, edgebuild, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEBUILD_CACHE", str(tmp_path / "cache"))
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
    art = read_manifest(here / "out")["targets"]["onnx-cpu"]["artifact"]
    good = (here / "out" / "onnx-cpu" / art).read_bytes()
    for entry in (tmp_path / "cache").iterdir():
        if (entry / art).is_file():
            data = bytearray((entry / art).read_bytes())
            data[100] ^= 1
            (entry / art).write_bytes(bytes(data))
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
    assert (here / "out" / "onnx-cpu" / art).read_bytes() == good
    notes = read_manifest(here / "out")["targets"]["onnx-cpu"]["notes"]
    assert any("removed and rebuilt" in n for n in notes), notes
