"""The build's output directory: it is edgebuild's to replace (``check_replaceable``), one build writes it at a
time (the lock), stale work directories of dead builds are cleaned, and the new output is assembled in a sibling
staging directory and swapped in whole at the end (``finish``: signals held meanwhile; targets that failed now keep
the earlier build's artifacts), so an interrupted or failed build never leaves half an artifact.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from edgebuild.pipeline import manifest as manifest_file
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.results import Manifest, TargetResult


def remove_workdirs(*dirs: Path) -> None:
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


def check_replaceable(out: Path) -> None:
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


def make_workdirs(out: Path) -> tuple[Path, Path]:
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


def clean_stale(out: Path) -> list[Path]:
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


def check_lock(out: Path) -> None:
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


def finish(staging: Path, out: Path, manifest: Manifest) -> Manifest:
    """Under the output lock: keep what an earlier build left that this one does not replace, write the
    manifest and report, swap the staging directory in. A build whose every target failed to convert leaves
    an earlier output as it was (its manifest says so: ``output``)."""
    from edgebuild.pipeline.report import write_report

    with _output_lock(out):
        check_replaceable(out)  # another build may have written it meanwhile
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
