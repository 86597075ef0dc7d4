"""`edgebuild validate DIR --device ssh://user@host[:port]`: run an artifact on the board itself, judge it at home.

The artifact's files, the evaluation feeds (``feeds.npz``) and a self-contained runner
(``pipeline/assets/device_runner.py``: numpy + the artifact's runtime, never edgebuild) are copied to a fresh
directory on the board with the system ``scp``; the runner writes the outputs and its timing of the runtime's
invoke; they come back and are judged against the build's FP32 reference and budgets by the same code as any
validation (``revalidate.judged``). Device latency is reported as such.

Before anything is copied, one ``ssh`` call reads the board's architecture and which runtimes its Python can
import: an unreachable host, a wrong architecture or a missing runtime is one line and exit 4 (``DeviceError``).
SSH runs with ``BatchMode=yes`` (no password prompts) and ``ConnectTimeout``; ``$EDGEBUILD_SSH_CONFIG`` is passed
as ``ssh -F`` (identity, known hosts, jump hosts). URL options: ``?python=/path/to/python`` (default
``python3``), ``&arch=any`` (or a machine name) to accept a board of another architecture than the target's.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from edgebuild.pipeline import timing
from edgebuild.pipeline.errors import BadInputError, ConversionError, EdgeBuildError
from edgebuild.procs import tempdir

RUNNER = Path(__file__).parent / "assets" / "device_runner.py"
CONNECT_TIMEOUT_S = 10
RUN_TIMEOUT_S = 600


def machines(target: str) -> tuple[str, ...]:
    """The machines (``uname -m``) the target's boards have (its profile's ``machines``); () = any machine with the
    runtime (also for a target whose profile is not in the catalogue)."""
    from edgebuild.targets.profiles import catalogue

    profile = catalogue().get(target)
    return profile.machines if profile is not None else ()


def device_runtimes() -> dict[str, tuple[str, ...]]:
    """Backend -> the runtimes a board's Python may run its artifacts with (BackendInfo.device_runtimes)."""
    from edgebuild.targets.base import all_infos

    return {i.name: i.device_runtimes for i in all_infos() if i.device_runtimes}


class DeviceError(EdgeBuildError):
    """The board or the emulator cannot run the check (unreachable, wrong architecture, no runtime, not set up): exit 4."""

    exit_code = 4


@dataclass(frozen=True)
class Board:
    user: str | None
    host: str
    port: int | None
    python: str = "python3"
    arch: str | None = None  # accepted machine ("any": every one); None: the target's

    @classmethod
    def parse(cls, url: str) -> "Board":
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # "Invalid IPv6 URL", a port out of range
            parts, port = urlsplit("invalid:"), -1
        if parts.scheme != "ssh" or not parts.hostname or port == -1 or parts.path not in ("", "/"):
            raise BadInputError(f"--device {url!r}: expected ssh://[user@]host[:port][?python=PATH&arch=any]")
        for part in (parts.username or "", parts.hostname):  # "-oProxyCommand=…" would be an ssh option: it runs code
            if part.startswith("-") or any(c.isspace() or ord(c) < 32 or c in "'\"`$;|&<>\\" for c in part):
                raise BadInputError(f"--device {url!r}: user and host must not start with '-' or hold spaces, quotes "
                                    "or shell characters")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"python", "arch"}
        if unknown:
            raise BadInputError(f"--device {url!r}: unknown option {sorted(unknown)[0]!r} (python, arch)")
        return cls(parts.username, parts.hostname, port, query.get("python", "python3"), query.get("arch"))

    @property
    def name(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"

    def _opts(self) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}", "-o", "LogLevel=ERROR"]
        if os.environ.get("EDGEBUILD_SSH_CONFIG"):
            opts += ["-F", os.environ["EDGEBUILD_SSH_CONFIG"]]
        return opts

    def _dest(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def ssh(self, command: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        argv = ["ssh", *self._opts(), *(["-p", str(self.port)] if self.port else []), "--", self._dest(), command]
        return _call(argv, timeout, self)

    def scp(self, sources: list[str], dest: str, timeout: float = RUN_TIMEOUT_S) -> None:
        argv = ["scp", "-q", "-r", *self._opts(), *(["-P", str(self.port)] if self.port else []), "--", *sources, dest]
        done = _call(argv, timeout, self)
        if done.returncode != 0:
            raise DeviceError(f"{self.name}: copying failed: {_last_line(done.stderr)}")

    def remote(self, path: str) -> str:
        return f"{self._dest()}:{path}"


def _call(argv: list[str], timeout: float, board: Board) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise DeviceError(f"--device needs the OpenSSH client ({argv[0]} is not installed)") from None
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{board.name}: {argv[0]} did not finish within {timeout:.0f} s") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no message)"


def probe(board: Board, target: str, backend: str) -> dict:
    """One ssh call: the board's ``uname -m`` and the runtimes its Python imports; raises DeviceError if unfit."""
    known = device_runtimes()
    if backend not in known:
        raise BadInputError(f"target {target}: --device runs {', '.join(sorted(known))} artifacts, not {backend} "
                            f"(TensorRT engines are built on the board: see build_engine.sh)")
    names = sorted({n for v in known.values() for n in v} | {"numpy"})
    code = f"import importlib.util as u, json; print(json.dumps({{n: u.find_spec(n) is not None for n in {names!r}}}))"
    done = board.ssh(f"uname -m && {shlex.quote(board.python)} -c {shlex.quote(code)}", timeout=CONNECT_TIMEOUT_S + 60)
    if done.returncode == 255:
        raise DeviceError(f"{board.name} is unreachable: {_last_line(done.stderr)}")
    lines = done.stdout.strip().splitlines()
    machine = lines[0].strip() if lines else "?"
    accepted = None if board.arch == "any" else ((board.arch,) if board.arch else machines(target))
    if accepted and machine not in accepted:
        raise DeviceError(f"{board.name} is a {machine} machine; target {target} runs on {'/'.join(accepted)} "
                          f"(add ?arch=any to the URL to run it there anyway)")
    try:
        found = json.loads(lines[1])
    except (IndexError, ValueError):
        raise DeviceError(f"{board.name}: no working Python at {board.python!r} ({_last_line(done.stderr)}); "
                          f"give one with ?python=PATH") from None
    runtimes = [n for n in known[backend] if found.get(n)]
    if not runtimes or not found.get("numpy"):
        missing = "numpy" if runtimes else " or ".join(known[backend])
        raise DeviceError(f"{board.name}: the runtime is missing: {board.python} cannot import {missing} "
                          f"(install it on the board, e.g. pip install {missing.split(' or ')[0].replace('_', '-')})")
    return {"machine": machine, "runtimes": runtimes}


def write_job(loaded, job_dir: Path, timed: bool) -> None:
    """``job_dir``: the artifact's files, feeds.npz, job.json and the runner, as the runner expects them."""
    import shutil

    evalset, meta = loaded.evalset, loaded.meta
    names = [i["name"] for i in meta["source_inputs"]]
    feeds = [evalset.feed(i) for i in range(len(evalset))]
    np.savez(job_dir / "feeds.npz", **{f"x{k}": np.stack([np.asarray(f[n]) for f in feeds]) for k, n in enumerate(names)})
    for name in meta["files"]:
        shutil.copy2(loaded.artifact.directory / name, job_dir / name)
    shutil.copy2(RUNNER, job_dir / RUNNER.name)
    job = {"backend": meta["backend"], "artifact": meta["artifact"], "io": meta["io"], "inputs": names,
           "samples": len(evalset), "threads": meta["runtime"]["threads"],
           "compile_config": ((meta.get("settings") or {}).get("applied") or {}).get("compile_config"),
           "timing": {"warmup": timing.WARMUP, "runs": timing.MAX_RUNS if timed else 0, "budget_s": timing.TIME_BUDGET_S}}
    if evalset.closed_loop:  # a stateful model: the runner feeds back the artifact's own state (closed_loop.py)
        job["state"] = [[link.index, link.input] for link in evalset.state]
        job["runs"] = [list(r) for r in evalset.runs()]
    (job_dir / "job.json").write_text(json.dumps(job))


RESULT_FIELDS = {"times_ms": list, "warmup": int, "machine": str, "python": str, "runtime": str,
                 "runtime_version": str, "load_s": (int, float)}


def read_results(job_dir: Path, n_samples: int) -> tuple[list, dict]:
    """The runner's outputs (per sample, per output) and its result record, checked as data from elsewhere: what a
    board sends back (garbage JSON, object arrays, missing fields) is one ``BadInputError`` line, never unpickled."""
    from edgebuild.calibration.npy import read_npz

    try:
        result = json.loads((job_dir / "result.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise BadInputError(f"the device runner's result.json is unreadable ({type(e).__name__}): not what "
                            "edgebuild's runner writes") from None
    bad = [k for k, t in RESULT_FIELDS.items() if not isinstance(result, dict) or not isinstance(result.get(k), t)
           or isinstance(result.get(k), bool)]
    if bad or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in result["times_ms"]):
        raise BadInputError(f"the device runner's result.json lacks or garbles {(bad or ['times_ms'])[0]!r}: not what "
                            "edgebuild's runner writes")
    found = read_npz(job_dir / "outputs.npz", "outputs archive from the device runner")
    arrays = [found.get(f"y{j}") for j in range(len(found))]
    if not arrays or any(a is None or a.dtype.kind not in "biuf" or a.ndim == 0 for a in arrays):
        raise BadInputError("the device runner's outputs.npz does not hold numeric arrays y0, y1, ...: not what "
                            "edgebuild's runner writes")
    if any(len(a) != n_samples for a in arrays):
        raise ConversionError(f"the device runner returned {len(arrays[0])} results for {n_samples} samples")
    return [[a[i] for a in arrays] for i in range(n_samples)], result


def runner_failed(where: str, rc: int, stderr: str) -> EdgeBuildError:
    if rc == 255:  # ssh's own failure: the connection, not the runner
        return DeviceError(f"{where} is unreachable: {_last_line(stderr)}")
    if rc == 4:
        return DeviceError(f"{where}: {_last_line(stderr)}")
    return ConversionError(f"{where}: the runtime failed on the artifact (exit {rc}): {_last_line(stderr)}")


def validate_on_device(artifact_dir: Path, eval_source: str, url: str, evaluator: str | None = None) -> dict:
    from edgebuild.pipeline.revalidate import judged, load

    board = Board.parse(url)
    if not (artifact_dir / "metadata.json").is_file():
        raise BadInputError(f"{artifact_dir}: no metadata.json (is it a target directory of an edgebuild output?)")
    meta = json.loads((artifact_dir / "metadata.json").read_text())
    found = probe(board, meta.get("target", "?"), meta.get("backend", "?"))
    loaded = load(artifact_dir, eval_source, evaluator)
    with tempfile.TemporaryDirectory(prefix="edgebuild-device-", dir=tempdir()) as tmp:
        job = Path(tmp) / "job"
        job.mkdir()
        write_job(loaded, job, timed=True)
        made = board.ssh("mktemp -d -t edgebuild.XXXXXX", timeout=CONNECT_TIMEOUT_S + 30)
        remote = made.stdout.strip()
        if made.returncode != 0 or not remote.startswith("/"):
            raise DeviceError(f"{board.name}: cannot make a working directory: {_last_line(made.stderr)}")
        try:
            board.scp([str(p) for p in sorted(job.iterdir())], board.remote(remote + "/"))
            done = board.ssh(f"cd {shlex.quote(remote)} && {shlex.quote(board.python)} {RUNNER.name} .")
            if done.returncode != 0:
                raise runner_failed(board.name, done.returncode, done.stderr)
            back = Path(tmp) / "back"
            back.mkdir()
            board.scp([board.remote(f"{remote}/outputs.npz"), board.remote(f"{remote}/result.json")], str(back))
        finally:
            board.ssh(f"rm -rf {shlex.quote(remote)}", timeout=CONNECT_TIMEOUT_S + 30)
        outputs, result = read_results(back, len(loaded.evalset))
    lat = {**timing._percentiles(result["times_ms"]), "warmup": result["warmup"],
           "threads_used": loaded.meta["runtime"]["threads"], "measured_on": f"{board.name} ({result['machine']})"}
    device = {"host": board.name, "machine": result["machine"], "python": result["python"],
              "runtime": f"{result['runtime']} {result['runtime_version']}", "load_s": round(result["load_s"], 3),
              "runtimes_found": found["runtimes"]}
    return judged(loaded, outputs, lat, device=device)
