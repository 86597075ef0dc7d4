"""The TFLite converter child and its siblings: one onnx2tf/TensorFlow run, several ``.tflite`` precisions.

``convert_job(JOB_DIR)``, run in a converter child by ``run_child`` (targets/isolated.py), runs
``targets/tflite/convert.py``'s conversion of ``job.json`` unchanged. When the job names ``siblings``
(``{"fp32": {"settings": {...}}}``), each sibling precision is converted from the very same Keras graph
(onnx2tf's output, already checked against the ONNX model) just before the job's own precision, and written to
``JOB_DIR/siblings/<precision>/model.tflite`` with its ``result.json``: the build's FP32 baseline no longer
starts TensorFlow and onnx2tf a second time. A sibling that fails is reported in its own result (the parent
then converts it on its own); it never fails the job's own conversion.

The sibling hooks into ``convert._convert_checked`` (the one step that turns the Keras graph into a
checked ``.tflite``) through a declared patch (``with_siblings``) applied for the job only, in this child process,
so the conversion itself stays the one of convert.py.

Memory: before the first conversion the calibration arrays go to disk (``_calibration_to_disk``: read back one
sample at a time), and what a sibling's conversion freed is given back to the system before the next one; the
child's peak is TensorFlow's converter on top of TensorFlow itself, not the calibration set.

Parent side: ``run_child`` runs it through ``run_isolated`` (targets/isolated.py: its own process group, a time
limit, output to ``JOB_DIR/convert.log``, progress to ``JOB_DIR/phase``), which turns a crash or a timeout into a
ConversionError naming the phase; a failed conversion is one naming the converter's error.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

from edgebuild.errors import ConversionError
from edgebuild.procs import Patch
from edgebuild.targets.isolated import log_hint

SIBLING_KEYS_DROPPED = ("float_layer_map", "transformer_float_map", "tail_float_map", "front_float_map", "auto_float_ops", "quantizer_used", "graph")  # what the job's INT8 conversion adds


def sibling_dir(job_dir: Path, precision: str) -> Path:
    return job_dir / "siblings" / precision


def _convert_sibling(convert_checked, km, job: dict, calib: dict, job_dir: Path, precision: str, settings: dict,
                     phase) -> None:
    out = sibling_dir(job_dir, precision)
    out.mkdir(parents=True, exist_ok=True)
    sib = {k: v for k, v in job.items() if k not in SIBLING_KEYS_DROPPED}
    sib.update(precision=precision, settings=settings, allow_float_layers=False)
    try:
        described, _, repairs = convert_checked(km, sib, calib, out, lambda p: phase(f"{precision} sibling: {p}"))
        described["float_ops"] = [op["op"] for op in described["float_ops"]]
        result = {"ok": True, "repairs": repairs, "xnnpack_checked": settings.get("host_kernels", "xnnpack") == "xnnpack",
                  **job.get("graph", {}), **described}  # the graph facts: usable even when the job's own model fails
    except Exception as e:  # noqa: BLE001 — the sibling is optional: the parent converts it on its own
        result = {"ok": False, "message": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                  "traceback": traceback.format_exc(limit=6)}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))


def with_siblings(job_dir: Path, siblings: dict) -> Patch:
    """The patch (applied by ``convert_job``, edgebuild.procs.patched) that makes convert.py convert ``siblings``
    from the job's Keras graph before the job's own precision, with the calibration data on disk
    (``_calibration_to_disk``)."""
    from edgebuild.targets.isolated import fault

    done: set[str] = set()

    def hooked(real):
        def convert_checked(km, job, calib, out_dir, phase):
            if not done:  # the first time: the calibration data goes to disk (the ONNX checks that needed it are done)
                done.add("")
                _calibration_to_disk(calib, job_dir)
                _release_memory()  # onnx2tf's and the ONNX check's garbage
            for precision, spec in siblings.items():
                if precision not in done:  # once, not again on a repair round of the job's own conversion
                    done.add(precision)
                    _convert_sibling(real, km, job, calib, job_dir, precision, spec["settings"], phase)
                    _release_memory()
            if job["precision"] == "int8":
                fault("convert:tflite-int8")  # tests: the job's own INT8 model crashes after its siblings were made
            return real(km, job, calib, out_dir, phase)
        return convert_checked

    return Patch("edgebuild.targets.tflite.convert", "_convert_checked", wrap=hooked,
                 why="the float siblings are converted from the job's own Keras graph")


class _DiskRows:
    """A calibration array on disk, read one indexing at a time (a memory map opened and closed per access, so
    the pages read do not stay in this process's memory): what the converter needs of an array (``len``,
    ``shape``, ``ndim``, ``dtype``, indexing)."""

    def __init__(self, path: Path, like):
        self.path, self.shape, self.dtype, self.ndim = path, like.shape, like.dtype, like.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        import numpy as np

        m = np.load(self.path, mmap_mode="r")
        try:
            return np.array(m[index])
        finally:
            m._mmap.close()


def _calibration_to_disk(calib: dict, job_dir: Path) -> None:
    """Swap the calibration arrays, in place, for readers of the same data on disk: while a float sibling is
    converted (TensorFlow's converter peaks at ~600 MB above its start on MobileNetV2) and while the INT8 model
    is calibrated sample by sample, the 300 MobileNetV2 samples (180 MB) take no memory."""
    import numpy as np

    for i, (name, array) in enumerate(list(calib.items())):
        if not isinstance(array, np.ndarray) or array.nbytes < (16 << 20):
            continue
        path = job_dir / f"calib-{i}.npy"
        np.save(path, array)
        calib[name] = _DiskRows(path, array)


def _release_memory() -> None:
    """Give what a finished conversion freed back to the system (glibc keeps freed heap otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sibling_results(job_dir: Path) -> dict[str, dict]:
    """``{precision: result}`` of the siblings the child converted (ok or not)."""
    out = {}
    for result in sorted((job_dir / "siblings").glob("*/result.json")):
        try:
            out[result.parent.name] = json.loads(result.read_text())
        except ValueError:
            continue
    return out


CHILD_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1", "PYTHONWARNINGS": "ignore"}


def run_child(job_dir: Path, what: str, timeout: float) -> dict:
    """The conversion of ``job_dir`` in the converter child (targets/isolated.py), its checked result."""
    from edgebuild.targets.isolated import run_isolated

    log = job_dir / "convert.log"
    result = run_isolated(convert_job, str(job_dir), timeout, what=what, name="convert:tflite", log=log,
                          phase=job_dir / "phase", cwd=job_dir, env=CHILD_ENV,
                          hint=" (raise the profile's quant.timeout_s)", echo=True)  # onnx2tf's and TF's output -> build.log
    return _checked(result, what, log)


def _checked(result: dict, what: str, log: Path) -> dict:
    if not result["ok"]:
        op = f" [unsupported op: {result['op']}]" if result.get("op") else ""
        hint = log_hint(log) if "see the converter log" in result["message"] else ""
        err = ConversionError(f"{what} conversion failed: {result['message']}{op}{hint}")
        err.unsupported_op = result.get("op")
        raise err
    return result


def convert_job(job_dir: str) -> dict:
    """In the converter child: no network, the siblings hooked in, then convert.py's conversion of the job."""
    from edgebuild.procs import patched
    from edgebuild.targets.tflite import convert as tc
    from edgebuild.targets.tflite.onnx2tf_run import NO_NETWORK

    path = Path(job_dir)
    siblings = json.loads((path / "job.json").read_text()).get("siblings") or {}
    with patched([*NO_NETWORK, with_siblings(path, siblings)]):  # restored when the job ends
        return tc.run(path)
