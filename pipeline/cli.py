"""The edgebuild command line: flags -> BuildSpec -> the same API a Python user calls.

Exit codes: 0 all targets built and within budget · 1 a budget failed (artifacts kept, marked failed)
· 2 bad usage or bad input · 3 a conversion failed · 130 interrupted.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from edgebuild.errors import optional_imports
from edgebuild.pipeline.errors import BadInputError, EdgeBuildError
from edgebuild.pipeline.flags import spec_from_flags  # (tests import it from here too)
from edgebuild.pipeline.summary import print_summary as _print_summary
from edgebuild.specs import OBJECTIVES, PRECISIONS

EXIT_CODES = """\b
Exit codes:
  0    all targets built and within budget
  1    a budget failed (artifacts kept, marked failed in manifest.json)
  2    bad usage or bad input, or a missing optional library (one-line error)
  3    a conversion failed (reported per target), or an internal error
  4    validate --emulate/--device: the emulator or the board is unavailable
  130  interrupted
"""


def _console(file=None):
    from rich.console import Console

    return Console(file=file) if file is not None else Console(stderr=True)


@contextmanager
def _progress(console, quiet: bool, log=None):
    """The build's ``stage`` callable, shown on stderr (pipeline/progress.py): live lines and a trail in a terminal,
    one plain line per stage elsewhere, nothing with --quiet; every stage into the build log."""
    from edgebuild.pipeline.progress import make_progress

    progress = make_progress(console, quiet, log)
    try:
        yield progress.stage
    finally:
        progress.close()


@contextmanager
def _nullcontext():
    yield


@click.group(invoke_without_command=True, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", "-t", multiple=True, help="Target profile(s) to build (repeat or comma-separate; 'all' for the catalogue).")
@click.option("--model", "-m", help="Model: file.onnx, TorchScript .pt, torch.export .pt2, or package.module:attr. Default: the built-in demo.")
@click.option("--weights", help="Weights for a package.module:attr model (.safetensors or a state-dict .pt).")
@click.option("--input-shape", multiple=True, metavar="[NAME:]SHAPE",
              help="Input shape, e.g. 1,3,224,224 (the model's one input, whatever its name) or images:1,3,640,640 "
                   "(by name; repeat for several inputs). Torch models need it; ONNX models with dynamic dimensions too.")
@click.option("--config", "-c", type=click.Path(dir_okay=False), help="Build config (default: ./edgebuild.yaml when present).")
@click.option("--calib", help="Calibration data: image folder, .npy, .npz, or digits[:train|:test].")
@click.option("--eval", "eval_", help="Evaluation data (same kinds). One source alone is split into disjoint parts.")
@click.option("--calib-samples", type=int, help="Calibration samples (default: up to 300, fewer for a model with large activations; the manifest says why).")
@click.option("--resize", metavar="H,W", help="Image folders: resize to H,W (default: the model's input size).")
@click.option("--scale", type=float, help="Image folders: multiply pixels by this (default 1/255).")
@click.option("--mean", metavar="M[,M,M]", help="Image folders: subtract per-channel mean (after --scale), e.g. 0.485,0.456,0.406.")
@click.option("--std", metavar="S[,S,S]", help="Image folders: divide by per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--color", type=click.Choice(["rgb", "bgr", "gray"]), help="Image folders: channel order (default rgb).")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Image folders: tensor layout of the samples (default NCHW).")
@click.option("--crop", type=click.FloatRange(0, 1, min_open=True), help="Image folders: centre crop this fraction of the shorter side before resizing, e.g. 0.875.")
@click.option("--interpolation", type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]), help="Image folders: resize filter (default bicubic).")
@click.option("--out", "-o", help="Output directory (default: out), replaced atomically.")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Override the profiles' precision.")
@click.option("--objective", type=click.Choice(OBJECTIVES), help="What ships, for every target (default: each profile's; precision: the profile's precision unless slower than FP32 on a host-is-device profile; latency; size; accuracy).")
@click.option("--max-accuracy-drop", type=float, help="Budget: accuracy drop vs FP32 in points.")
@click.option("--max-latency-ms", type=float, help="Budget: p50 latency at batch 1 in ms.")
@click.option("--max-size-mb", type=float, help="Budget: artifact size in MB.")
@click.option("--max-compression-drop", type=float, help="Budget: FP32 accuracy the compression steps may cost, in points (default 1.0).")
@click.option("--profile", type=click.Path(dir_okay=False), multiple=True, help="Extra target profile YAML file(s).")
@click.option("--compress", "compress_steps", multiple=True, metavar="KIND[:k=v,...]",
              help="Compression step before export, in order, e.g. prune:method=structured,ratio=0.5 · lowrank:energy=0.9 · distill:epochs=5 (torch models).")
@click.option("--train", help="Training data for fine-tuning/distillation (same kinds as --calib; must not overlap --eval).")
@click.option("--no-auto", is_flag=True, help="Build the first INT8 configuration only (no accuracy search).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the stage cache.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None, metavar="N",
              help="Targets converted at once (default: the host's cores, fewer when memory is short); timing runs one target at a time.")
@click.option("--max-memory-gb", type=click.FloatRange(min=0, min_open=True), default=None, metavar="GB",
              help="What the conversions running at once may use, by their estimated peaks (default: the available "
                   "memory less 1 GB); fewer run at once when more would pass it.")
@click.option("--trust-model", is_flag=True, help="Load a .pt2 archive even if it could run code when loaded (pickles beyond tensors, guard code, compiled code). Only for files you trust.")
@click.option("--json", "as_json", is_flag=True, help="Print manifest.json to stdout (for CI).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr (errors and the summary still print).")
@click.option("--verbose", "-v", is_flag=True, help="Also echo debug lines and the converters' own output to stderr (always in <out>/build.log).")
@click.version_option(package_name="edgebuild", prog_name="edgebuild", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx, as_json, quiet, verbose, config, eval_, jobs, max_memory_gb, **flags):
    """edgebuild: turn a trained model into validated edge artifacts.

    \b
      edgebuild --target arm64                  demo (or ./edgebuild.yaml) for 64-bit ARM boards
      edgebuild --target x86 --model m.onnx --calib data/calib --eval data/val
      edgebuild targets                         the target profile catalogue
      edgebuild validate out/arm64 --eval data/val
    """
    if ctx.invoked_subcommand is not None:
        return
    from edgebuild.pipeline.build import build

    from edgebuild.pipeline.buildlog import build_log, keep

    spec, config_path = spec_from_flags(config, eval=eval_, **flags)
    with build_log(Path(spec.out), verbose) as (log, terminal):  # stdout/stderr of the build -> <out>/build.log
        console = _console(terminal)
        if spec.is_demo:
            console.print("[dim]no model given: building the built-in demo (DigitsCNN on scikit-learn digits)[/dim]")
        elif config_path:
            console.print(f"[dim]config: {config_path}[/dim]")
        with _progress(console, quiet, log) as stage:
            result = build(spec, stage=stage, jobs=jobs, max_memory_gb=max_memory_gb)
    keep(log, result)
    if as_json:
        from edgebuild.pipeline import manifest as manifest_file

        click.echo(manifest_file.dumps(result.manifest))
    else:
        _print_summary(result.typed, result.out)
    result.raise_for_verdict()


@cli.command()
@click.option("--profile", type=click.Path(dir_okay=False), multiple=True, help="Extra target profile YAML file(s).")
def targets(profile):
    """List the target profiles (one line each)."""
    from edgebuild.targets.profiles import catalogue

    for p in catalogue(tuple(profile)).values():
        first = p.description.strip().splitlines()[0]
        click.echo(f"{p.name:<16} {p.backend:<9} {p.precision:<7} {first}")


@cli.command("setup-emulator")
def setup_emulator():
    """Make the emulated aarch64 board for `validate --emulate`: an arm64 Debian root with Python and the aarch64
    numpy and LiteRT of this install's versions, run under qemu-user. The first run needs root and downloads ~150 MB
    (Debian, PyPI); later runs are instant and offline. Where: $EDGEBUILD_ARM64_ROOT (default
    ~/.cache/edgebuild/arm64-root)."""
    import subprocess
    from importlib import metadata, resources

    from edgebuild.errors import MissingToolError

    versions = {}
    for dist, module in (("numpy", "numpy"), ("ai-edge-litert", "ai_edge_litert")):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            raise MissingToolError("", module, "setup-emulator (the aarch64 wheels match the installed ones)") from None
    script = resources.files("edgebuild.pipeline.assets").joinpath("setup_arm64_emulator.sh")
    env = {**os.environ, "PYTHON": sys.executable, "NUMPY_VERSION": versions["numpy"],
           "LITERT_VERSION": versions["ai-edge-litert"]}
    with resources.as_file(script) as path:
        code = subprocess.run(["bash", str(path)], env=env).returncode
    if code == 2:
        raise BadInputError("setup-emulator: see the line above (it needs root, and qemu-user-static and debootstrap "
                            "or apt-get)")
    if code != 0:
        from edgebuild.pipeline.device import DeviceError

        raise DeviceError(f"setup-emulator: failed (exit {code}); the lines above say where")


@cli.command("validate")
@click.argument("artifact_dir", type=click.Path(file_okay=False))
@click.option("--eval", "eval_", help="Evaluation data (image folder, .npy, .npz, digits...). Default: the build's own.")
@click.option("--emulate", is_flag=True, help="Run it on the aarch64 LiteRT under qemu-user (set up once with `edgebuild setup-emulator`).")
@click.option("--device", metavar="ssh://[user@]host[:port]", help="Run it on a board over SSH (?python=PATH, &arch=any).")
@click.option("--outputs", "outputs_file", metavar="FILE.npz",
              help="Judge outputs computed elsewhere (keyed by output name, sample-major, on the build's "
                   "reference/feeds.npz) against the FP32 outputs the build saved; runs nothing.")
@click.option("--evaluator", metavar="PKG.MOD:FN", help="Your evaluator, when the build used one (imported from your "
              "installation or the current directory; never the one an artifact's metadata names).")
@click.option("--json", "as_json", is_flag=True, help="Print the validation result as JSON.")
def validate_cmd(artifact_dir, eval_, emulate, device, outputs_file, evaluator, as_json):
    """Re-check an existing artifact directory (e.g. out/arm64) on evaluation data: on this host, under the
    aarch64 emulator (--emulate) or on the board itself (--device); or judge outputs produced elsewhere against
    the reference the build saved (--outputs: exit 0 pass, 1 fail, 2 a file that does not fit). Exit 4:
    emulator or board unavailable."""
    if sum(map(bool, (emulate, device, outputs_file))) > 1:
        raise BadInputError("--emulate, --device and --outputs: choose one")
    if outputs_file and eval_:
        raise BadInputError("--outputs are judged on the build's own evaluation data (reference/feeds.npz): drop --eval")
    if outputs_file:
        from edgebuild.pipeline.revalidate import validate_outputs

        def run(directory, _eval, evaluator):
            return validate_outputs(directory, outputs_file, evaluator)
    elif emulate:
        from edgebuild.pipeline.emulate import validate_emulated as run
    elif device:
        from functools import partial

        from edgebuild.pipeline.device import validate_on_device

        run = partial(validate_on_device, url=device)
    else:
        from edgebuild.pipeline.revalidate import revalidate as run
    result = run(Path(artifact_dir), eval_, evaluator=evaluator)
    _record(Path(artifact_dir), "emulated" if emulate else "device" if device else "outputs" if outputs_file else "host",
            result)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        from edgebuild.pipeline.revalidate import summary_lines

        click.echo("\n".join(summary_lines(result)))
    from edgebuild.pipeline.results import Verdict

    verdict = Verdict.from_dict(result)
    if not verdict.passed:
        from edgebuild.pipeline.errors import BudgetError

        raise BudgetError(f"{result['target']}: " + "; ".join(map(str, verdict.failures)))


@cli.command("batch")
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("--out", "-o", default="batch", show_default=True, help="Output: DIR/<model>/<target>/ per cell, DIR/batch.json, DIR/batch.html.")
@click.option("--address", help="Ray cluster to run on (host:port or auto; default $RAY_ADDRESS, else a local one).")
@click.option("--no-resume", is_flag=True, help="Rebuild every cell (default: skip cells an earlier run finished).")
@click.option("--local", is_flag=True, help="A local process pool instead of Ray (the default when Ray is not installed).")
@click.option("--cpus", type=click.IntRange(min=1), help="CPUs of the local Ray cluster or pool (default: the host's).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def batch_cmd(matrix, out, address, no_resume, local, cpus, quiet):
    """Build a matrix of models x targets (docs: README, Many models); exit with the worst cell (0/1/3, 2 bad matrix)."""
    from edgebuild.pipeline.batch import run_batch

    result = run_batch(matrix, out, address=address, resume=not no_resume, local=local, num_cpus=cpus,
                       console=_console(), quiet=quiet)
    click.echo(f"batch: exit {result.exit_code} · {out}/batch.json · {out}/batch.html")
    result.raise_for_exit()


def _record(artifact_dir: Path, where: str, result: dict) -> None:
    """The re-check's result beside the artifact (``validation_<host|emulated|device|outputs>.json``), written atomically."""
    import tempfile

    path, tmp = artifact_dir / f"validation_{where}.json", None
    try:  # mkstemp: O_EXCL | O_NOFOLLOW under a fresh name, never through a planted file or symlink
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=artifact_dir)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(result, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise BadInputError(f"{artifact_dir}: cannot write {path.name} ({e.strerror or e})") from None


def main(argv=None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        from edgebuild.procs import safe_signal_stack, terminate_as_interrupt

        safe_signal_stack()  # SIGTERM/Ctrl-C must reach the handler, not die on a dangling alternate stack (procs)
        signal.signal(signal.SIGTERM, terminate_as_interrupt)  # SIGTERM = Ctrl-C: clean up, exit 130
        signal.signal(signal.SIGINT, terminate_as_interrupt)  # Ctrl-C also kills every target's child at once
    from edgebuild.pipeline.offline import no_telemetry

    no_telemetry()
    try:
        with optional_imports():  # torch, scikit-learn, a backend's library missing: one line naming the extra
            cli.main(args=argv, prog_name="edgebuild", standalone_mode=False)
        return 0
    except EdgeBuildError as e:
        click.echo(f"edgebuild: error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("edgebuild: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("edgebuild: interrupted", err=True)
        return 130
    except click.exceptions.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except Exception:  # a bug, not a user error: keep the traceback, and never exit 0 or 1 ("budget failed")
        import traceback

        traceback.print_exc()
        click.echo("edgebuild: internal error (the traceback above is a bug report); exit 3", err=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
