"""`edgebuild validate DIR --eval SRC`: re-check an existing artifact against the build's FP32 reference."""
from __future__ import annotations

import json
from pathlib import Path

from edgebuild.pipeline import validate as V
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import InputSpec, PreprocessSpec
from edgebuild.targets.base import Artifact, get_backend


def revalidate(artifact_dir: Path, eval_source: str) -> dict:
    from edgebuild.calibration.sources import load_source
    from edgebuild.pipeline.target import open_runner
    from edgebuild.targets.onnx import OrtRunner

    meta_path = artifact_dir / "metadata.json"
    if not meta_path.is_file():
        raise BadInputError(f"{artifact_dir}: no metadata.json (is it a target directory of an edgebuild output?)")
    meta = json.loads(meta_path.read_text())
    reference = (artifact_dir / meta["reference"]).resolve()
    if not reference.is_file():
        raise BadInputError(f"{artifact_dir}: the FP32 reference {meta['reference']} is missing")
    for name, f in meta["files"].items():
        if not (artifact_dir / name).is_file():
            raise BadInputError(f"{artifact_dir}: artifact file {name} is missing")
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
        lat = V.latency(runner, evalset)
    metrics = V.compare(ref_outputs, outputs, evalset.labels)
    budget = V.Budget(**meta["budgets"])
    failures = V.judge(metrics, art.size_bytes, lat, budget)
    return {"target": meta["target"], "verdict": "fail" if failures else "pass", "failures": failures,
            "metrics": metrics, "latency": lat, "size_bytes": art.size_bytes, "evaluation": evalset.describe()}
