"""Activation ranges for TF's MLIR quantizer, measured on the calibration data without buffer sharing.

TF's calibrator runs the float model in the TFLite interpreter and logs every op's inputs and outputs after the
op ran. The interpreter lets an element-wise op (MUL, ADD, ...) write its output into its first input's buffer
when nothing else reads that input, so the logged range of that input is the union of its own values and the
op's output. Measured on TF 2.21: in ``(x * 0.5) * relu6(x + 3)`` the calibrated range of ``x * 0.5`` was
[-1.46, 9.28] where its values span [-1.46, 1.55] (the max is the product's); every other tensor's range was
exact. An int8 tensor with a range 6x too wide loses 2.6 of its 8 bits: on the real PP-LCNet document-orientation
model, whose HardSwish is rewritten to ``(x / 6) * relu6(x + 3)`` for XNNPACK (targets/tflite/rewrite/xnnpack.py), each
``x / 6`` took the HardSwish output's range, and the channels with small activations turned to noise (INT8 top-1
agreement with FP32 96.2 %, 3.8 pt over a 0.5 pt budget). The same hits the first operand of every residual ADD.

``measured_ranges`` runs the calibrated float model once more over the same samples, with every tensor kept in
its own buffer (LiteRT's ``experimental_preserve_all_tensors``), and narrows each logged range that is wider
than what the tensor holds; ``exact_ranges`` hooks it between TF's calibration and the MLIR quantizer (the
legacy quantizer calibrates and quantizes in one C++ call, out of reach). Runs in the conversion child
(targets/tflite/convert.py).
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np

from edgebuild.calibration.histogram import Histograms
from edgebuild.procs import Patch

WIDER = 1.01  # narrow a logged range only when it is over 1 % wider than the measured one (else it is the same)
# ... and only when at most this much wider: the op that shared the buffer has an output that wide (an attention
# mask's -3.4e38 added to a MatMul), and XNNPACK's int8 add/multiply rescale inputs to outputs by at most ~2^8, so a
# narrowed input that far finer than the op's output aborted LiteRT (SIGABRT while loading) instead of helping
MAX_NARROWING = 256.0


def measured_ranges(calibrated: bytes, samples, method: str = "minmax",
                    percentile: float = 99.999) -> tuple[bytes, list[dict]]:
    """``calibrated`` (a float .tflite with min/max per tensor) with the ranges that buffer sharing widened set to
    the measured ones; and what changed, ``{"tensor", "logged": [lo, hi], "measured": [lo, hi]}`` per tensor.

    ``method`` ``percentile`` or ``entropy``: every activation's range (not only the shared ones) is the histogram
    method's over the values measured here (calibration/histogram.py, as onnx-cpu's calibration does), never wider
    than the logged min-max. ``samples``: what TF's representative dataset yields (dicts keyed by signature input, or
    lists in input order). Only the main graph is measured (a WHILE body keeps its logged ranges)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    import flatbuffers

    model = schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    graph = model.subgraphs[0]
    logged = {i: t for i, t in enumerate(graph.tensors) if t.type == schema.TensorType.FLOAT32
              and t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1}
    produced = {int(o) for op in graph.operators for o in op.outputs}
    # only what buffer sharing can widen: an op's first input whose buffer the op may overwrite with its output (one
    # output of the same shape and type); op outputs only (a model input is fed, never overwritten)
    shared = {int(op.inputs[0]) for op in graph.operators
              if op.inputs is not None and len(op.inputs) and op.outputs is not None and len(op.outputs) == 1
              and int(op.inputs[0]) >= 0 and _same_shape(graph.tensors[int(op.inputs[0])], graph.tensors[int(op.outputs[0])])}
    # an op whose int8 output has a fixed scale by definition (TANH: 1/128, LOGISTIC/SOFTMAX: 1/256): its output range
    # is the op's, not the data's; narrowed, the converter gave TANH another scale and XNNPACK aborted on it
    ops = schema.BuiltinOperator
    fixed_kinds = {ops.TANH, ops.LOGISTIC, ops.SOFTMAX, ops.LOG_SOFTMAX}
    code = lambda op: max(model.operatorCodes[op.opcodeIndex].builtinCode,  # noqa: E731
                          model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)
    fixed = {int(o) for op in graph.operators if code(op) in fixed_kinds for o in op.outputs}
    inputs = {int(i) for i in graph.inputs}
    histograms = None if method == "minmax" else Histograms(method, {  # bins over the logged range (an upper bound)
        i: max(abs(float(t.quantization.min[0])), abs(float(t.quantization.max[0]))) for i, t in logged.items()},
        percentile)
    wanted = sorted(i for i in logged if i not in fixed and (
        i in produced and i in shared if histograms is None else i in produced or i in inputs))
    if not wanted:
        return calibrated, []
    it = Interpreter(model_content=bytes(calibrated), num_threads=1, experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    by_key = {k: d["index"] for k, d in it.get_signature_runner().get_input_details().items()} \
        if it.get_signature_list() else {}
    in_order = [d["index"] for d in it.get_input_details()]
    dtypes = {d["index"]: d["dtype"] for d in it.get_input_details()}  # int32/int64 ids stay integers
    lo = np.full(len(graph.tensors), np.inf)
    hi = np.full(len(graph.tensors), -np.inf)
    for sample in samples:
        feed = ([(by_key[k], v) for k, v in sample.items()] if isinstance(sample, dict)
                else list(zip(in_order, sample)))
        for index, value in feed:
            it.set_tensor(index, np.asarray(value, dtype=dtypes[index]).reshape(it.get_tensor(index).shape))
        it.invoke()
        for i in wanted:
            v = it.get_tensor(i)
            if v.size:
                lo[i], hi[i] = min(lo[i], float(v.min())), max(hi[i], float(v.max()))
        if histograms is not None:
            histograms.add({i: it.get_tensor(i) for i in wanted})
    if histograms is not None:
        for i, (a, b) in histograms.ranges().items():
            lo[i], hi[i] = max(lo[i], a), min(hi[i], b)
    changed = []
    for i in wanted:
        q = logged[i].quantization
        was = (float(q.min[0]), float(q.max[0]))
        now = (max(lo[i], was[0]), min(hi[i], was[1]))  # sharing only ever widens a range; a histogram narrows it
        if (not np.isfinite(now).all() or now[1] - now[0] <= 0 or (was[1] - was[0]) <= WIDER * (now[1] - now[0])
                or (was[1] - was[0]) > MAX_NARROWING * (now[1] - now[0])):
            continue
        q.min, q.max = [now[0]], [now[1]]
        name = graph.tensors[i].name
        changed.append({"tensor": name.decode(errors="replace") if isinstance(name, bytes) else str(name),
                        "logged": [round(float(was[0]), 6), round(float(was[1]), 6)],
                        "measured": [round(float(now[0]), 6), round(float(now[1]), 6)]})
    if not changed:
        return calibrated, []
    builder = flatbuffers.Builder(len(calibrated) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), changed


def _same_shape(a, b) -> bool:
    shape = lambda t: [] if t.shape is None else [int(d) for d in t.shape]  # noqa: E731
    return a.type == b.type and shape(a) == shape(b)


def exact_ranges(record: list, memo: dict, method: str = "minmax", percentile: float = 99.999) -> Patch:
    """The patch (apply with ``procs.patched``) under which TF's ``Calibrator.calibrate`` (what the MLIR quantizer
    path and ``_experimental_calibrate_only`` call) returns ``measured_ranges`` of its result; the changed tensors are
    appended to ``record``. ``memo`` keeps each result by the float model's sha256: a repair that reconverts the same
    graph with other ops kept float (convert.py, ``MAX_REPAIRS``) gets the same float model and reuses its
    calibration (TransNetV2 on 2 cores: ~8 min of calibration per conversion, before the repair paid it again).
    ``method``/``percentile``: as in ``measured_ranges``."""

    def wrap(original):
        def calibrate(self, dataset_gen):
            key = f"{hashlib.sha256(bytes(self._model_content)).hexdigest()} {method} {percentile}"
            if key in memo:
                record.extend(memo[key][1])
                print("edgebuild: calibration of this float model reused", file=sys.stderr, flush=True)
                return memo[key][0]
            calibrated = original(self, dataset_gen)
            try:
                fixed, changed = measured_ranges(calibrated, dataset_gen(), method, percentile)
            except (RuntimeError, ValueError, KeyError, MemoryError) as e:  # keep TF's ranges rather than fail the build
                print(f"edgebuild: calibration ranges not re-measured ({type(e).__name__}: {e}); TF's ranges kept",
                      file=sys.stderr, flush=True)
                return calibrated
            record.extend(changed)
            memo[key] = (fixed, changed)
            return fixed
        return calibrate

    return Patch("tensorflow.lite.python.optimize.calibrator:Calibrator", "calibrate", wrap=wrap,
                 why="calibration ranges without buffer sharing (measured_ranges)")
