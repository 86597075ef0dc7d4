"""The build: load -> export ONNX -> for each target (convert + validate) -> manifest, report.

The output directory is assembled in a sibling staging directory and swapped in at the end, so an
interrupted or failed build never leaves half an artifact; a previous output is replaced whole (``pipeline/output.py``).
"""
from __future__ import annotations

import datetime as dt
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edgebuild.pipeline import tasks as T
from edgebuild.pipeline.cache import StageCache, default_location
from edgebuild.pipeline.cache_store import open_cache
from edgebuild.pipeline.errors import BadInputError, BudgetError, ConversionError
from edgebuild.pipeline.offline import runtime_telemetry_off
from edgebuild.pipeline.output import (
    check_lock,
    check_replaceable,
    clean_stale,
    finish,
    make_workdirs,
    remove_workdirs,
)
from edgebuild.pipeline.results import Manifest, compression_check
from edgebuild.pipeline.schedule import build_all, effective_jobs, memory_limit
from edgebuild.pipeline.spec import BuildSpec
from edgebuild.pipeline.stages import validate as V
from edgebuild.pipeline.versions import tool_versions
from edgebuild.targets.base import TORCH_EXPORT, backend_exists, check_source, get_backend
from edgebuild.targets.profiles import resolve

DEFAULT_TARGETS = ("arm64",)  # when neither --target nor edgebuild.yaml names one


@dataclass
class BuildResult:
    typed: Manifest  # the build's record as types (pipeline/results.py); ``manifest`` is its manifest.json dict
    out: Path

    @cached_property
    def manifest(self) -> dict:
        return self.typed.to_dict()

    @property
    def exit_code(self) -> int:
        return self.typed.exit_code

    def raise_for_verdict(self) -> None:
        """Turn a build whose verdict is not pass into the matching EdgeBuildError (one line per target)."""
        verdict, targets = self.typed.verdict, self.typed.built
        errors = [f"{n}: {t.verdict.error}" for n, t in targets.items() if t.verdict.status == "error"]
        failed = [str(f) for f in verdict.failures] + [f"{n}: {'; '.join(map(str, t.verdict.failures))}"
                                                        for n, t in targets.items() if t.verdict.status == "fail"]
        if verdict.status == "error":
            raise ConversionError("conversion failed — " + " | ".join(errors + failed))
        if verdict.status == "fail":
            raise BudgetError("budget failed — " + " | ".join(failed))


@contextmanager
def _quiet_stage(text: str):
    yield


def build(spec: BuildSpec, stage: Callable[[str], object] = _quiet_stage, jobs: int | None = None,
          max_memory_gb: float | None = None, env: Mapping[str, str] | None = None,
          models: Mapping[str, object] | None = None) -> BuildResult:
    """Run a whole build; returns the result (check ``exit_code``), raises EdgeBuildError on bad input.

    A build is a value: everything it needs is passed in, and it changes nothing process-wide while it runs, so
    builds can run side by side in threads of one process. ``stage``: the progress sink; ``jobs``: targets converted
    at once (default: the host's cores); ``max_memory_gb``: what the running conversions' estimated peaks may add up
    to (default: the available memory less a margin), see ``pipeline/schedule.py``; ``env``: variables every child
    process of the build gets on top of the offline ones (``edgebuild.procs.OFFLINE_ENV``); ``models``: Python model
    objects the spec names by ``python:NAME`` (the Python API's in-memory models). The build's scratch directory
    (its temp files and its children's ``TMPDIR``) is made beside the output and removed at the end.
    """
    from edgebuild.pipeline.stages.data import budget_calibration, resolve_data
    from edgebuild.pipeline.stages.export import export_onnx, export_program
    from edgebuild.pipeline.stages.load import load_model
    from edgebuild.pipeline.stages.context import BuildContext, BuildJob, Workspace
    from edgebuild.procs import Scope, entered
    from edgebuild.pipeline.stages.per_target import precision_for
    from edgebuild.pipeline.stages.reference import save as save_reference

    t_start = time.perf_counter()
    profiles = resolve(spec.targets or DEFAULT_TARGETS, spec.profile_files)
    for p in profiles:
        if not backend_exists(p.backend):
            raise BadInputError(f"target {p.name}: unknown backend {p.backend!r}")
        get_backend(p.backend).check_profile(p)  # a precision it cannot build, a typo in quant: exit 2 now
        precision_for(p, spec)
    out = Path(spec.out)
    check_replaceable(out)
    clean_stale(out)
    check_lock(out)
    cache = open_cache((spec.cache_dir or default_location()) if spec.cache else None)  # a folder or s3://, gs://
    runtime_telemetry_off()  # before any runtime starts in this process (children: Scope.child_env)
    staging, scratch = make_workdirs(out)
    scope = Scope(scratch=scratch, env=dict(env or {}))  # temp files (calibration data too), children's environment
    try:
        with entered(scope):
            with stage("loading the model"):
                loaded = load_model(spec, models or {})
            for p in list(profiles):  # a backend that takes torch.export programs refuses an ONNX file: exit 2, nothing built
                try:
                    check_source(get_backend(p.backend), p.name, loaded.kind)
                except BadInputError as e:
                    if "all" not in (spec.targets or ()):
                        raise
                    profiles.remove(p)  # `--target all`: every target this model can go to
                    with stage(f"{e} — skipped (--target all)"):
                        pass
            with stage("reading calibration and evaluation data"):
                calib, evalset, data_record = resolve_data(spec, loaded.inputs)
            compress_record = None
            if spec.compress:
                from edgebuild.pipeline.stages.compress import compress

                loaded, compress_record = compress(loaded, spec, evalset, stage)
            refdir = staging / "reference"
            refdir.mkdir()
            with stage("exporting FP32 ONNX"):
                model, export_record = export_onnx(loaded, evalset, refdir, calib=calib)
                calib = budget_calibration(calib, model.onnx_path, spec, data_record)  # samples scaled to the model's cost
            from edgebuild.pipeline.stages.alternatives import eager_programs

            if loaded.kind == "torch" and any(get_backend(p.backend).consumes == TORCH_EXPORT
                                              for p in eager_programs(profiles, spec, reloadable=not models)):
                with stage("exporting the torch.export program"):
                    model, program_record = export_program(loaded, model, scratch)
                    export_record.update(program_record)
            with stage("running the FP32 reference"):
                from edgebuild.pipeline.stages import closed_loop

                evalset, loop_record = closed_loop.resolve(spec.state, model, evalset, spec.sequences, data_record)
                reference, reference_cached = _reference_outputs(cache, model, evalset)  # closed loop when stateful
                evalset = closed_loop.carried(evalset, reference)  # each step's state: the one FP32 carried into it
                if loop_record:
                    data_record["evaluation"] = evalset.describe()
                try:  # a full disk, a quota: one line, like the output's own writing (staging is removed below)
                    save_reference(refdir, reference, evalset, [o.name for o in model.outputs])  # stages/reference.py
                except OSError as e:
                    kept = "the earlier output is kept" if out.exists() else "nothing written"
                    raise BadInputError(f"--out {out}: cannot write the output ({e.strerror or e}: "
                                        f"the FP32 reference); {kept}") from None
                judging = V.resolve(judging_for(spec, model), reference, evalset.labels)
            deadline = time.monotonic() - (time.perf_counter() - t_start) + (spec.build_max_seconds or float("inf"))
            ctx = BuildContext(BuildJob(spec, model, calib, evalset, reference, judging),
                               Workspace(cache, scratch, stage, deadline))
            targets = build_all(ctx, profiles, staging, effective_jobs(jobs, len(profiles)), memory_limit(max_memory_gb))
            cache_record = {"reference_outputs": reference_cached,
                            "note": "per target: `cache` says which results came from the stage cache"}
            manifest = _manifest(spec, profiles, model, export_record, data_record, reference, evalset, targets,
                                 time.perf_counter() - t_start, judging, cache_record,
                                 None if compress_record is None else _gate_compression(compress_record, spec),
                                 loop_record)
            return BuildResult(finish(staging, out, manifest), out)
    finally:
        remove_workdirs(staging, scratch)


REFERENCE_THREADS = 2


def _reference_outputs(cache: StageCache, model, evalset) -> tuple[list, bool]:
    """The FP32 source's outputs on the evaluation set, cached by (model hash, evaluation data hash, runtime)."""
    from edgebuild.pipeline.cache import cached
    from edgebuild.targets.base import REFERENCE_BACKEND, reference_runner

    k = cached("reference", inputs={"model": model.content_hash, "data": evalset.content_hash()},
               config={"threads": REFERENCE_THREADS}, backend=REFERENCE_BACKEND)
    hit = cache.get_result(k)
    if hit is not None:
        n_out, arrays = hit[0]["outputs"], hit[1]
        if n_out and all(f"output_{j}" in arrays and len(arrays[f"output_{j}"]) == len(evalset) for j in range(n_out)):
            return [[arrays[f"output_{j}"][i] for j in range(n_out)] for i in range(len(evalset))], True
    reference = V.collect(reference_runner(model.onnx_path, REFERENCE_THREADS), evalset)
    n_out = len(reference[0])
    shapes_equal = all(len({o[j].shape for o in reference}) == 1 for j in range(n_out))
    if shapes_equal:  # per-sample outputs of varying shape are not stacked: not cached
        cache.put_result(k, {"outputs": n_out}, {f"output_{j}": np.stack([o[j] for o in reference]) for j in range(n_out)})
    return reference, False


def _gate_compression(record: dict, spec: BuildSpec) -> dict:
    """Compression may not silently cost accuracy: its FP32 drop is gated like a target's budget (the failure is
    one of the build's own, ``Manifest.failures``)."""
    record["budget"] = {"max_compression_drop": spec.budgets.max_compression_drop}
    check = compression_check(record)
    if check is not None and not check.ok:
        record["failure"] = str(check)
    return record


def judging_for(spec: BuildSpec, model) -> V.Judging:
    options = T.with_image_size(spec.task, spec.task_options, model.inputs)  # a DFL head's anchor grid
    return V.Judging(output_names=tuple(o.name for o in model.outputs), task=spec.task,
                     task_options=tuple(sorted(options.items())), labels_output=spec.labels_output,
                     evaluator=spec.evaluator, evaluator_base=os.pathsep.join(spec.python_path) or None)


def _judging_record(judging: V.Judging, evalset, spec: BuildSpec, profiles, loop: dict | None = None) -> dict:
    from edgebuild.pipeline.stages.per_target import budget_for

    warnings = list(judging.warnings)
    for note in dict.fromkeys(V.coarseness_warning(len(evalset), budget_for(p, spec)) for p in profiles):
        if note:
            warnings.append(note)
    if loop and not loop.get("closed_loop"):
        warnings.append(f"state {loop['state']} {loop['how']}, but judged per step: {loop['why_not']}")
    return {"task": judging.task, "task_options": judging.options, "labels_output": judging.labels_output or None,
            "evaluator": judging.evaluator, "outputs": list(judging.output_names), "warnings": warnings,
            **({"stateful": loop} if loop else {})}


def _manifest(spec, profiles, model, export_record, data_record, reference, evalset, targets, seconds,
              judging: V.Judging, cache: dict, compression: dict | None, loop: dict | None = None) -> Manifest:
    ref = {"onnx": "reference/model_fp32.onnx", "sha256": model.content_hash,
           "size_bytes": model.onnx_path.stat().st_size, "inputs": [i.__dict__ for i in model.inputs],
           "outputs": [o.__dict__ for o in model.outputs], **export_record}
    if evalset.labels is not None and judging.labels_output:
        from edgebuild.pipeline.metrics import accuracy

        ref["accuracy"] = accuracy(V.stacked(reference, judging.output_names)[judging.labels_output], evalset.labels)
    return Manifest(
        edgebuild=tool_versions(("edgebuild",))["edgebuild"],
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        seconds=round(seconds, 2), spec=spec.to_dict(), cwd=str(Path.cwd()),  # relative spec paths start here
        tools=tool_versions(), model=ref, data=data_record, judging=_judging_record(judging, evalset, spec, profiles, loop),
        targets=targets, cache=cache, compression=compression)
