"""`edgebuild validate DIR --eval SRC`: re-check an existing artifact against the build's FP32 reference."""
from __future__ import annotations

import json
import re
from pathlib import Path

from edgebuild.pipeline import timing
from edgebuild.pipeline import validate as V
from edgebuild.pipeline.errors import BadInputError, IntegrityError
from edgebuild.pipeline.spec import InputSpec, PreprocessSpec
from edgebuild.targets.base import Artifact, get_backend


REFERENCE = re.compile(r"\.\./reference(-[0-9a-f]{8,64})?/model_fp32\.onnx")


def verify_files(artifact_dir: Path, meta_path: Path) -> dict:
    """Integrity first: every file in ``metadata.json`` ``files`` (and the FP32 reference) has its recorded
    sha256, before anything is loaded or run. A mismatch (an INT8 file swapped for the FP32 one, a bit flip,
    a truncated copy) is an ``IntegrityError`` (exit 2) naming the file. Returns the metadata."""
    from edgebuild.pipeline.cache import file_hash, plain_name

    try:
        meta = json.loads(meta_path.read_text())
        files, reference = meta["files"], meta["reference"]
        if not isinstance(files, dict) or not files:
            raise KeyError("files")
    except (ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{meta_path}: not an edgebuild metadata.json ({type(e).__name__}: {e})") from None
    bad = [n for n in files if not plain_name(n)]
    if bad:
        raise IntegrityError(f"{artifact_dir}: metadata.json names {bad[0]!r}, which is not a file of this directory")
    if meta.get("artifact") not in files:
        raise IntegrityError(f"{artifact_dir}: metadata.json's artifact {meta.get('artifact')!r} is not among its files")
    if not isinstance(reference, str) or not REFERENCE.fullmatch(reference):
        raise IntegrityError(f"{artifact_dir}: metadata.json points the reference at {reference!r}")
    checks = [(artifact_dir / name, name, (f or {}).get("sha256") if isinstance(f, dict) else None)
              for name, f in files.items()]
    checks.append(((artifact_dir / reference), f"the FP32 reference {reference}", meta.get("source_model_sha256")))
    for path, what, recorded in checks:
        if not path.is_file():
            raise BadInputError(f"{artifact_dir}: {what} is missing")
        if not recorded:
            raise IntegrityError(f"{artifact_dir}: metadata.json records no sha256 for {what}")
        actual = file_hash(path)
        if actual != recorded:
            raise IntegrityError(f"{artifact_dir}: {what} does not match metadata.json (sha256 {actual[:12]}… ≠ "
                                 f"recorded {recorded[:12]}…): it was modified or swapped after the build; rebuild it")
    return meta


def revalidate(artifact_dir: Path, eval_source: str) -> dict:
    from edgebuild.calibration.sources import load_source
    from edgebuild.pipeline.target import open_runner
    from edgebuild.targets.onnx import OrtRunner

    meta_path = artifact_dir / "metadata.json"
    if not meta_path.is_file():
        raise BadInputError(f"{artifact_dir}: no metadata.json (is it a target directory of an edgebuild output?)")
    meta = verify_files(artifact_dir, meta_path)
    reference = (artifact_dir / meta["reference"]).resolve()
    backend = get_backend(meta["backend"])
    art = Artifact(meta["target"], meta["backend"], meta["precision"], artifact_dir, meta["artifact"],
                   list(meta["files"]), meta["settings"], meta["io"])
    inputs = tuple(InputSpec(i["name"], tuple(i["shape"]), i["dtype"], i.get("layout") or "ANY")
                   for i in meta["source_inputs"])  # feeds are in the source model's layout; runners adapt
    pre = PreprocessSpec(**meta.get("preprocess", {}))
    evalset = load_source(eval_source, inputs, pre)
    ref_outputs = V.collect(OrtRunner(reference, meta["runtime"]["threads"]), evalset)
    with open_runner(backend, art, meta["runtime"]["threads"]) as runner:
        outputs = V.collect(runner, evalset)
        lat = timing.latency(runner, evalset)
    j = meta.get("judging") or {}
    judging = V.Judging(output_names=tuple(j.get("outputs") or ()), task=j.get("task", "auto"),
                        task_options=tuple(sorted((j.get("task_options") or {}).items())),
                        labels_output=j.get("labels_output") or None, evaluator=j.get("evaluator"))
    metrics = V.compare(ref_outputs, outputs, evalset.labels, judging)
    budget = V.Budget.from_dict(meta["budgets"])
    failures = V.judge(metrics, art.size_bytes, lat, budget, judging.task)
    return {"target": meta["target"], "verdict": "fail" if failures else "pass", "failures": [str(f) for f in failures],
            "failed_checks": [f.to_dict() for f in failures], "metrics": metrics, "latency": lat,
            "size_bytes": art.size_bytes, "evaluation": evalset.describe()}
