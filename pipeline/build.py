"""The build: load -> export ONNX -> for each target (convert + validate) -> manifest, report.

The output directory is assembled in a sibling staging directory and swapped in at the end, so an
interrupted or failed build never leaves half an artifact; a previous output is replaced whole.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edgebuild.pipeline import manifest as manifest_file
from edgebuild.pipeline import tasks as T
from edgebuild.pipeline.cache import StageCache, default_location
from edgebuild.pipeline.cache_store import open_cache
from edgebuild.pipeline.errors import BadInputError, BudgetError, ConversionError
from edgebuild.pipeline.offline import runtime_telemetry_off
from edgebuild.pipeline.results import Manifest, TargetResult, compression_check
from edgebuild.pipeline.schedule import _build_all, effective_jobs, memory_limit
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
    _check_replaceable(out)
    _clean_stale(out)
    _check_lock(out)
    cache = open_cache((spec.cache_dir or default_location()) if spec.cache else None)  # a folder or s3://, gs://
    runtime_telemetry_off()  # before any runtime starts in this process (children: Scope.child_env)
    staging, scratch = _make_workdirs(out)
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
                reference, reference_cached = _reference_outputs(cache, model, evalset)
                save_reference(refdir, reference, evalset, [o.name for o in model.outputs])  # pipeline/stages/reference.py
                judging = V.resolve(judging_for(spec, model), reference, evalset.labels)
            deadline = time.monotonic() - (time.perf_counter() - t_start) + (spec.build_max_seconds or float("inf"))
            ctx = BuildContext(BuildJob(spec, model, calib, evalset, reference, judging),
                               Workspace(cache, scratch, stage, deadline))
            targets = _build_all(ctx, profiles, staging, effective_jobs(jobs, len(profiles)), memory_limit(max_memory_gb))
            cache_record = {"reference_outputs": reference_cached,
                            "note": "per target: `cache` says which results came from the stage cache"}
            manifest = _manifest(spec, profiles, model, export_record, data_record, reference, evalset, targets,
                                 time.perf_counter() - t_start, judging, cache_record,
                                 None if compress_record is None else _gate_compression(compress_record, spec))
            return BuildResult(_finish(staging, out, manifest), out)
    finally:
        _remove_workdirs(staging, scratch)


def _remove_workdirs(*dirs: Path) -> None:
    """Remove the build's staging and scratch, to the end even when Ctrl-C / SIGTERM (a KeyboardInterrupt) comes
    meanwhile, which is raised after: a build stopped just after its output swapped in left its scratch beside it."""
    stopped = None
    for d in dirs:
        while True:
            try:
                shutil.rmtree(d, ignore_errors=True)
                break
            except KeyboardInterrupt as e:
                stopped = e
    if stopped is not None:
        raise stopped


def _check_replaceable(out: Path) -> None:
    """An output directory is replaced only when it is edgebuild's: new, empty, or holding its manifest."""
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise BadInputError(f"--out {out}: refusing to replace the current directory, one of its parents or the "
                            "home directory; name a directory of its own, e.g. -o out")
    if out.is_symlink():  # replacing it would replace the link, not what it points at: say so before any work
        raise BadInputError(f"--out {out}: it is a symbolic link (to {os.readlink(out)}); give the folder itself")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"refusing to replace {out}: it is a file, not an edgebuild output directory")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):  # renaming a directory away needs write access to it
        raise BadInputError(f"--out {out}: the output folder is read-only; cannot replace it")
    if out.is_dir() and any(out.iterdir()) and manifest_file.read(out) is None:
        raise BadInputError(f"refusing to replace {out}: it is not empty and not an edgebuild output "
                            "(no manifest.json written by edgebuild)")


def _make_workdirs(out: Path) -> tuple[Path, Path]:
    """Staging (becomes the output) and scratch (temp files, the user's calibration data) beside the output,
    named with the build's pid so that a later build can clean them up after a kill."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        parent = out.parent.resolve()  # absolute: children run in other directories
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=parent))
        staging.chmod(0o755)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise BadInputError(f"--out {out}: cannot write in {out.parent.resolve()} ({e.strerror or e})") from None
    return staging, scratch


_WORKDIR = re.compile(r"\.(?P<out>.+)\.(staging|tmp|old)-(?P<pid>\d+)(-.*)?")


def _clean_stale(out: Path) -> list[Path]:
    """Remove staging/scratch/old directories that builds killed before cleaning up left beside ``out``."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*-*"):
        m = _WORKDIR.fullmatch(p.name)
        if not m or m["out"] != out.name or p.is_symlink() or not p.is_dir() or _pid_alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _check_lock(out: Path) -> None:
    """Before any work: a lock that is not a plain file of its own (a symlink, a hard link, a FIFO someone who can
    write beside the output planted) is refused, never followed."""
    path = lock_path(out)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise BadInputError(f"--out {out}: cannot check the lock file {path} ({e.strerror or e})") from None
    _refuse_lock(out, path, st)


def _refuse_lock(out: Path, path: Path, st: os.stat_result) -> None:
    import stat

    what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file" if not stat.S_ISREG(st.st_mode)
            else "a hard link to another file" if st.st_nlink != 1 else None)
    if what:
        raise BadInputError(f"--out {out}: the lock file {path} is {what} (someone who can write in "
                            f"{path.parent} may have planted it); refusing to follow it: remove it and build again")


@contextmanager
def _output_lock(out: Path):
    """Serialize the output swap of concurrent builds (fcntl lock on ``.<out>.lock`` beside the output), opened
    with O_NOFOLLOW: a planted symlink is refused (exit 2), no file is ever created where a link points."""
    import errno
    import fcntl

    path = lock_path(out)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadInputError(f"--out {out}: the lock file {path} is a symbolic link (someone who can write in "
                                f"{path.parent} may have planted it); refusing to follow it: remove it and build "
                                "again") from None
        raise BadInputError(f"--out {out}: cannot open the lock file {path} ({e.strerror or e})") from None
    try:
        _refuse_lock(out, path, os.fstat(fd))
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _signals_held():
    """SIGINT/SIGTERM that land while the output is being swapped in are held, not raised: the swap is finished
    and the build reports success (the output is whole, never half old, half new). Only the main thread handles
    signals; a build in another thread is left as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from edgebuild.procs import safe_signal_stack

    safe_signal_stack()  # a held signal must be deliverable: never onto an alternate stack a library left dangling
    held: list[int] = []
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            import logging

            logging.getLogger("edgebuild").warning("signal %s arrived while the output was being swapped in: the "
                                                   "swap was finished", ", ".join(map(str, held)))


def _finish(staging: Path, out: Path, manifest: Manifest) -> Manifest:
    """Under the output lock: keep what an earlier build left that this one does not replace, write the
    manifest and report, swap the staging directory in. A build whose every target failed to convert leaves
    an earlier output as it was (its manifest says so: ``output``)."""
    from edgebuild.pipeline.report import write_report

    with _output_lock(out):
        _check_replaceable(out)  # another build may have written it meanwhile
        previous = manifest_file.read(out) if out.is_dir() else None
        statuses = [t.verdict.status for t in manifest.targets.values()]
        if previous is not None and statuses and all(v == "error" for v in statuses):
            return replace(manifest, output=f"not written: every target failed; {out} still holds the earlier build "
                                            f"of {previous.get('created', 'unknown time')}")
        try:  # a full disk, a quota: one line, the earlier output kept (staging is removed by build)
            if previous is not None:
                manifest = _carry_over(previous, out, staging, manifest)
            manifest_file.write(staging, manifest)
            write_report(manifest, staging / "report.md")
        except OSError as e:
            raise BadInputError(f"--out {out}: cannot write the output ({e.strerror or e}); "
                                f"{'the earlier output is kept' if previous is not None else 'nothing written'}") from None
        _link_running_log(out, staging)
        with _signals_held():
            try:
                _swap_in(staging, out)
            except OSError as e:  # a read-only output (or its folder): the earlier output stays as it was
                raise BadInputError(f"--out {out}: cannot replace it ({e.strerror or e}); the earlier output is kept") from None
        return manifest


def _carry_over(previous: dict, out: Path, staging: Path, manifest: Manifest) -> Manifest:
    """Targets of the earlier build in ``out`` that this build did not build (or failed to convert) stay:
    their directories are copied into staging, listed in the manifest as from the earlier build. A kept
    target built from another model keeps its own FP32 reference in ``reference-<sha256[:16]>/``."""
    from edgebuild.pipeline.cache import plain_name

    model_sha = (manifest.model or {}).get("sha256")
    kept, targets = [], dict(manifest.targets)
    for name, entry in previous["targets"].items():
        src = out / name
        new = targets.get(name)
        if (new is not None and new.verdict.status != "error") or not plain_name(name) or name == "reference" \
                or not (src / "metadata.json").is_file() or not isinstance(entry, dict):
            continue
        shutil.copytree(src, staging / name, symlinks=True)
        meta_path = staging / name / "metadata.json"
        meta = json.loads(meta_path.read_text())
        ref_sha = meta.get("source_model_sha256")
        ref_src = Path(os.path.normpath(src / str(meta.get("reference", "")))).parent
        if ref_sha and ref_sha != model_sha and ref_src.is_dir() and ref_src.parent == Path(os.path.normpath(out)):
            ref_dir = staging / f"reference-{ref_sha[:16]}"
            if not ref_dir.exists():
                shutil.copytree(ref_src, ref_dir, symlinks=True)
            meta["reference"] = f"../{ref_dir.name}/model_fp32.onnx"
            meta_path.write_text(json.dumps(meta, indent=2, default=str))
        earlier = replace(TargetResult.from_dict(entry), from_earlier_build=previous.get("created"))
        # failed now: the directory holds the earlier artifact
        targets[name] = earlier if new is None else replace(new, previous=earlier)
        kept.append(name)
    return replace(manifest, targets=targets, kept_from_earlier_build=kept or None)


def _link_running_log(out: Path, staging: Path) -> None:
    """The CLI's build log (``.<out>.log-PID``, still being written) gets a second name in the new output before the
    swap: an output swapped in is never without its ``build.log``, even if a signal lands before the CLI moves the
    log in (``buildlog.keep``). Same file, so every later line lands there too."""
    from edgebuild.pipeline.buildlog import log_path_for

    running = log_path_for(out)
    try:
        if running.is_file() and not running.is_symlink() and not (staging / "build.log").exists():
            os.link(running, staging / "build.log")
    except OSError:
        pass  # no hard links here: the CLI moves the log in afterwards, as before


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` (callers hold the output lock). The earlier output is first renamed onto a
    fresh private directory (``mkdtemp``: never a name someone planted, e.g. a ``.old-<pid>`` symlink)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        try:
            os.replace(out, old)
        except OSError:
            old.rmdir()
            raise
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def _judging_record(judging: V.Judging, evalset, spec: BuildSpec, profiles) -> dict:
    from edgebuild.pipeline.stages.per_target import budget_for

    warnings = list(judging.warnings)
    for note in dict.fromkeys(V.coarseness_warning(len(evalset), budget_for(p, spec)) for p in profiles):
        if note:
            warnings.append(note)
    return {"task": judging.task, "task_options": judging.options, "labels_output": judging.labels_output or None,
            "evaluator": judging.evaluator, "outputs": list(judging.output_names), "warnings": warnings}


def _manifest(spec, profiles, model, export_record, data_record, reference, evalset, targets, seconds,
              judging: V.Judging, cache: dict, compression: dict | None) -> Manifest:
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
        tools=tool_versions(), model=ref, data=data_record, judging=_judging_record(judging, evalset, spec, profiles),
        targets=targets, cache=cache, compression=compression)
