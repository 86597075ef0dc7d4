"""One cell of a batch, in its worker process: the ordinary build of one model for one target.

``run_cell`` is what a Ray task (or a process-pool worker) runs. Each cell gets a fresh process (Ray
``max_calls=1``, the pool's ``max_tasks_per_child=1``): its thread limits are set in the environment before any
runtime is imported, and nothing a build changes in its process (``tempfile.tempdir``, runtimes' thread pools)
reaches another cell. The build is the one the CLI runs: same spec, same output folder (manifest.json, report,
build.log), same manifest.

``finished`` decides whether a re-run may skip a cell: its output holds an edgebuild manifest of the same spec
whose target built (pass or fail: an error is built again) and whose files still have their recorded sha256.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import time
import traceback
from pathlib import Path

# Thread knobs of the runtimes a build loads (OpenMP in torch/ORT's calibrators, BLAS, TensorFlow); ONNX Runtime,
# OpenVINO and LiteRT get their thread count from pipeline/timing.host_cores(), which EDGEBUILD_THREADS bounds.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "TF_NUM_INTRAOP_THREADS", "EDGEBUILD_THREADS")
RUNNING_DIR = ".running"  # <batch out>/.running/<model>--<target>.json: the worker running a cell (pid, node)


def bound_threads(num_cpus: int) -> None:
    """Every runtime of this process (and its converter children, which inherit the environment) uses
    ``num_cpus`` threads. Call before the build imports torch, ONNX Runtime, OpenVINO or TensorFlow."""
    for name in THREAD_ENV:
        os.environ[name] = str(num_cpus)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:  # imported already (a reused worker): set its pools too
        torch.set_num_threads(num_cpus)


def running_marker(batch_out: Path, model: str, target: str) -> Path:
    return batch_out / RUNNING_DIR / f"{model}--{target}.json"


def run_cell(cell_data: dict, batch_out: str) -> dict:
    """Build one cell; returns its summary (``batch.json``'s cell). Never raises for a build that failed.

    The cell's work holds its node shared and its timing holds it alone (``turns.NodeTurns``): from here, before
    the build imports anything, to its end."""
    from edgebuild.pipeline.batch.matrix import Cell
    from edgebuild.pipeline.batch.turns import NodeTurns

    cell = Cell.from_dict(cell_data)
    bound_threads(cell.resources.num_cpus)
    turns = NodeTurns()
    turns.work()
    try:
        marker = running_marker(Path(batch_out), cell.model, cell.target)
        marker.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        node = {"host": socket.gethostname(), "pid": os.getpid(), **_ray_node()}
        attempt = _attempt(marker)  # a marker left behind: the worker of an earlier attempt died
        tmp = marker.with_name(f".{marker.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**node, "started": started, "attempt": attempt}))
        os.replace(tmp, marker)
        try:
            record = _build(cell, turns.stage)
        finally:
            marker.unlink(missing_ok=True)
        record.update(seconds=round(time.time() - started, 2), started=round(started, 3), cpu_seconds=_cpu_seconds(),
                      worker=node, threads=cell.resources.num_cpus, attempts=attempt,
                      timing_waited_s=round(turns.waited_s, 2))
        if record["exit"] in (0, 1):
            _write_cell_record(cell, record, turns.record())
    finally:
        turns.close()
    return record


def _cpu_seconds() -> float:
    """CPU time of this worker and of the converter children it waited for (user + system)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 2)


def _attempt(marker: Path) -> int:
    try:
        return int(json.loads(marker.read_text()).get("attempt", 1)) + 1
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def _ray_node() -> dict:
    """The Ray node running this cell (inside a Ray worker; nothing in a local pool's process)."""
    import sys

    ray = sys.modules.get("ray")  # a Ray worker has imported it; a pool's process has not
    if ray is None or not ray.is_initialized():
        return {}
    return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}


def _build(cell, stage) -> dict:
    from edgebuild.pipeline.build import build
    from edgebuild.pipeline.buildlog import build_log, keep
    from edgebuild.pipeline.errors import EdgeBuildError
    from edgebuild.pipeline.offline import no_telemetry
    from edgebuild.pipeline.spec import BuildSpec

    no_telemetry()
    spec = BuildSpec.from_dict(cell.spec)
    try:
        with build_log(Path(spec.out), False) as (log, _terminal):
            result = build(spec, stage=stage, jobs=1)
        keep(log, result)
    except EdgeBuildError as e:
        return {**_cell_head(cell), "exit": e.exit_code, "verdict": "error", "error": str(e)}
    except Exception as e:  # a bug: the cell fails with its traceback's last lines, the batch goes on
        tb = traceback.format_exc().strip().splitlines()[-3:]
        return {**_cell_head(cell), "exit": 3, "verdict": "error",
                "error": f"internal error: {type(e).__name__}: {e} ({' | '.join(tb)})"}
    return {**_cell_head(cell), **summary_of(result.manifest, cell.target, cell.out)}


def _cell_head(cell) -> dict:
    return {"model": cell.model, "target": cell.target, "out": str(cell.out), "skipped": False}


def clock_decided(manifest: dict, target: str) -> list[str]:
    """What the clock decided in this target's accuracy search (its ``search.time_limit``: a try that did not fit
    before ``auto_max_seconds``/``build_max_seconds``, a sensitivity cut short). Empty: the build is a function of
    its inputs, and building the cell alone gives the same ``outputs_sha256``; otherwise it may not."""
    search = ((manifest.get("targets") or {}).get(target) or {}).get("search") or {}
    return list(search.get("time_limit") or []) if isinstance(search, dict) else []


def summary_of(manifest: dict, target: str, out: Path) -> dict:
    """A cell's line of ``batch.json`` from its manifest: exit, verdict, artifact (+ sha256), precision, quality,
    speed-up, size, and the formatted values of the build's own summary table."""
    from edgebuild.pipeline.report import summary_rows
    from edgebuild.pipeline.results import Manifest

    typed = Manifest.from_dict(manifest)
    t = typed.targets.get(target)
    if t is None:
        return {"exit": 3, "verdict": "error", "error": f"the build wrote no result for {target}"}
    row = next((r for r in summary_rows(typed) if r["target"] == target), {})
    files = t.files or {}
    m = t.metrics
    return {
        "exit": typed.exit_code, "verdict": t.verdict.status, "error": t.verdict.error,
        "artifact": f"{target}/{t.artifact}" if t.artifact else None,
        "artifact_sha256": files[t.artifact].sha256 if t.artifact in files else None,
        "precision": t.precision, "accuracy_drop": None if m is None else m.accuracy_drop,
        "speedup_vs_fp32": t.ratios.speedup_vs_fp32 if t.ratios else None, "size_bytes": t.size_bytes,
        "build_seconds": typed.seconds, "report": "report.html", "outputs_sha256": outputs_digest(manifest),
        "clock_decided": clock_decided(manifest, target),
        "table": {k: row.get(k) for k in ("verdict", "accuracy", "drop", "p50", "size", "speedup")},
    }


# What two runs of one build may differ in without having built anything differently: when and where it ran, how
# long it took, what came from the cache, and what was measured (latency, speed-ups, memory; ``why`` quotes them).
MEASURED = frozenset({"created", "seconds", "cwd", "cache", "from_cache", "latency", "latency_p50_ms", "latency_ms",
                      "latency_speedup", "memory", "ratios", "host_validation", "why"})
MEASURED_OBJECTIVE = frozenset({"warnings"})  # the objective's warnings quote measured speed ("runs slower than FP32")
SPEC_PLACE = frozenset({"out", "cache", "cache_dir"})  # where a build writes and caches, not what it builds
CACHE_NOTE = "restored from the stage cache"  # a target's note when its artifact came from the cache (pipeline/cache.py)


def reproducible(manifest: dict) -> dict:
    """The manifest without ``MEASURED`` values (at any depth) and the spec's ``SPEC_PLACE``: what a batch cell and
    the same build alone must agree on (artifacts and their sha256, verdicts, precision, settings, metrics, search)."""
    def strip(x, within: str = ""):
        if isinstance(x, dict):
            return {k: strip(v, k) for k, v in x.items()
                    if k not in MEASURED and not (within == "objective" and k in MEASURED_OBJECTIVE)}
        if isinstance(x, list):
            return [strip(v) for v in x if not (isinstance(v, str) and v.startswith(CACHE_NOTE))]
        return x

    out = strip(manifest)
    out["spec"] = {k: v for k, v in (out.get("spec") or {}).items() if k not in SPEC_PLACE}
    return out


def outputs_digest(manifest: dict) -> str:
    """sha256 of ``reproducible(manifest)``: batch.json's ``outputs_sha256`` of a cell."""
    import hashlib

    return hashlib.sha256(json.dumps(reproducible(manifest), sort_keys=True, default=str).encode()).hexdigest()


def _write_cell_record(cell, record: dict, turns: dict) -> None:
    """``batch_cell.json`` beside the manifest: where and how the batch ran this build (threads, node, when it worked
    and when it timed alone on its node, how long its timing waited for the node)."""
    keep = {k: record[k] for k in ("worker", "threads", "seconds", "attempts") if k in record}
    path = cell.out / "batch_cell.json"
    if cell.out.is_dir():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**keep, "node_turns": turns, "resources": cell.to_dict()["resources"],
                                   "python": platform.python_version()}, indent=2))
        os.replace(tmp, path)


def finished(cell) -> dict | None:
    """The summary of a cell an earlier run built, when it may be skipped; else None."""
    from edgebuild.pipeline import manifest as manifest_file
    from edgebuild.pipeline.errors import BadInputError
    from edgebuild.pipeline.revalidate import verify_files

    manifest = manifest_file.read(cell.out)
    if manifest is None or manifest.get("spec") != cell.spec:
        return None
    from edgebuild.pipeline.results import Manifest

    try:
        entry = Manifest.from_dict(manifest).targets.get(cell.target)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    if entry is None or entry.verdict.status not in ("pass", "fail") or entry.from_earlier_build:
        return None
    try:
        verify_files(cell.out / cell.target, cell.out / cell.target / "metadata.json")
    except (BadInputError, OSError):
        return None
    record = {**_cell_head(cell), **summary_of(manifest, cell.target, cell.out), "skipped": True}
    try:
        record.update({k: v for k, v in json.loads((cell.out / "batch_cell.json").read_text()).items()
                       if k in ("worker", "threads", "seconds")})
    except (OSError, ValueError):
        pass
    return record
