"""`edgebuild validate DIR --eval SRC`: re-check an existing artifact against the build's FP32 reference;
`--outputs FILE`: judge outputs computed elsewhere against the reference the build saved, running nothing."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from edgebuild.pipeline import timing
from edgebuild.pipeline.errors import BadInputError, IntegrityError
from edgebuild.pipeline.results import Latency, Memory, TargetResult, decide
from edgebuild.pipeline.spec import InputSpec, PreprocessSpec
from edgebuild.pipeline.stages import validate as V
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


@dataclass
class Loaded:
    """An artifact directory ready to be validated anywhere: verified files, evaluation feeds, FP32 reference outputs."""

    meta: dict
    artifact: Artifact
    backend: object
    evalset: object
    reference: list
    reference_source: str
    judging: V.Judging
    budget: V.Budget


def _verified(artifact_dir: Path) -> tuple[dict, Artifact]:
    meta_path = artifact_dir / "metadata.json"
    if not meta_path.is_file():
        raise BadInputError(f"{artifact_dir}: no metadata.json (is it a target directory of an edgebuild output?)")
    meta = verify_files(artifact_dir, meta_path)
    return meta, Artifact(meta["target"], meta["backend"], meta["precision"], artifact_dir, meta["artifact"],
                          list(meta["files"]), meta["settings"], meta["io"])


def _loaded(meta: dict, art: Artifact, evalset, reference: list, source: str, evaluator: str | None) -> Loaded:
    """``evaluator``: the user's own ``--evaluator``. An evaluator that only the artifact's metadata names is never
    imported (a folder received from someone must not choose code to run): its name is asked for instead."""
    j = meta.get("judging") or {}
    named = j.get("evaluator")
    if named and not evaluator:
        raise BadInputError(f"{art.directory}: this artifact was judged by the evaluator {str(named)[:200]!r} named in "
                            "its metadata.json; validate never imports code an artifact folder names: if it is your "
                            "own, pass --evaluator with its package.module:function")
    judging = V.Judging(output_names=tuple(j.get("outputs") or ()), task=j.get("task", "auto"),
                        task_options=tuple(sorted((j.get("task_options") or {}).items())),
                        labels_output=j.get("labels_output") or None, evaluator=evaluator)
    return Loaded(meta, art, get_backend(meta["backend"]), evalset, reference, source, judging,
                  V.Budget.from_dict(meta["budgets"]))


def load(artifact_dir: Path, eval_source: str | None, evaluator: str | None = None) -> Loaded:
    """``eval_source`` None: the build's own evaluation data (``build_evalset``); ``evaluator``: the user's own."""
    from edgebuild.calibration.sources import load_source

    meta, art = _verified(artifact_dir)
    inputs = tuple(InputSpec(i["name"], tuple(i["shape"]), i["dtype"], i.get("layout") or "ANY")
                   for i in meta["source_inputs"])  # feeds are in the source model's layout; runners adapt
    pre = PreprocessSpec(**meta.get("preprocess", {}))
    saved = _saved_loop(artifact_dir, meta)
    if saved is not None and not eval_source:  # a stateful build: the saved feeds are its evaluation set, loop and all
        evalset = saved.evalset
    elif saved is not None:  # other data, judged closed loop like the build: its state links, its sequences
        evalset = _looped(load_source(eval_source, inputs, pre), saved.evalset.state, artifact_dir, eval_source)
    else:
        evalset = load_source(eval_source, inputs, pre) if eval_source else build_evalset(artifact_dir, inputs)
    return _loaded(meta, art, evalset, *_reference(artifact_dir, meta, evalset), evaluator)


def _saved_loop(artifact_dir: Path, meta: dict):
    """The build's saved reference when the model was judged closed loop (pipeline/stages/closed_loop.py), else None."""
    from edgebuild.pipeline.stages import reference as saved_reference

    try:
        saved = saved_reference.load((artifact_dir / meta["reference"]).parent)
    except BadInputError:
        return None
    return saved if saved.evalset.closed_loop else None


def _looped(evalset, state, artifact_dir: Path, source: str):
    """``evalset`` run closed loop with the build's state links, in sequences as the build's spec declared them (one
    stream when it declared none)."""
    import dataclasses

    from edgebuild.calibration import sequences as S
    from edgebuild.pipeline import manifest as manifest_file
    from edgebuild.pipeline.spec import check_sequences

    spec = manifest_file.rerun_spec(manifest_file.beside(artifact_dir)) or {}
    return dataclasses.replace(S.assign(evalset, check_sequences(spec.get("sequences")), source), state=state)


def build_evalset(artifact_dir: Path, inputs: tuple[InputSpec, ...]):
    """The evaluation set of the build that made ``artifact_dir``, made again from its manifest's spec (sources and
    split are deterministic) and checked against the content hash the build recorded."""
    from edgebuild.pipeline import manifest as manifest_file
    from edgebuild.pipeline.spec import BuildSpec
    from edgebuild.pipeline.stages.data import resolve_data

    manifest = manifest_file.beside(artifact_dir)
    try:
        data = manifest_file.rerun_spec(manifest)
        if data is None:
            raise FileNotFoundError(f"no edgebuild manifest at {manifest}")
        spec = BuildSpec.from_dict(data)
        recorded = json.loads((artifact_dir / "validation.json").read_text())["evaluation"]["content_hash"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{artifact_dir}: no --eval and no readable build record beside it "
                            f"({type(e).__name__}: {e}); give --eval") from None
    _, evalset, _ = resolve_data(spec, inputs)
    if evalset.content_hash() != recorded:
        raise BadInputError(f"{artifact_dir}: the build's evaluation data changed since the build (content hash "
                            f"{evalset.content_hash()} ≠ recorded {recorded}); give --eval")
    return evalset


def _reference(artifact_dir: Path, meta: dict, evalset) -> tuple[list, str]:
    """The build's saved FP32 outputs (reference/outputs.npz) when the evaluation data is the one they were computed
    on (same content hash); otherwise the FP32 reference model is run on the data given."""
    from edgebuild.pipeline.stages import reference as saved_reference
    from edgebuild.targets.base import reference_runner

    try:
        saved = saved_reference.load((artifact_dir / meta["reference"]).parent)
    except BadInputError:  # a build from before the saved format, or outputs that vary in shape: run the reference
        saved = None
    if saved is not None and saved.evalset.content_hash() == evalset.content_hash():
        return saved.outputs, "saved (reference/outputs.npz)"
    runner = reference_runner((artifact_dir / meta["reference"]).resolve(), meta["runtime"]["threads"])
    return V.collect(runner, evalset), "recomputed (FP32 reference model on this data)"


def judged(loaded: Loaded, outputs: list, lat: dict | None, vs_host: dict | None = None, **extra) -> dict:
    """The outputs of the artifact (from any runner: host, emulator, device) judged against the FP32 reference and
    the build's budgets, as a validation result, every check by the one judge (``V.assess``). ``lat`` None: no
    latency is judged (e.g. under emulation); ``vs_host``: emulated outputs' agreement with the host's."""
    metrics = V.compare(loaded.reference, outputs, loaded.evalset.labels, loaded.judging)
    art = loaded.artifact
    memory = recorded_memory(art.directory)
    verdict = decide(V.assess(metrics, loaded.budget, loaded.judging.task, art.size_bytes, lat, memory, vs_host).failures)
    result = TargetResult(
        verdict, metrics=metrics, latency=None if lat is None else Latency.from_dict(lat), size_bytes=art.size_bytes,
        memory=Memory.from_dict({**memory, "source": "measured by the build (validation.json)"}) if memory else None,
        evaluation=loaded.evalset.describe(), target=loaded.meta["target"],
        extra={"reference": loaded.reference_source, **extra},
        keys=tuple(k for k in JUDGED_KEYS if k != "memory" or memory))
    return result.to_validation()


# a validation result's keys, in order (``latency`` null when none was judged, ``memory`` absent when the build
# measured none), then what the runner adds
JUDGED_KEYS = ("target", "verdict", "failures", "failed_checks", "metrics", "latency", "size_bytes", "memory",
               "evaluation", "reference")


def recorded_memory(artifact_dir: Path) -> dict | None:
    """The runtime memory the build measured for this artifact (its files are the ones verified by sha256): the
    memory budgets are judged on it again, so a budget missed at build time is missed by validate too."""
    try:
        memory = json.loads((artifact_dir / "validation.json").read_text()).get("memory")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(memory, dict):
        return None
    peak, micro = memory.get("peak_mb"), memory.get("micro")
    ok = peak is None or (isinstance(peak, (int, float)) and not isinstance(peak, bool))
    return memory if ok and (micro is None or isinstance(micro, dict)) else None


def revalidate(artifact_dir: Path, eval_source: str | None, evaluator: str | None = None) -> dict:
    from edgebuild.pipeline.stages.per_target import open_runner

    loaded = load(artifact_dir, eval_source, evaluator)
    profile_threads = loaded.meta["runtime"]["threads"]
    threads = max(1, min(profile_threads, timing.host_cores()))  # as the build timed it: no more threads than cores
    with open_runner(loaded.backend, loaded.artifact, threads) as runner:
        outputs = V.collect(runner, loaded.evalset)
        lat = {**timing.latency(runner, loaded.evalset), "threads_profile": profile_threads}
    return judged(loaded, outputs, lat)


def validate_outputs(artifact_dir: Path, outputs_file: str, evaluator: str | None = None) -> dict:
    """Outputs computed elsewhere (``outputs_file``: keyed by output name, sample-major, on reference/feeds.npz)
    judged against the FP32 outputs the build saved (pipeline/stages/reference.py) and its budgets, as any validation.
    No runtime is run, so no latency is judged. A file that does not fit the reference is a BadInputError (exit 2)."""
    from edgebuild.pipeline.stages import reference as saved_reference

    meta, art = _verified(artifact_dir)
    saved = saved_reference.load((artifact_dir / meta["reference"]).parent)
    loaded = _loaded(meta, art, saved.evalset, saved.outputs, "saved (reference/outputs.npz)", evaluator)
    outputs = saved_reference.read_outputs(Path(outputs_file), saved)
    return judged(loaded, outputs, None, outputs_file={"path": str(outputs_file), "samples": len(outputs),
                                                       "outputs": list(saved.output_names)})


def summary_lines(result: dict) -> list[str]:
    """The human summary of a validation result (``edgebuild validate`` without --json)."""
    r = TargetResult.from_validation(result)
    m = r.metrics
    acc = f"accuracy {m.accuracy:.2f} % (FP32 {m.accuracy_reference:.2f} %)" if m.accuracy is not None else \
        f"cosine {m.cosine_min:.4f}"
    lat = r.latency
    where = f" on {lat.extra['measured_on']}" if lat and lat.extra.get("measured_on") else ""
    p50 = f", p50 {lat.p50_ms:.3f} ms{where}" if lat else ""
    lines = [f"{r.target}: {r.verdict.status.upper()} — {acc}{p50}"]
    if "device" in r.extra:
        lines.append(f"  device: {r.extra['device']['machine']}, {r.extra['device']['runtime']}")
    if "outputs_file" in r.extra:
        f = r.extra["outputs_file"]
        lines.append(f"  outputs: {f['path']} ({f['samples']} samples) vs the FP32 outputs the build saved; "
                     "nothing was run, no latency")
    if "emulation" in r.extra:
        e, h = r.extra["emulation"], r.extra["emulation"]["vs_host"]
        lines.append(f"  emulated: {e['runtime']}; vs host: top-1 agreement {h.get('top1_agreement', float('nan')):.2f} %, "
                     f"max abs error {h['max_abs_error']:.3g}, cosine min {h['cosine_min']:.6f} (no latency under emulation)")
    lines += [f"  failed: {f}" for f in r.verdict.failures]
    return lines
