"""The TFLite conversion proper, run in a child process by ``targets/tflite/backend.py``.

    python -m edgebuild.targets.tflite.convert JOB_DIR

``JOB_DIR/job.json`` says what to build, ``JOB_DIR/calib.npz`` holds the calibration feeds: per input, the
feeds ``SampleSet.feed(i)`` made, stacked on a new leading axis (``calib[name][i]`` has exactly the ONNX
input's shape and dtype: 0-d scalars, batch on any axis, integer ids).
Before onnx2tf, targets/tflite/rewrite/ rewrites what onnx2tf or INT8 cannot handle (MaxPool padding, Erf,
Sum); every artifact is then loaded with XNNPACK and run once (``xnnpack_check``). The child writes ``JOB_DIR/model.tflite`` and ``JOB_DIR/result.json``
(the artifact's real I/O, the ops it uses, or the error), and its progress to ``JOB_DIR/phase`` so that a
crash of the native converter (the TF calibrator segfaults on some graphs) can be reported by phase.

The path, chosen by measurement (see tests/targets/test_tflite_coverage.py): onnx2tf turns the FP32 ONNX
into a TF/Keras graph in NHWC (targets/tflite/onnx2tf_run.py: offline, options, checked against onnxruntime), and
TensorFlow's ``TFLiteConverter`` writes FP32, FP16, dynamic-range or full-integer INT8 (calibrated on our
samples).

``settings.float_layers`` (ONNX node names): onnx2tf's ONNX tensor -> Keras tensor map gives each node's Keras
layers, TFLite names every op's output after the layers fused into it, and the MLIR quantizer leaves the ops
on its deny list in float (selective quantization, as tf.lite.experimental.QuantizationDebugger does).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from edgebuild.procs import patched
from edgebuild.targets.tflite.onnx2tf_run import (  # noqa: F401 — CHANNEL_LAST, block_network: this module's API
    CHANNEL_LAST, NetworkBlocked, adopt_input_layouts, block_network, check_float_graph, explain, to_keras,
    to_tf_layout)
from edgebuild.targets.tflite.describe import describe_tflite
from edgebuild.targets.tflite.mixed import (AUTO_FLOAT, FRONT_FLOAT, TAIL_FLOAT, ConversionFailure, check_integer,
                                            computed_int8_divisions, float_layer_map, region_layers, selective_int8)
from edgebuild.targets.tflite.ranges import exact_ranges
from edgebuild.targets.tflite.tail import frontend_nodes, tail_nodes
from edgebuild.targets.tflite.transformer import float_nodes


def _phase(job_dir: Path, text: str) -> None:
    (job_dir / "phase").write_text(text)


RNN_OPS = ("LSTM", "GRU", "RNN")


def pick_quantizer(setting: str, onnx_path: str) -> str:
    """``auto``: TF's legacy quantizer for recurrent graphs, the MLIR quantizer otherwise.

    Measured: on an unrolled LSTM the MLIR quantizer leaves the gate SPLITs in float in about half of the
    runs of the very same inputs (it is not deterministic there); the legacy one was full-integer and
    byte-identical every time. On everything else the MLIR quantizer is deterministic and a little smaller.
    """
    if setting != "auto":
        return setting
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    return "legacy" if any(n.op_type in RNN_OPS for n in graph.node) else "mlir"


def _tflite_bytes(km, precision: str, settings: dict, calib: dict, job: dict) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(km)
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: weight-only int8
    elif precision == "int8":
        keys = dict(zip([i["name"] for i in job["inputs"]], km.input_names))
        n = len(next(iter(calib.values())))  # the parent sent exactly the samples to calibrate on

        def representative_dataset():
            for s in range(n):
                yield {keys[i["name"]]: to_tf_layout(calib[i["name"]][s], i.get("perm")) for i in job["inputs"]}

        io_type = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[settings.get("io_dtype", "float32")]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # full integer or fail
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
        converter._experimental_disable_per_channel = not settings.get("per_channel", True)
        converter.experimental_new_quantizer = job["quantizer_used"] == "mlir"
        if converter.experimental_new_quantizer:  # calibration ranges without buffer sharing (targets/tflite/ranges.py)
            job["ranges_repaired"] = []
            # this job's calibrations by float model: a repair's reconversion reuses the first one's (ranges.py)
            with patched([exact_ranges(job["ranges_repaired"], job.setdefault("calibrations", {}),
                                       settings.get("calibrate_method", "minmax"), settings.get("percentile", 99.999),
                                       one_sample=not job.get("onnx") or pick_quantizer("auto", job["onnx"]) == "mlir")]):
                if _selective(job):
                    return selective_int8(converter, km, job, io_type)
                return converter.convert()
        if _selective(job):
            return selective_int8(converter, km, job, io_type)
    elif precision != "fp32":
        raise ConversionFailure("tflite converter", f"unknown precision {precision}")
    return converter.convert()


def _selective(job: dict) -> bool:
    """Does the INT8 conversion keep some ops float (the MLIR quantizer's deny list, targets/tflite/mixed.py)?"""
    return any(job.get(k) for k in ("float_layer_map", "auto_float_ops", "transformer_float_map", "tail_float_map",
                                    "front_float_map"))


def run(job_dir: Path) -> dict:
    """Convert as ``job.json`` says; returns (and writes) result.json's content."""
    job = json.loads((job_dir / "job.json").read_text())
    with np.load(job_dir / "calib.npz", allow_pickle=False) as z:
        calib = {k: z[k] for k in z.files}
    phase = "onnx2tf"
    try:
        _phase(job_dir, phase)
        km, tensors = to_keras(job["onnx"], job, calib, job_dir)
        in_perms = adopt_input_layouts(km, job)  # the layout onnx2tf gave each input, fed from here on
        float_layers = [str(n) for n in job["settings"].get("float_layers") or []] if job["precision"] == "int8" else []
        if float_layers:
            job["float_layer_map"] = float_layer_map(km, tensors, job["onnx"], float_layers)
        transformer = [n for n in float_nodes(job["onnx"]) if n not in float_layers] \
            if job["precision"] == "int8" and job.get("allow_float_layers") and job["settings"].get("transformer_float") else []
        if transformer:  # LayerNorm, Softmax, GELU of a graph with attention (targets/tflite/transformer.py)
            job["transformer_float_map"] = float_layer_map(km, tensors, job["onnx"], transformer)
        regions = job["precision"] == "int8" and job.get("allow_float_layers")
        tail = tail_nodes(job["onnx"]) if regions and job["settings"].get("float_tail", True) else []
        if tail:  # a detector's decode / output-activation tail (targets/tflite/tail.py)
            job["tail_float_map"] = {TAIL_FLOAT: region_layers(km, tensors, tail)}
        front = frontend_nodes(job["onnx"]) if regions and job["settings"].get("float_frontend", True) else []
        if front:  # a spectrogram built from ops (targets/tflite/tail.py)
            job["front_float_map"] = {FRONT_FLOAT: region_layers(km, tensors, front)}
        phase = "FP32 graph check"
        _phase(job_dir, phase)
        out_perms, check = check_float_graph(km, job, calib)
        job["graph"] = {"keras_inputs": list(km.input_names), "keras_outputs": list(km.output_names),
                        "input_perms": in_perms, "output_perms": out_perms, "fp32_graph_check": check, "rewrites": job.get("rewrites") or []}
        phase = "tflite converter" if job["precision"] != "int8" else "tflite converter (INT8 calibration)"
        _phase(job_dir, phase)
        # keeping layers in float needs the MLIR quantizer's deny list; histogram calibration its ranges hook (ranges.py)
        histogram = job["settings"].get("calibrate_method", "minmax") != "minmax"
        job["quantizer_used"] = "mlir" if float_layers or transformer or tail or front or histogram \
            else pick_quantizer(job["settings"].get("quantizer", "auto"), job["onnx"])
        with keras_saved_once(km, job_dir / "keras_savedmodel"):  # every conversion below reads one SavedModel
            described, kept, repairs = _convert_checked(km, job, calib, job_dir, lambda p: _phase(job_dir, p))
        described["float_ops"] = [op["op"] for op in described["float_ops"]]
        result = {"ok": True, "keras_inputs": list(km.input_names), "keras_outputs": list(km.output_names),
                  "quantizer_used": job["quantizer_used"] if job["precision"] == "int8" else None,
                  "input_perms": in_perms, "output_perms": out_perms, "fp32_graph_check": check, "rewrites": job.get("rewrites") or [],
                  "repairs": repairs, "xnnpack_checked": _xnnpack_on(job), **described, **kept,
                  "ranges_repaired": job.get("ranges_repaired")}
    except (Exception, SystemExit) as e:  # onnx2tf calls sys.exit() on some errors
        result = {"ok": False, "phase": phase, **explain(e, phase, job["onnx"], job_dir / "convert.log"),
                  "traceback": traceback.format_exc(limit=8)}
    finally:
        _release_tf()
    (job_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result


# TFLite ops with no int8 kernel -> the ONNX op they come from (for the error of an integer-only profile)
ONNX_OF = {"LOCAL_RESPONSE_NORMALIZATION": "LRN", "ADD_N": "Sum", "POW": "Pow", "EXP": "Exp", "LOG": "Log",
           "SQRT": "Sqrt", "RSQRT": "Sqrt/Div", "DIV": "Div", "CUMSUM": "CumSum"}
MAX_REPAIRS = 2
WEIGHTED_TFLITE_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D", "BATCH_MATMUL",
                       "UNIDIRECTIONAL_SEQUENCE_LSTM", "EMBEDDING_LOOKUP", "GATHER"}


def _xnnpack_on(job: dict) -> bool:
    return job["settings"].get("host_kernels", "xnnpack") == "xnnpack"


def _convert_checked(km, job: dict, calib: dict, job_dir: Path, phase) -> tuple[dict, dict, list[str]]:
    """Convert, read back, check; repair what the profile allows, else fail naming the ops.

    INT8: ops left in float (no int8 kernel, e.g. LOCAL_RESPONSE_NORMALIZATION) stay float when the profile
    allows float layers (the artifact is then ``_int8_mixed``), else the build fails naming them. Every
    artifact of an XNNPACK profile must load and run once in LiteRT with XNNPACK; when it does not, the ops
    whose quantization XNNPACK rejects are kept in float (profiles with float layers) or named in the error.
    """
    from edgebuild.targets.tflite import xnnpack as xnn

    int8, allow = job["precision"] == "int8", bool(job.get("allow_float_layers"))
    path, repairs = job_dir / "model.tflite", []
    for attempt in range(MAX_REPAIRS + 1):
        phase("tflite converter (INT8 calibration)" if int8 else "tflite converter")
        path.write_bytes(_bytes_or_mlir(km, job, calib, repairs))
        phase("reading the model back")
        described = describe_tflite(path)
        kept = {}
        if int8:
            try:
                kept = check_integer(described["float_ops"], job)
            except ConversionFailure as e:
                if e.stage != "full-integer check" or not e.ops:
                    raise
                onnx_ops = sorted({ONNX_OF.get(op["op"], "?") for op in e.ops} - {"?"})
                if not allow:
                    raise ConversionFailure(e.stage, f"{e}: no int8 kernel{' for ONNX ' + ', '.join(onnx_ops) if onnx_ops else ''}, "
                                                     "and this profile runs integer-only (use a profile that allows float "
                                                     "layers, or replace the op in the model)", e.op) from None
                _remember_float(job, e.ops)
                repairs.append(f"kept in float (no int8 kernel): {', '.join(sorted({op['op'] for op in e.ops}))}")
                if attempt < MAX_REPAIRS:
                    continue
                # the last conversion: what it left float is accepted float, as one more repair would keep it (the
                # MLIR quantizer moves an unrolled LSTM's gate SPLITs between runs: another conversion could leave
                # others float, and CI once ended in exit 3 on a SPLIT first left float by the last conversion)
                requested = job.setdefault("float_ops_requested", {})
                requested[AUTO_FLOAT] = [*requested.get(AUTO_FLOAT, []),
                                         *({"op": op["op"], "tensor": t} for op in e.ops for t in op["outputs"])]
                kept = check_integer(described["float_ops"], job)
            divisions = computed_int8_divisions(path) if allow and attempt < MAX_REPAIRS else []
            if divisions:
                _keep_float(job, divisions)
                repairs.append(f"kept in float: {len(divisions)} DIV(s) by a computed divisor (TFLite's int8 DIV "
                               "fails to invoke on a divisor that rounds to zero)")
                continue
        if _xnnpack_on(job):
            phase("XNNPACK load check")
            keys = dict(zip([i["name"] for i in job["inputs"]], km.input_names))
            feed = {i["name"]: calib[i["name"]][0] for i in job["inputs"]}
            perms = {i["name"]: i.get("perm") for i in job["inputs"]}
            error = xnn.load_and_run_isolated(path, feed, keys, perms)  # a crash in LiteRT is an error line here
            if error:
                found = xnn.suspects(path)
                if not found or "crashed" in error:  # a crash, or nothing out of range in the quantization
                    phase("XNNPACK load check: finding the op at fault")  # parameters: cut the graph until it loads
                    first = xnn.bisect(path, feed, keys, perms, job_dir)
                    found = ([first] if first else []) + [f for f in found if first is None or f["outputs"] != first["outputs"]]
                if int8 and allow and found and attempt < MAX_REPAIRS:
                    _keep_float(job, found)
                    repairs.append(f"kept in float for XNNPACK: {xnn.describe(found)}")
                    continue
                named = xnn.describe(found) if found else "no op with out-of-range quantization found"
                raise ConversionFailure(
                    "XNNPACK check", f"LiteRT with XNNPACK cannot run the {job['precision']} model ({error}); ops at fault: "
                    f"{named}. Suggestion: a profile that allows float layers (they are then kept in float), "
                    "precision fp16/fp32, or quant.host_kernels: builtin to build for LiteRT without XNNPACK",
                    found[0]["op"] if found else None)
        described["xnnpack_coverage"] = _coverage(path)
        return described, kept, repairs
    raise AssertionError("unreachable")


def _coverage(path: Path) -> dict | None:
    """XNNPACK's share of the model (targets/tflite/xnnpack.coverage); None when LiteRT cannot say."""
    from edgebuild.targets.tflite import xnnpack as xnn

    try:
        return xnn.coverage(path)
    except (RuntimeError, ValueError, KeyError) as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def _bytes_or_mlir(km, job: dict, calib: dict, repairs: list[str]) -> bytes:
    """The legacy quantizer (chosen for recurrent graphs) raises on an op it has no int8 kernel for (SQRT in an
    STFT magnitude); the MLIR quantizer leaves such ops in float, where the full-integer check finds them
    (kept float where the profile allows float layers, named otherwise)."""
    try:
        return _tflite_bytes(km, job["precision"], job["settings"], calib, job)
    except RuntimeError as e:
        unsupported = re.search(r"Quantization not yet supported for op: '(\w+)'", str(e))
        if job["precision"] != "int8" or job.get("quantizer_used") != "legacy" or not unsupported:
            raise
    job["quantizer_used"] = "mlir"
    repairs.append(f"MLIR quantizer: the legacy quantizer cannot quantize {unsupported.group(1)}")
    return _tflite_bytes(km, job["precision"], job["settings"], calib, job)


def _remember_float(job: dict, ops: list[dict]) -> None:
    """Keep ``ops`` (left float by the quantizer) float in the next conversion. The same type left float again,
    elsewhere, means the quantizer is not deterministic there (unrolled LSTM gate SPLITs): every op of that type stays
    float (targets/tflite/mixed.py ``ops_of_types``), weighted types never (their weights would)."""
    _keep_float(job, ops)
    types = {op["op"] for op in ops}
    again = (types & set(job.get("auto_float_seen", []))) - WEIGHTED_TFLITE_OPS
    job["auto_float_seen"] = sorted({*job.get("auto_float_seen", []), *types})
    if again:
        job["auto_float_types"] = sorted({*job.get("auto_float_types", []), *again})


def _keep_float(job: dict, ops: list[dict]) -> None:
    known = {(op["op"], tuple(op["outputs"])) for op in job.get("auto_float_ops") or []}
    job["auto_float_ops"] = (job.get("auto_float_ops") or []) + [
        {"op": op["op"], "outputs": list(op["outputs"])} for op in ops if (op["op"], tuple(op["outputs"])) not in known]
    job["quantizer_used"] = "mlir"  # keeping ops in float needs the MLIR quantizer's deny list


@contextmanager
def keras_saved_once(km, directory: Path) -> Iterator[None]:
    """Within: every ``TFLiteConverter.from_keras_model(km).convert()`` reads one SavedModel of ``km``, saved once.

    Each convert() saves the Keras model as a SavedModel in a new temp dir, which the MLIR importer then reads:
    on ResNet-50 (onnx2tf: 200 Keras layers) 113 s per save, three times for a searched INT8 build (its FP32 and
    FP16 siblings, then INT8), against 3 s for the MLIR conversion. Of a save, ~110 s are tf_keras's per-layer
    JSON (``Layer._tracking_metadata``: each layer's config, onnx2tf's constant weights in it as nested lists),
    which ``tf.saved_model.save`` only computes by reading every attribute while it looks for functions: it never
    writes it. So ``km`` is saved once, without that JSON, into ``directory``, and each save the converter asks
    for is a hard-linked copy of it: the same SavedModel, so the same ``.tflite`` bytes (tests/targets/
    test_tflite_saved_once.py compares them with a plain conversion's). A TensorFlow without this hook (not the
    locked version) converts as it always did.
    """
    from tensorflow.lite.python import lite

    real = getattr(lite, "_save", None)
    if real is None or not hasattr(real, "save"):
        yield
        return
    from edgebuild.procs import Patch, patched

    with patched([Patch("tensorflow.lite.python.lite", "_save", _SavedOnce(real, km, directory),
                        why="every conversion of km reads one SavedModel of it, saved once")]):
        yield


class _SavedOnce:
    """Stands in for the ``tensorflow.python.saved_model.save`` module in TF's lite.py (which calls ``save`` only)."""

    def __init__(self, real, km, directory: Path):
        self.real, self.km, self.directory, self.saved = real, km, directory, {}

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def save(self, obj, export_dir, signatures=None, options=None):
        if obj is not self.km or signatures is not None:
            return self.real.save(obj, export_dir, signatures=signatures, options=options)
        key = repr([getattr(options, k, None) for k in getattr(type(options), "__slots__", ())])
        if key not in self.saved:
            self.saved[key] = self.directory / str(len(self.saved))
            with _no_keras_layer_json():
                self.real.save(obj, str(self.saved[key]), options=options)
        shutil.copytree(self.saved[key], export_dir, dirs_exist_ok=True, copy_function=_link_or_copy)


@contextmanager
def _no_keras_layer_json() -> Iterator[None]:
    try:
        from tf_keras.src.engine import base_layer
    except ImportError:  # not the Keras onnx2tf builds on: the save is what it always was
        yield
        return
    real = base_layer.Layer.__dict__["_tracking_metadata"]
    base_layer.Layer._tracking_metadata = property(lambda self: "")
    try:
        yield
    finally:
        base_layer.Layer._tracking_metadata = real


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _release_tf() -> None:
    """Drop the Keras graph state a conversion leaves behind (matters when converting in-process)."""
    try:
        import tf_keras

        tf_keras.backend.clear_session()
    except Exception:
        pass


def main() -> int:
    block_network()
    result = run(Path(sys.argv[1]))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
