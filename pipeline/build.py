"""The build: load -> export ONNX -> for each target (convert + validate) -> manifest, report.

The output directory is assembled in a sibling staging directory and swapped in at the end, so an
interrupted or failed build never leaves half an artifact; a previous output is replaced whole.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgebuild.pipeline import validate as V
from edgebuild.pipeline.cache import StageCache, default_root
from edgebuild.pipeline.errors import BadInputError, BudgetError, ConversionError, EdgeBuildError
from edgebuild.pipeline.spec import BuildSpec
from edgebuild.pipeline.versions import tool_versions
from edgebuild.targets.base import backend_exists
from edgebuild.targets.profiles import TargetProfile, resolve

DEFAULT_TARGETS = ("arm64",)  # when neither --target nor edgebuild.yaml names one


@dataclass
class BuildResult:
    manifest: dict
    out: Path

    @property
    def exit_code(self) -> int:
        return self.manifest["exit_code"]

    def raise_for_verdict(self) -> None:
        """Turn a finished build with failed targets into the matching EdgeBuildError."""
        targets = self.manifest["targets"]
        errors = [f"{n}: {t['error']}" for n, t in targets.items() if t["verdict"] == "error"]
        failed = [f"{n}: {'; '.join(t['failures'])}" for n, t in targets.items() if t["verdict"] == "fail"]
        if self.manifest.get("compression", {}).get("failure"):
            failed.insert(0, self.manifest["compression"]["failure"])
        if errors:
            raise ConversionError("conversion failed — " + " | ".join(errors + failed))
        if failed:
            raise BudgetError("budget failed — " + " | ".join(failed))


@contextmanager
def _quiet_stage(text: str):
    yield


def build(spec: BuildSpec, stage: Callable[[str], object] = _quiet_stage) -> BuildResult:
    """Run a whole build; returns the result (check ``exit_code``), raises EdgeBuildError on bad input."""
    from edgebuild.pipeline.data import resolve_data
    from edgebuild.pipeline.export import export_onnx
    from edgebuild.pipeline.sources import load_model
    from edgebuild.pipeline.target import BuildContext, build_target, precision_for

    t_start = time.perf_counter()
    profiles = resolve(spec.targets or DEFAULT_TARGETS, spec.profile_files)
    for p in profiles:
        if not backend_exists(p.backend):
            raise BadInputError(f"target {p.name}: unknown backend {p.backend!r}")
        precision_for(p, spec)
    out = Path(spec.out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    staging.chmod(0o755)
    scratch = Path(tempfile.mkdtemp(prefix="edgebuild-"))
    try:
        with stage("loading the model"):
            loaded = load_model(spec)
        with stage("reading calibration and evaluation data"):
            calib, evalset, data_record = resolve_data(spec, loaded.inputs)
        compress_record = None
        if spec.compress:
            from edgebuild.pipeline.compress import compress

            loaded, compress_record = compress(loaded, spec, evalset, stage)
        refdir = staging / "reference"
        refdir.mkdir()
        with stage("exporting FP32 ONNX"):
            model, export_record = export_onnx(loaded, evalset, refdir)
        with stage("running the FP32 reference"):
            from edgebuild.targets.onnx import OrtRunner

            reference = V.collect(OrtRunner(model.onnx_path, 2), evalset)
            _save_reference(refdir / "outputs.npz", reference, evalset)
        cache = StageCache((Path(spec.cache_dir) if spec.cache_dir else default_root()) if spec.cache else None)
        ctx = BuildContext(spec, model, calib, evalset, reference, cache, scratch, stage=stage)
        targets = {}
        for profile in profiles:
            targets[profile.name] = _build_one(ctx, profile, staging / profile.name, build_target)
        manifest = _manifest(spec, profiles, model, export_record, data_record, reference, evalset, targets,
                             time.perf_counter() - t_start)
        if compress_record is not None:
            _gate_compression(manifest, compress_record, spec)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        from edgebuild.pipeline.report import write_report

        write_report(manifest, staging / "report.md")
        _swap_in(staging, out)
        return BuildResult(manifest, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _build_one(ctx, profile: TargetProfile, outdir: Path, build_target) -> dict:
    outdir.mkdir()
    t0 = time.perf_counter()
    try:
        result = build_target(ctx, profile, outdir)
    except BadInputError:
        raise
    except EdgeBuildError as e:  # this target failed to convert; the others still build
        shutil.rmtree(outdir, ignore_errors=True)
        result = {"verdict": "error", "backend": profile.backend, "error": str(e), "failures": []}
    result["profile"] = profile.to_dict()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise BadInputError(f"refusing to replace {out}: it exists and is not an edgebuild output (no manifest.json)")


def _swap_in(staging: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save_reference(path: Path, reference: list, evalset) -> None:
    arrays = {f"output_{j}": np.stack([o[j] for o in reference]) for j in range(len(reference[0]))}
    if evalset.labels is not None:
        arrays["labels"] = evalset.labels
    np.savez_compressed(path, **arrays)


def _gate_compression(manifest: dict, record: dict, spec: BuildSpec) -> None:
    """Compression may not silently cost accuracy: its FP32 drop is gated like a target's budget."""
    limit = spec.budgets.max_compression_drop
    drop = record["summary"].get("accuracy_drop")
    record["budget"] = {"max_compression_drop": limit}
    if drop is not None and drop > limit:
        record["failure"] = f"compression accuracy drop {drop:.2f} pt > max {limit} pt"
        if manifest["exit_code"] == 0:
            manifest["exit_code"], manifest["verdict"] = 1, "fail"
    manifest["compression"] = record


def _manifest(spec, profiles, model, export_record, data_record, reference, evalset, targets, seconds) -> dict:
    verdicts = [t["verdict"] for t in targets.values()]
    exit_code = 3 if "error" in verdicts else 1 if "fail" in verdicts else 0
    ref = {"onnx": "reference/model_fp32.onnx", "sha256": model.content_hash,
           "size_bytes": model.onnx_path.stat().st_size, "inputs": [i.__dict__ for i in model.inputs],
           "outputs": [o.__dict__ for o in model.outputs], **export_record}
    if evalset.labels is not None and V.is_classifier(reference):
        ref["accuracy"] = V.accuracy(reference, evalset.labels)
    return {
        "edgebuild": tool_versions(("edgebuild",))["edgebuild"],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": {0: "pass", 1: "fail", 3: "error"}[exit_code], "exit_code": exit_code,
        "seconds": round(seconds, 2), "spec": spec.to_dict(), "tools": tool_versions(),
        "model": ref, "data": data_record, "targets": targets,
    }
