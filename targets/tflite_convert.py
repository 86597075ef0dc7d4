"""The TFLite conversion proper, run in a child process by ``targets/tflite.py``.

    python -m edgebuild.targets.tflite_convert JOB_DIR

``JOB_DIR/job.json`` says what to build, ``JOB_DIR/calib.npz`` holds the calibration feeds: per input, the
feeds ``CalibrationSet.feed(i)`` made, stacked on a new leading axis (``calib[name][i]`` has exactly the ONNX
input's shape and dtype: 0-d scalars, batch on any axis, integer ids).
Before onnx2tf, targets/onnx_rewrite.py rewrites what onnx2tf or INT8 cannot handle (MaxPool padding, Erf,
Sum); every artifact is then loaded with XNNPACK and run once (``xnnpack_check``). The child writes ``JOB_DIR/model.tflite`` and ``JOB_DIR/result.json``
(the artifact's real I/O, the ops it uses, or the error), and its progress to ``JOB_DIR/phase`` so that a
crash of the native converter (the TF calibrator segfaults on some graphs) can be reported by phase.

The path, chosen by measurement (see tests/targets/test_tflite_coverage.py): onnx2tf turns the FP32 ONNX
into a TF/Keras graph in NHWC, and TensorFlow's ``TFLiteConverter`` writes FP32, FP16, dynamic-range or
full-integer INT8 (calibrated on our samples). Nothing may download: the socket layer refuses any
non-local connection, and onnx2tf's sample-image download (it fetches MS-COCO images from GitHub for every
model whose inputs are all 3-channel 4-D tensors) is replaced by our own calibration images.

``settings.float_layers`` (ONNX node names): onnx2tf's ONNX tensor -> Keras tensor map gives each node's Keras
layers, TFLite names every op's output after the layers fused into it, and the MLIR quantizer leaves the ops
on its deny list in float (selective quantization, as tf.lite.experimental.QuantizationDebugger does).
"""
from __future__ import annotations

import itertools
import json
import re
import socket
import sys
import traceback
from pathlib import Path

import numpy as np

from edgebuild.targets.tflite_mixed import ConversionFailure, check_integer, float_layer_map, selective_int8

CHANNEL_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}  # NC... -> N...C
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "")


class NetworkBlocked(OSError):
    pass


def block_network() -> None:
    """Refuse every non-local connection (and name lookup) in this process: conversion is offline."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in LOCAL_HOSTS and not host.startswith("/"):
            raise NetworkBlocked(f"edgebuild converts offline; refused a connection to {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, *LOCAL_HOSTS):
            raise NetworkBlocked(f"edgebuild converts offline; refused to look up {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect
    socket.getaddrinfo = getaddrinfo


def offline_sample_images(calib: dict[str, np.ndarray], job: dict):
    """Stands in for onnx2tf's ``download_test_image_data``: our own calibration images, NHWC float32."""

    def sample_images() -> np.ndarray:
        for spec in job["inputs"]:
            x = calib[spec["name"]]
            if x.ndim != 5 or x.shape[1] != 1:  # samples of a batch-1 4-D input
                continue
            x = x[:20, 0]
            perm = spec.get("perm")
            return np.ascontiguousarray(x.transpose(perm) if perm else x).astype(np.float32)
        raise RuntimeError("onnx2tf asked for sample images but the model has no 4-D input")

    return sample_images


def _phase(job_dir: Path, text: str) -> None:
    (job_dir / "phase").write_text(text)


def _onnx2tf(onnx_path: str, job: dict, calib: dict, workdir: Path):
    import onnx
    import onnx2tf
    import onnx2tf.onnx2tf as o2t_main
    import onnx2tf.utils.common_functions as o2t_common

    inputs = job["inputs"]
    keep_shape = [i["name"] for i in inputs if not i.get("perm") and not i.get("keep_source_layout")]
    keep_nchw = [i["name"] for i in inputs if i.get("keep_source_layout")]
    from edgebuild.targets.onnx_rewrite import rewrite

    graph = constants_to_initializers(onnx.load(onnx_path))
    if job["settings"].get("onnx_rewrites", True):
        graph, job["rewrites"] = rewrite(graph)
    originals = o2t_main.download_test_image_data, o2t_common.download_test_image_data, o2t_main.get_tf_model_outputs
    sample = offline_sample_images(calib, job)
    o2t_main.download_test_image_data = sample  # the name onnx2tf.convert calls
    o2t_common.download_test_image_data = sample
    tensors: dict = {}

    def outputs_keeping_tensors(*args, **kwargs):  # onnx2tf's map ONNX tensor name -> TF tensor, kept for float_layers
        tensors.update(kwargs.get("tf_layers_dict") or {})
        return originals[2](*args, **kwargs)

    o2t_main.get_tf_model_outputs = outputs_keeping_tensors
    try:
        # a graph, not a file path: onnx2tf then starts no onnxsim subprocess and no auto-JSON retries
        km = onnx2tf.convert(
            onnx_graph=graph, output_folder_path=str(workdir / "onnx2tf"), disable_model_save=True,
            non_verbose=True, verbosity="error", not_use_onnxsim=True,
            enable_rnn_unroll=bool(job["settings"].get("rnn_unroll", True)),
            keep_shape_absolutely_input_names=keep_shape or None, keep_ncw_or_nchw_or_ncdhw_input_names=keep_nchw or None,
        )
        return km, {name: v["tf_node"] for name, v in tensors.items() if isinstance(v, dict) and "tf_node" in v}
    finally:  # converting in the caller's process (tests) must leave onnx2tf as it was
        o2t_main.download_test_image_data, o2t_common.download_test_image_data, o2t_main.get_tf_model_outputs = originals


def constants_to_initializers(model):
    """Turn top-level ``Constant`` nodes into initializers, as onnxsim would before onnx2tf.

    onnx2tf expects constant operands (e.g. Clip's min/max, which torch exports as Constant nodes at every
    opset >= 11) to be initializers; it fails with KeyError 'tf_node' otherwise, and onnxsim is not part of
    this toolchain. Graphs from the pipeline's export are already folded by onnxslim: then nothing changes.
    """
    import onnx
    from onnx import numpy_helper

    kept, folded = [], []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        value = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(attrs) == 1:
            if "value" in attrs:
                value = onnx.TensorProto()
                value.CopyFrom(attrs["value"].t)
            elif set(attrs) & {"value_float", "value_floats", "value_int", "value_ints"}:
                array = np.array(onnx.helper.get_attribute_value(next(iter(attrs.values()))))
                value = numpy_helper.from_array(array.astype(np.float32 if "float" in next(iter(attrs)) else np.int64))
        if value is None:
            kept.append(node)
            continue
        value.name = node.output[0]
        folded.append(value)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.initializer.extend(folded)
    return model


def _to_tf_layout(x: np.ndarray, perm) -> np.ndarray:
    x = np.asarray(x)  # a 0-d sample indexes to a numpy scalar
    return np.ascontiguousarray(x.transpose(perm)) if perm else x


def _check_float_graph(km, job: dict, calib: dict) -> tuple[list, dict]:
    """Run the TF graph and onnxruntime on one sample: find each output's layout, prove the graph is right."""
    import onnxruntime as ort

    feed = {i["name"]: np.asarray(calib[i["name"]][0]) for i in job["inputs"]}
    sess = ort.InferenceSession(job["onnx"], providers=["CPUExecutionProvider"])
    ref = sess.run([o["name"] for o in job["outputs"]], feed)
    got = km([_to_tf_layout(feed[i["name"]], i.get("perm")) for i in job["inputs"]], training=False)
    got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
    if len(got) != len(ref):
        raise ConversionFailure("onnx2tf", f"the TF graph has {len(got)} outputs, the ONNX model {len(ref)}")
    perms, worst = [], {"cosine_min": 1.0, "max_abs_error": 0.0}
    for r, g, o in zip(ref, got, job["outputs"]):
        candidates = [None] + ([tuple(int(v) for v in np.argsort(CHANNEL_LAST[g.ndim]))] if g.ndim in CHANNEL_LAST else [])
        fits = [(p, g.transpose(p) if p else g) for p in candidates]
        fits = [(p, v) for p, v in fits if v.shape == r.shape]
        if not fits and g.ndim == r.ndim and g.ndim <= 5:  # onnx2tf moved other axes (a state [2, 1, 128] -> [1, 2, 128])
            fits = [(p, g.transpose(p)) for p in itertools.permutations(range(g.ndim)) if g.transpose(p).shape == r.shape]
        if not fits:
            raise ConversionFailure("onnx2tf", f"output {o['name']}: TF shape {list(g.shape)} does not match ONNX {list(r.shape)}")
        perm, value = min(fits, key=lambda pv: float(np.abs(pv[1].astype(np.float64) - r).max(initial=0.0)))
        err = float(np.abs(value.astype(np.float64) - r).max(initial=0.0))
        a, b = r.ravel().astype(np.float64), value.ravel().astype(np.float64)
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        cos = float(a @ b / denom) if denom else float(np.allclose(a, b, atol=1e-5))
        worst = {"cosine_min": min(worst["cosine_min"], cos), "max_abs_error": max(worst["max_abs_error"], err)}
        perms.append(list(perm) if perm else None)
    if worst["cosine_min"] < 0.999:
        raise ConversionFailure("onnx2tf", f"the FP32 TF graph disagrees with the ONNX model (cosine {worst['cosine_min']:.4f}, "
                                           f"max abs error {worst['max_abs_error']:.3g})")
    return perms, worst


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
                yield {keys[i["name"]]: _to_tf_layout(calib[i["name"]][s], i.get("perm")) for i in job["inputs"]}

        io_type = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[settings.get("io_dtype", "float32")]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # full integer or fail
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
        converter._experimental_disable_per_channel = not settings.get("per_channel", True)
        converter.experimental_new_quantizer = job["quantizer_used"] == "mlir"
        if job.get("float_layer_map") or job.get("auto_float_ops"):
            return selective_int8(converter, km, job, io_type)
    elif precision != "fp32":
        raise ConversionFailure("tflite converter", f"unknown precision {precision}")
    return converter.convert()


def describe_tflite(path: Path) -> dict:
    """Signature I/O details, the builtin ops with their versions, and the model's min_runtime_version."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    runner = it.get_signature_runner()

    def io(details: dict) -> dict:
        out = {}
        for key, d in details.items():
            scale, zp = d["quantization"]
            quantized = d["dtype"] in (np.int8, np.uint8, np.int16)
            out[key] = {"shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                        "scale": float(scale) if quantized else None, "zero_point": int(zp) if quantized else None}
        return out

    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = sorted({f"{names.get(max(c.builtinCode, c.deprecatedBuiltinCode), c.customCode)} v{c.version}"
                  for c in model.operatorCodes})
    meta = {"float_ops": _float_ops(model, names)}
    for m in model.metadata or []:
        data = model.buffers[m.buffer].data
        if m.name == b"min_runtime_version" and data is not None:
            meta["min_runtime_version"] = bytes(data).rstrip(b"\0").decode(errors="replace")
    return {"inputs": io(runner.get_input_details()), "outputs": io(runner.get_output_details()), "ops": ops, **meta}


def _float_ops(model, names: dict) -> list[str]:
    """Ops of the main graph that touch a float tensor other than the model's own inputs and outputs:
    ``{"op": type, "outputs": [output tensor names]}``."""
    from ai_edge_litert import schema_py_generated as schema

    graph = model.subgraphs[0]
    floating = {schema.TensorType.FLOAT32, schema.TensorType.FLOAT16}
    edges = set(graph.inputs) | set(graph.outputs)
    inner = {i for i, t in enumerate(graph.tensors) if t.type in floating and i not in edges}
    ops = []
    for op in graph.operators:
        if inner & ({int(i) for i in op.inputs if i >= 0} | {int(i) for i in op.outputs}):
            code = model.operatorCodes[op.opcodeIndex]
            ops.append({"op": names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM"),
                        "outputs": [_text(graph.tensors[int(i)].name) for i in op.outputs]})
    return ops


def _text(name) -> str:
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def _explain(e: BaseException, phase: str, onnx_path: str) -> dict:
    """One clear line for a failure, naming the ONNX op (onnx2tf) or TFLite op (converter) when known."""
    if isinstance(e, ConversionFailure):
        return {"stage": e.stage, "op": e.op, "message": str(e)}
    text = str(e).strip()
    if phase == "onnx2tf":
        missing = re.match(r"No module named 'onnx2tf\.ops\.(\w+)'", text)
        if isinstance(e, ModuleNotFoundError) and missing:
            op = missing.group(1)
            return {"stage": "onnx2tf", "op": op, "message": f"onnx2tf cannot convert ONNX op {op} (not implemented)"}
        node = getattr(e, "onnx_op_name", None)
        op = _op_type_of(onnx_path, node) if node else None
        where = f" at ONNX node {node} ({op})" if node else ""
        first = text.splitlines()[0] if text else ""
        if isinstance(e, SystemExit):
            first = "onnx2tf stopped (see the converter log)"
        return {"stage": "onnx2tf", "op": op, "message": f"onnx2tf failed{where}: {type(e).__name__}: {first}"[:400]}
    ops = re.findall(r"'(?:tfl|tf)\.(\w+)' op", text) or re.findall(r"op: '?(\w+)'?", text)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines() or [""]
    return {"stage": phase, "op": ops[0] if ops else None, "message": f"{phase} failed: {type(e).__name__}: {lines[0]}"[:400]}


def _op_type_of(onnx_path: str, node_name: str) -> str | None:
    try:
        import onnx

        return next((n.op_type for n in onnx.load(onnx_path).graph.node if n.name == node_name), None)
    except Exception:
        return None


def run(job_dir: Path) -> dict:
    """Convert as ``job.json`` says; returns (and writes) result.json's content."""
    job = json.loads((job_dir / "job.json").read_text())
    with np.load(job_dir / "calib.npz", allow_pickle=False) as z:
        calib = {k: z[k] for k in z.files}
    phase = "onnx2tf"
    try:
        _phase(job_dir, phase)
        km, tensors = _onnx2tf(job["onnx"], job, calib, job_dir)
        float_layers = [str(n) for n in job["settings"].get("float_layers") or []] if job["precision"] == "int8" else []
        if float_layers:
            job["float_layer_map"] = float_layer_map(km, tensors, job["onnx"], float_layers)
        phase = "FP32 graph check"
        _phase(job_dir, phase)
        out_perms, check = _check_float_graph(km, job, calib)
        phase = "tflite converter" if job["precision"] != "int8" else "tflite converter (INT8 calibration)"
        _phase(job_dir, phase)
        # keeping layers in float needs the MLIR quantizer's deny list
        job["quantizer_used"] = "mlir" if float_layers else pick_quantizer(job["settings"].get("quantizer", "auto"), job["onnx"])
        described, kept, repairs = _convert_checked(km, job, calib, job_dir, lambda p: _phase(job_dir, p))
        described["float_ops"] = [op["op"] for op in described["float_ops"]]
        result = {"ok": True, "keras_inputs": list(km.input_names), "keras_outputs": list(km.output_names),
                  "quantizer_used": job["quantizer_used"] if job["precision"] == "int8" else None,
                  "output_perms": out_perms, "fp32_graph_check": check, "rewrites": job.get("rewrites") or [],
                  "repairs": repairs, "xnnpack_checked": _xnnpack_on(job), **described, **kept}
    except (Exception, SystemExit) as e:  # onnx2tf calls sys.exit() on some errors
        result = {"ok": False, "phase": phase, **_explain(e, phase, job["onnx"]),
                  "traceback": traceback.format_exc(limit=8)}
    finally:
        _release_tf()
    (job_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result


# TFLite ops with no int8 kernel -> the ONNX op they come from (for the error of an integer-only profile)
ONNX_OF = {"LOCAL_RESPONSE_NORMALIZATION": "LRN", "ADD_N": "Sum", "POW": "Pow", "EXP": "Exp", "LOG": "Log",
           "SQRT": "Sqrt", "RSQRT": "Sqrt/Div", "DIV": "Div", "CUMSUM": "CumSum"}
MAX_REPAIRS = 2


def _xnnpack_on(job: dict) -> bool:
    return job["settings"].get("host_kernels", "xnnpack") == "xnnpack"


def _convert_checked(km, job: dict, calib: dict, job_dir: Path, phase) -> tuple[dict, dict, list[str]]:
    """Convert, read back, check; repair what the profile allows, else fail naming the ops.

    INT8: ops left in float (no int8 kernel, e.g. LOCAL_RESPONSE_NORMALIZATION) stay float when the profile
    allows float layers (the artifact is then ``_int8_mixed``), else the build fails naming them. Every
    artifact of an XNNPACK profile must load and run once in LiteRT with XNNPACK; when it does not, the ops
    whose quantization XNNPACK rejects are kept in float (profiles with float layers) or named in the error.
    """
    from edgebuild.targets import tflite_xnnpack as xnn

    int8, allow = job["precision"] == "int8", bool(job.get("allow_float_layers"))
    path, repairs = job_dir / "model.tflite", []
    for attempt in range(MAX_REPAIRS + 1):
        phase("tflite converter (INT8 calibration)" if int8 else "tflite converter")
        path.write_bytes(_tflite_bytes(km, job["precision"], job["settings"], calib, job))
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
                if attempt == MAX_REPAIRS:
                    raise
                _keep_float(job, e.ops)
                repairs.append(f"kept in float (no int8 kernel): {', '.join(sorted({op['op'] for op in e.ops}))}")
                continue
        if _xnnpack_on(job):
            phase("XNNPACK load check")
            keys = dict(zip([i["name"] for i in job["inputs"]], km.input_names))
            feed = {i["name"]: calib[i["name"]][0] for i in job["inputs"]}
            error = xnn.load_and_run(path, feed, keys, {i["name"]: i.get("perm") for i in job["inputs"]})
            if error:
                found = xnn.suspects(path)
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
        return described, kept, repairs
    raise AssertionError("unreachable")


def _keep_float(job: dict, ops: list[dict]) -> None:
    known = {(op["op"], tuple(op["outputs"])) for op in job.get("auto_float_ops") or []}
    job["auto_float_ops"] = (job.get("auto_float_ops") or []) + [
        {"op": op["op"], "outputs": list(op["outputs"])} for op in ops if (op["op"], tuple(op["outputs"])) not in known]
    job["quantizer_used"] = "mlir"  # keeping ops in float needs the MLIR quantizer's deny list


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
