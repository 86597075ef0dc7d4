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

``measured_ranges`` runs the calibrated float model once more over the same samples, with every tensor it
measures made a graph output (its own buffer, on LiteRT's XNNPACK kernels), and narrows each logged range that is
wider than what the tensor holds; ``exact_ranges`` hooks it between TF's calibration and the MLIR quantizer (the
legacy quantizer calibrates and quantizes in one C++ call, out of reach). On a model of one graph (no WHILE body,
no fused LSTM) TF's calibrator logs one sample only and every range is the measured one: TF's logging calibrator
runs single-threaded builtin kernels (TransNetV2: ~9 s a sample, the per-frame 2-D convs past the converter's
900 s), the measuring pass 1 s. Runs in the conversion child (targets/tflite/convert.py).
"""
from __future__ import annotations

import hashlib
import itertools
import sys

import numpy as np

from edgebuild.calibration.histogram import Histograms
from edgebuild.procs import Patch

WIDER = 1.01  # narrow a logged range only when it is over 1 % wider than the measured one (else it is the same)
# ... and only when at most this much wider: the op that shared the buffer has an output that wide (an attention
# mask's -3.4e38 added to a MatMul), and XNNPACK's int8 add/multiply rescale inputs to outputs by at most ~2^8, so a
# narrowed input that far finer than the op's output aborted LiteRT (SIGABRT while loading) instead of helping
MAX_NARROWING = 256.0
MEASURE_THREADS = 4  # LiteRT threads of the measuring pass (at most the CPUs this process may use)


def measured_ranges(calibrated: bytes, samples, method: str = "minmax", percentile: float = 99.999,
                    every: bool = False) -> tuple[bytes, list[dict]]:
    """``calibrated`` (a float .tflite with min/max per tensor) with the ranges that buffer sharing widened set to
    the measured ones; and what changed, ``{"tensor", "logged": [lo, hi], "measured": [lo, hi]}`` per tensor.

    ``method`` ``percentile``, ``entropy`` or ``mean_minmax``: every activation's range (not only the shared ones) is
    the method's over the values measured here (calibration/histogram.py, as onnx-cpu's calibration does), never
    wider than the logged min-max. ``samples``: what TF's representative dataset yields (dicts keyed by signature
    input, or lists in input order); a callable giving them anew when ``every``. Only the main graph is measured (a
    WHILE body keeps its logged ranges).

    ``every``: TF's calibrator logged one sample only (``exact_ranges``' fast path), so every activation's range is
    the one measured here over all the samples, not a narrowing of the logged one (a histogram method reads the
    samples twice: its bins span the measured min-max). A fixed-scale output and a buffer-shared tensor logged over
    MAX_NARROWING wider than it holds keep the union of both, as TF's whole calibration would have logged them."""
    from ai_edge_litert import schema_py_generated as schema
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
    if every:
        wanted = sorted(i for i in logged if i in produced or i in inputs)
    else:
        wanted = sorted(i for i in logged if i not in fixed and (
            i in produced and i in shared if method == "minmax" else i in produced or i in inputs))
    if not wanted:
        return calibrated, []
    was = {i: (float(logged[i].quantization.min[0]), float(logged[i].quantization.max[0])) for i in wanted}
    lo = np.full(len(graph.tensors), np.inf)
    hi = np.full(len(graph.tensors), -np.inf)

    def extremes(values: dict) -> None:
        for i, v in values.items():
            if v.size:
                lo[i], hi[i] = min(lo[i], float(v.min())), max(hi[i], float(v.max()))

    histograms = None
    if method == "minmax":
        _visit(calibrated, wanted, samples() if every else samples, [extremes])
    elif every:  # bins over the measured range, so the values first
        _visit(calibrated, wanted, samples(), [extremes])
        histograms = Histograms(method, {i: max(abs(lo[i]), abs(hi[i])) for i in wanted if i not in fixed}, percentile)
        _visit(calibrated, wanted, samples(), [histograms.add])
    else:  # bins over the logged range (an upper bound)
        histograms = Histograms(method, {i: max(abs(a), abs(b)) for i, (a, b) in was.items()}, percentile)
        _visit(calibrated, wanted, samples, [extremes, histograms.add])
    measured = {i: (lo[i], hi[i]) for i in wanted}
    if histograms is not None:
        for i, (a, b) in histograms.ranges().items():
            measured[i] = (max(lo[i], a), min(hi[i], b))
    changed = []
    for i in wanted:
        (a, b), (m, n) = was[i], measured[i]
        if not np.isfinite([m, n]).all() or n - m <= 0:
            continue
        if every and (i in fixed or (i in shared and (b - a) > MAX_NARROWING * (n - m))):
            now = (min(a, m), max(b, n))
        elif every:
            now = (m, n)
        else:
            now = (max(m, a), min(n, b))  # sharing only ever widens a range; a histogram narrows it
            if (b - a) <= WIDER * (now[1] - now[0]) or (b - a) > MAX_NARROWING * (now[1] - now[0]):
                continue
        q = logged[i].quantization
        q.min, q.max = [now[0]], [now[1]]
        width = WIDER * (now[1] - now[0])
        if every:  # what buffer sharing widened in TF's log, or a histogram clipped off the min-max
            before = (a, b) if i in shared and b - a > width else (lo[i], hi[i]) if hi[i] - lo[i] > width else None
        else:
            before = (a, b)
        if before is not None:
            name = graph.tensors[i].name
            changed.append({"tensor": name.decode(errors="replace") if isinstance(name, bytes) else str(name),
                            "logged": [round(float(before[0]), 6), round(float(before[1]), 6)],
                            "measured": [round(float(now[0]), 6), round(float(now[1]), 6)]})
    builder = flatbuffers.Builder(len(calibrated) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), changed


def _visit(calibrated: bytes, wanted: list[int], samples, visitors) -> None:
    """Run the float model on every sample with the ``wanted`` tensors as extra graph outputs, on LiteRT's default
    kernels (XNNPACK) with the host's threads, and give each visitor ``{tensor index: values}`` per sample.

    Graph outputs, not ``experimental_preserve_all_tensors``: that one needs LiteRT's builtin kernels without
    XNNPACK, single-threaded; on TransNetV2 (100-frame windows, 488 activations) it took 5.8 s a sample, and TF's own
    logging calibrator ~9 s; as outputs on XNNPACK 1.0 s, with the same memory (every tensor kept either way)."""
    import os

    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    model = schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    graph = model.subgraphs[0]
    outputs = [int(o) for o in graph.outputs]
    graph.outputs = outputs + [i for i in wanted if i not in set(outputs)]
    builder = flatbuffers.Builder(len(calibrated) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    threads = max(1, min(MEASURE_THREADS, len(os.sched_getaffinity(0))))
    it = Interpreter(model_content=bytes(builder.Output()), num_threads=threads)
    it.allocate_tensors()
    by_key = {k: d["index"] for k, d in it.get_signature_runner().get_input_details().items()} \
        if it.get_signature_list() else {}
    in_order = [d["index"] for d in it.get_input_details()]
    dtypes = {d["index"]: d["dtype"] for d in it.get_input_details()}  # int32/int64 ids stay integers
    for sample in samples:
        feed = ([(by_key[k], v) for k, v in sample.items()] if isinstance(sample, dict)
                else list(zip(in_order, sample)))
        for index, value in feed:
            it.set_tensor(index, np.asarray(value, dtype=dtypes[index]).reshape(it.get_tensor(index).shape))
        it.invoke()
        values = {i: it.get_tensor(i) for i in wanted}
        for visit in visitors:
            visit(values)


def single_graph(model_content: bytes) -> bool:
    """Whether every tensor TF's calibrator logs in this float model is one ``measured_ranges`` measures: one graph
    (no WHILE/IF bodies) and no op with intermediate tensors (TF's fused LSTM)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_content), 0)
    return len(model.subgraphs) == 1 and not any(
        op.intermediates is not None and len(op.intermediates) for op in model.subgraphs[0].operators)


def _same_shape(a, b) -> bool:
    shape = lambda t: [] if t.shape is None else [int(d) for d in t.shape]  # noqa: E731
    return a.type == b.type and shape(a) == shape(b)


def exact_ranges(record: list, memo: dict, method: str = "minmax", percentile: float = 99.999,
                 one_sample: bool = True) -> Patch:
    """The patch (apply with ``procs.patched``) under which TF's ``Calibrator.calibrate`` (what the MLIR quantizer
    path and ``_experimental_calibrate_only`` call) returns ``measured_ranges`` of its result; the changed tensors are
    appended to ``record``. ``memo`` keeps each result by the float model's sha256: a repair that reconverts the same
    graph with other ops kept float (convert.py, ``MAX_REPAIRS``) gets the same float model and reuses its
    calibration (TransNetV2 on 2 cores: ~8 min of calibration per conversion, before the repair paid it again).
    ``method``/``percentile``: as in ``measured_ranges``. ``one_sample``: TF's calibrator may log one sample on a
    one-graph model (``measured_ranges(every=True)``); off for a recurrent source graph, whose unrolled gate SPLITs the
    MLIR quantizer leaves float from run to run (convert.py ``pick_quantizer``): it keeps TF's whole calibration."""

    def wrap(original):
        def calibrate(self, dataset_gen):
            key = f"{hashlib.sha256(bytes(self._model_content)).hexdigest()} {method} {percentile}"
            if key in memo:
                record.extend(memo[key][1])
                print("edgebuild: calibration of this float model reused", file=sys.stderr, flush=True)
                return memo[key][0]
            if one_sample and single_graph(self._model_content):  # TF logs one sample; all are measured
                calibrated = original(self, lambda: itertools.islice(dataset_gen(), 1))
                try:
                    fixed, changed = measured_ranges(calibrated, dataset_gen, method, percentile, every=True)
                except (RuntimeError, ValueError, KeyError, MemoryError) as e:
                    print(f"edgebuild: calibration ranges not measured in LiteRT ({type(e).__name__}: {e}); "
                          "TF's calibrator runs on every sample", file=sys.stderr, flush=True)
                    fixed, changed = _logged_then_narrowed(original, self, dataset_gen, method, percentile)
            else:
                fixed, changed = _logged_then_narrowed(original, self, dataset_gen, method, percentile)
            record.extend(changed)
            memo[key] = (fixed, changed)
            return fixed
        return calibrate

    return Patch("tensorflow.lite.python.optimize.calibrator:Calibrator", "calibrate", wrap=wrap,
                 why="calibration ranges without buffer sharing (measured_ranges)")


def _logged_then_narrowed(original, calibrator, dataset_gen, method: str, percentile: float) -> tuple[bytes, list]:
    """TF's calibration on every sample, then the ranges buffer sharing widened narrowed (``measured_ranges``)."""
    calibrated = original(calibrator, dataset_gen)
    try:
        return measured_ranges(calibrated, dataset_gen(), method, percentile)
    except (RuntimeError, ValueError, KeyError, MemoryError) as e:  # keep TF's ranges rather than fail the build
        print(f"edgebuild: calibration ranges not re-measured ({type(e).__name__}: {e}); TF's ranges kept",
              file=sys.stderr, flush=True)
        return calibrated, []
