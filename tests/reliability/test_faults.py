"""Faults with real builds (issue 27, "not yet covered"): cache entries swapped, truncated, replaced by symlinks;
SIGTERM mid-build with --jobs 2; two concurrent builds into one --out; an unusable EDGEBUILD_CACHE; huge values."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.conftest import read_manifest

BUILD = ("--calib", "data.npz", "--no-auto", "--max-accuracy-drop", "100")
EXE = Path(sys.executable).with_name("edgebuild")
KEY = "a-cache-key-of-32-characters-ok!"

pytestmark = pytest.mark.slow


def _artifact_entries(cache: Path, name: str) -> list[Path]:
    return [e for e in cache.iterdir() if (e / name).is_file() and (e / "artifact.json").is_file()]


def _swap_and_rehash(entry: Path, name: str, other: bytes) -> None:
    (entry / name).write_bytes(other)
    meta = json.loads((entry / "artifact.json").read_text())
    meta["sha256"][name] = hashlib.sha256(other).hexdigest()
    (entry / "artifact.json").write_text(json.dumps(meta))


FAULTS = ("swapped and re-hashed (keyed cache)", "truncated", "a symlink", "a file pointing outside")


def test_a_full_disk_while_the_fp32_reference_is_written_is_one_line(here, edgebuild):
    """The output's folder on a 1 MB tmpfs and 5000 evaluation samples (1.3 MB of feeds): the FP32 reference is the
    first thing that does not fit. Found on a real detector's 660 MB evaluation set (it was a traceback, exit 3)."""
    disk = here / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    np.savez(here / "big.npz", x=np.random.default_rng(1).random((5000, 1, 8, 8), dtype=np.float32))
    try:
        r = edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD, "--eval", "big.npz", "--no-cache",
                      "-o", disk / "out")
        r.check(2, r"cannot write the output \(No space left on device: the FP32 reference\); nothing written")
        assert not [p.name for p in disk.iterdir() if p.name.startswith(".out.") and p.name != ".out.lock"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_bad_cache_entry_is_never_shipped(here, edgebuild, monkeypatch, tmp_path):
    """One build fills the cache (signed: a key is set), then each fault in turn is made on every entry holding the
    artifact and the next build must ship the good artifact, rebuilt, and say so."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEBUILD_CACHE", str(cache))
    monkeypatch.setenv("EDGEBUILD_CACHE_KEY", KEY)
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
    art = read_manifest(here / "out")["targets"]["onnx-cpu"]["artifact"]
    good = (here / "out" / "onnx-cpu" / art).read_bytes()
    fp32 = (here / "tiny.onnx").read_bytes()
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(fp32)
    for fault in FAULTS:
        entries = _artifact_entries(cache, art)
        assert entries, fault
        for entry in entries:
            if "swapped" in fault:
                _swap_and_rehash(entry, art, fp32)  # an FP32 model shipped as INT8: what a cache writer could try
            elif fault == "truncated":
                (entry / art).write_bytes((entry / art).read_bytes()[:50])
            elif fault == "a symlink":
                (entry / art).unlink()
                (entry / art).symlink_to(outside)
            else:
                meta = json.loads((entry / "artifact.json").read_text())
                meta["files"] = [*meta["files"], "../../outside.onnx"]
                meta["sha256"]["../../outside.onnx"] = hashlib.sha256(fp32).hexdigest()
                (entry / "artifact.json").write_text(json.dumps(meta))
        edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
        assert (here / "out" / "onnx-cpu" / art).read_bytes() == good, fault
        notes = read_manifest(here / "out")["targets"]["onnx-cpu"]["notes"]
        assert any("removed and rebuilt" in n for n in notes), (fault, notes)
        assert not list(here.rglob("outside.onnx")) and outside.read_bytes() == fp32
        if "keyed" in fault:
            assert any("HMAC" in n for n in notes), notes
            monkeypatch.delenv("EDGEBUILD_CACHE_KEY")  # the other faults: a private cache, no key
    edgebuild("validate", here / "out" / "onnx-cpu", "--eval", "data.npz").check(0)


def test_an_unusable_cache_costs_speed_never_the_build(here, edgebuild, monkeypatch, tmp_path):
    """EDGEBUILD_CACHE is a file (an unwritable or others-writable folder: tests/reliability/test_cache.py)."""
    path = tmp_path / "cache"
    path.write_text("not a folder")
    monkeypatch.setenv("EDGEBUILD_CACHE", str(path))
    edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD).check(0)
    notes = read_manifest(here / "out")["targets"]["onnx-cpu"]["notes"]
    assert any("not stored in the stage cache" in n for n in notes), notes
    assert path.read_text() == "not a folder"


def test_huge_valued_calibration_data_is_no_traceback(here, edgebuild):
    np.savez(here / "huge.npz", x=np.full((16, 1, 8, 8), 3e38, np.float32), y=np.zeros(16, int))
    r = edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", "--calib", "huge.npz", "--no-auto",
                  "--max-accuracy-drop", "100")
    assert r.code in (0, 1, 2, 3) and "Traceback" not in r.err + r.out, r.err[-2000:]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_with_two_jobs_leaves_no_orphan_no_staging_and_the_earlier_output(here, tmp_path):
    env = {**os.environ, "EDGEBUILD_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([str(EXE), "--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD, "-q"], cwd=here,
                           env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: p.read_bytes() for p in (here / "out").rglob("*") if p.is_file()}
    proc = subprocess.Popen([str(EXE), "--model", "tiny.onnx", "--target", "onnx-cpu", "--target", "x86",
                             "--target", "jetson-orin", "--jobs", "2", *BUILD, "--no-cache"], cwd=here, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for converter children (not only the tracker)
        seen |= _descendants(proc.pid)
        if len(seen) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before any converter child started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    time.sleep(1.0)
    assert not [p for p in seen if _alive(p)], "a child outlived the build"
    assert not [p.name for p in here.iterdir() if p.name.startswith(".out.") and p.name != ".out.lock"]
    assert {p: p.read_bytes() for p in (here / "out").rglob("*") if p.is_file()} == before


def test_two_concurrent_builds_into_one_out_both_land(here, tmp_path):
    env = {**os.environ, "EDGEBUILD_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([str(EXE), "--model", "tiny.onnx", "--target", t, *BUILD, "-q"], cwd=here, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for t in ("onnx-cpu", "jetson-orin")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    manifest = read_manifest(here / "out")
    assert set(manifest["targets"]) == {"onnx-cpu", "jetson-orin"}
    for t, entry in manifest["targets"].items():
        assert (here / "out" / t / entry["artifact"]).is_file() and (here / "out" / t / "metadata.json").is_file()
    assert not [p.name for p in here.iterdir() if p.name.startswith(".out.") and p.name != ".out.lock"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.getuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("size", ["40k", "100k"])
def test_a_full_disk_during_the_build_is_one_line_and_leaves_no_staging(size, here, edgebuild):
    """The output's folder on a tiny tmpfs: the conversion or the output's writing runs out of space."""
    disk = here / "disk"
    if not _mount_tmpfs(disk, size):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        r = edgebuild("--model", "tiny.onnx", "--target", "onnx-cpu", *BUILD, "--no-cache", "-o", disk / "out")
        assert r.code in (2, 3), r.err[-2000:]
        r.check(r.code, r"No space left on device|conversion failed")
        assert not [p.name for p in disk.iterdir() if p.name.startswith(".out.") and p.name != ".out.lock"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
