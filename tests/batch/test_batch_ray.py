"""`edgebuild batch` for real: a two-node Ray cluster on this machine (`ray start --head` + `ray start --address`,
different ports), the 2-model x 2-target demo matrix run as `ray job submit` runs it (RAY_ADDRESS, no --address),
one worker killed mid-build (its cell retried and finished), timing alone on the machine (no cell's timing overlaps
another's work), a re-run that skips every finished cell, tampered cells rebuilt from the cache the Ray nodes filled
(local pool, two at once), Ctrl-C/SIGTERM keeping finished cells, and outputs identical to building each cell alone
with the ordinary CLI (artifact bytes and the manifest but for its measurements).

One module-scoped scenario (the cells build once): 4-4.5 minutes on this 2-core host shared with other builds
(load ~14); not measured on an idle runner, where the cells build 2-4x faster (README, Many models).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "scripts" / "examples" / "matrix.yaml"
BIN = Path(sys.executable).parent
KILLED = "demo-lowrank--x86"  # the cell whose worker is killed mid-build


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(env, *args, timeout=120):
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _ray_processes(tag: str) -> list[str]:
    """Processes whose command line names this cluster's temp dir (the raylets, GCS, workers of this test)."""
    return [f"{pid}: {cmd[:120]}" for pid, cmd in _processes().items() if tag in cmd]


def _processes() -> dict[int, str]:
    found = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                found[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return found


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _stop_cluster(tag: str, grace_s: float = 30) -> None:
    """Stop this test's cluster only, by process id: the processes naming its temp dir and their descendants (its
    workers). Not `ray stop`, which ends every Ray process of the machine by name (another run's cluster too)."""
    procs = _processes()
    ours = {pid for pid, cmd in procs.items() if tag in cmd}
    grew = True
    while grew:
        kids = {pid for pid in procs if pid not in ours and _parent(pid) in ours}
        grew, ours = bool(kids), ours | kids
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not any(_alive(pid) for pid in ours):
            break
        for pid in ours:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(pid) for pid in ours):
            time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on 127.0.0.1 (head + worker, own ports), token auth with a key of this test;
    stopped afterwards by process id (``_stop_cluster``), and no process of the cluster may be left."""
    temp = tempfile.mkdtemp(prefix="ebray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    try:
        head = _ray(env, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
                    f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}", *common)
        assert head.returncode == 0, head.stderr[-2000:]
        worker = _ray(env, "start", f"--address=127.0.0.1:{port}", f"--node-manager-port={_free_port()}",
                      f"--object-manager-port={_free_port()}", *common)
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield {"address": f"127.0.0.1:{port}", "env": env, "temp": temp}
    finally:
        _stop_cluster(temp)
        deadline = time.monotonic() + 30
        while _ray_processes(temp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _ray_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"stopping the cluster left processes behind: {left}"


def _batch(args, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "edgebuild"), "batch", *map(str, args)], env=env, capture_output=True,
                          text=True, **kw)


def _cells(out: Path) -> dict[str, dict]:
    return {f"{c['model']}/{c['target']}": c for c in json.loads((out / "batch.json").read_text())["cells"]}


def _kill_when_building(out: Path, deadline_s: float = 240) -> int | None:
    """SIGKILL the Ray worker building KILLED a few seconds into its build; its pid (None if it never started)."""
    marker = out / ".running" / f"{KILLED}.json"
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
            continue
        time.sleep(3)  # mid-build: loading, exporting or converting
        cmd = Path(f"/proc/{info['pid']}/cmdline").read_bytes()
        assert b"ray" in cmd.lower() or b"default_worker" in cmd, cmd  # a Ray worker, nothing else
        os.kill(info["pid"], signal.SIGKILL)
        return info["pid"]
    return None


@pytest.fixture(scope="module")
def scenario(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("batch")
    matrix = yaml.safe_load(EXAMPLE.read_text())
    matrix["cache"] = str(base / "cache")  # the cache every node shares (one filesystem here)
    path = base / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    out = base / "out"
    key = base / "cache.key"  # the shared cache is signed: the Ray workers get the key file's path from the driver
    key.write_text(secrets.token_hex(32))
    env = {**cluster["env"], "RAY_ADDRESS": "", "EDGEBUILD_CACHE_KEY_FILE": str(key),
           "EDGEBUILD_NODE_LOCK": str(base / "node.lock")}  # this test's cells take turns with each other only
    code_before = _code_hash()
    t0 = time.monotonic()
    # as under `ray job submit ... -- edgebuild batch ...`: no --address, the job supervisor sets RAY_ADDRESS to the
    # cluster's GCS address (ray/dashboard/modules/job/job_supervisor.py, _get_driver_env_vars)
    proc = subprocess.Popen([str(BIN / "edgebuild"), "batch", str(path), "-o", str(out), "-q"],
                            env={**env, "RAY_ADDRESS": cluster["address"]}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed = _kill_when_building(out)
    stdout, stderr = proc.communicate(timeout=600)
    return {"path": path, "out": out, "env": env, "code": proc.returncode, "stderr": stderr, "killed": killed,
            "seconds": time.monotonic() - t0, "cells": _cells(out) if (out / "batch.json").exists() else {},
            "code_hash": code_before}


def test_two_node_batch_builds_every_cell(scenario):
    assert scenario["code"] == 0, scenario["stderr"][-3000:]
    doc = json.loads((scenario["out"] / "batch.json").read_text())
    assert doc["executor"] == "ray" and doc["executor_info"]["nodes"] == 2
    cells = scenario["cells"]
    assert sorted(cells) == ["demo-lowrank/onnx-cpu", "demo-lowrank/x86", "demo/onnx-cpu", "demo/x86"]
    for name, c in cells.items():
        assert (c["exit"], c["verdict"], c["skipped"]) == (0, "pass", False), c
        out = scenario["out"] / name
        manifest = json.loads((out / "manifest.json").read_text())  # one ordinary build per cell
        assert list(manifest["targets"]) == [c["target"]]
        assert manifest["targets"][c["target"]]["files"][Path(c["artifact"]).name]["sha256"] == c["artifact_sha256"]
        assert (out / "report.html").is_file() and (out / "build.log").is_file()
        assert manifest["targets"][c["target"]]["threads"]["used"] == 1  # the task's one CPU, not the host's
    assert len({c["worker"]["node_id"] for c in cells.values()}) == 2  # both nodes built cells
    page = (scenario["out"] / "batch.html").read_text()
    assert all(f"href='{n}/report.html'" in page for n in cells)
    _assert_timing_alone(scenario["out"], cells)  # the two nodes are one machine: they share its lock


def _assert_timing_alone(out: Path, names) -> None:
    """Every cell timed alone (once; a low-rank cell also measured its model before and after compression), and
    no cell's timing overlapped another cell's work (batch_cell.json's node_turns)."""
    from edgebuild.pipeline.batch.turns import MERGE_S, overlaps

    turns = {n: json.loads((out / n / "batch_cell.json").read_text())["node_turns"] for n in names}
    for a in turns:
        assert len(turns[a]["timing_spans"]) == (3 if "lowrank" in a else 1) and turns[a]["work_spans"], (a, turns[a])
        for b in turns:
            if a != b:
                assert not overlaps(turns[a]["timing_spans"], turns[b]["work_spans"], slack=MERGE_S), (a, b, turns)


def test_killed_worker_cell_is_retried_and_finishes(scenario):
    assert scenario["killed"] is not None, "the cell never started"
    c = scenario["cells"]["demo-lowrank/x86"]
    assert c["verdict"] == "pass" and c["attempts"] == 2 and c["worker"]["pid"] != scenario["killed"]
    assert not list(scenario["out"].rglob(".x86.staging-*"))  # the dead build's staging was cleaned by its retry


def test_rerun_skips_every_finished_cell(scenario):
    t0 = time.monotonic()
    r = _batch([scenario["path"], "-o", scenario["out"], "--address", "127.0.0.1:1", "-q"], scenario["env"],
               timeout=120)  # no cluster at that address: nothing may need it
    assert r.returncode == 0, r.stderr[-2000:]
    cells = _cells(scenario["out"])
    assert all(c["skipped"] and c["verdict"] == "pass" for c in cells.values()), cells
    assert {n: c["artifact_sha256"] for n, c in cells.items()} == \
        {n: c["artifact_sha256"] for n, c in scenario["cells"].items()}
    assert time.monotonic() - t0 < 60


def test_tampered_cells_are_rebuilt_from_the_shared_cache_on_the_local_pool(scenario):
    """Resume verifies files: changed artifacts are built again (by the pool, two cells at once on its 2 CPUs, from
    the cache the Ray nodes filled), to the same bytes and the same manifest; the other cells are skipped. The two
    cells share one node: neither's timing overlaps the other's work."""
    tampered = ["demo/onnx-cpu", "demo-lowrank/x86"]
    for name in tampered:
        art = scenario["out"] / name / scenario["cells"][name]["artifact"]
        art.write_bytes(art.read_bytes() + b"\0")
    r = _batch([scenario["path"], "-o", scenario["out"], "--local", "--cpus", "2", "-q"], scenario["env"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((scenario["out"] / "batch.json").read_text())
    assert doc["executor"] == "local"
    cells = _cells(scenario["out"])
    assert sorted(n for n, c in cells.items() if not c["skipped"]) == sorted(tampered)
    for name in tampered:
        for k in ("artifact_sha256", "outputs_sha256", "verdict", "precision"):
            assert cells[name][k] == scenario["cells"][name][k], (name, k)
    _assert_timing_alone(scenario["out"], tampered)
    manifest = json.loads((scenario["out"] / "demo" / "onnx-cpu" / "manifest.json").read_text())
    if _code_hash() != scenario["code_hash"]:  # cache keys include the hash of edgebuild's sources
        pytest.skip("edgebuild's sources changed while this test ran (a shared working tree): no cache hit to expect")
    assert manifest["cache"]["reference_outputs"] is True  # written by a Ray node (signed with the key), read here
    assert manifest["targets"]["onnx-cpu"]["cache"]["conversion"] is True


def _code_hash() -> str:
    out = subprocess.run([sys.executable, "-c", "from edgebuild.pipeline.cache import code_hash; print(code_hash())"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


@pytest.mark.parametrize("cell", ["demo/onnx-cpu", "demo-lowrank/x86"])
def test_cell_equals_the_same_build_alone(scenario, cell, tmp_path):
    """The ordinary CLI, re-running a cell's manifest without any cache at the cell's thread count, writes the same
    artifact files byte for byte (OpenVINO's .xml included: NNCF's generated node names are numbered in graph order,
    targets/openvino.stable_names) and the same manifest but for what was measured (``outputs_sha256``: cell.py's
    ``reproducible``): verdict, precision, settings, metrics, search."""
    from edgebuild.pipeline.batch.cell import THREAD_ENV, outputs_digest, reproducible

    alone = tmp_path / "alone"
    threads = {name: "1" for name in THREAD_ENV} | {"TF_NUM_INTEROP_THREADS": "1"}
    r = subprocess.run([str(BIN / "edgebuild"), "-c", str(scenario["out"] / cell / "manifest.json"), "-o", str(alone),
                        "--no-cache", "-q"], env={**scenario["env"], **threads},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    c = scenario["cells"][cell]
    if _code_hash() != scenario["code_hash"]:
        pytest.skip("edgebuild's sources changed while this test ran (a shared working tree): the same build is "
                    "another build")
    mine = json.loads((scenario["out"] / cell / "manifest.json").read_text())
    theirs = json.loads((alone / "manifest.json").read_text())
    t = theirs["targets"][c["target"]]
    assert t["files"] == mine["targets"][c["target"]]["files"]  # every artifact file's sha256
    for name in t["files"]:
        assert (scenario["out"] / cell / c["target"] / name).read_bytes() == (alone / c["target"] / name).read_bytes()
    assert reproducible(theirs) == reproducible(mine)  # the whole record but its measurements
    assert outputs_digest(theirs) == c["outputs_sha256"]


def test_sigterm_stops_the_batch_and_keeps_finished_cells(scenario, tmp_path):
    """Cells one at a time (--cpus 1); SIGTERM once the first has finished: exit 130, batch.json lists it as
    passed and the rest as interrupted, its output is complete, no staging directory is left."""
    out = tmp_path / "out"
    proc = subprocess.Popen([str(BIN / "edgebuild"), "batch", str(scenario["path"]), "-o", str(out), "--local",
                             "--cpus", "1", "-q"], env=scenario["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    first = out / "demo" / "onnx-cpu" / "manifest.json"
    end = time.monotonic() + 180
    while not first.exists() and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    cells = _cells(out)
    assert cells["demo/onnx-cpu"]["verdict"] == "pass"
    assert {c["verdict"] for n, c in cells.items() if n != "demo/onnx-cpu"} <= {"interrupted", "pass"}
    assert any(c["verdict"] == "interrupted" for c in cells.values())
    assert not [p for p in out.rglob(".*") if ".staging-" in p.name or ".tmp-" in p.name]
    from edgebuild.pipeline.revalidate import verify_files

    verify_files(out / "demo" / "onnx-cpu" / "onnx-cpu", out / "demo" / "onnx-cpu" / "onnx-cpu" / "metadata.json")
