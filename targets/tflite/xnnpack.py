"""Does a .tflite load and run in LiteRT with XNNPACK (the device's default CPU path)? If not, which ops?

LiteRT only says ``failed to create XNNPACK runtime ... Node number N (TfLiteXNNPackDelegate) failed to
prepare`` (N is the delegate's own node, not the op at fault). XNNPACK refuses a quantized graph when a
tensor's scale is not a positive normal number, or when an op's requantization scale
(input scale x weight scale / output scale for CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV;
input / output scale for the others) falls outside [2^-32, 256). ``suspects`` finds those ops from the
model's own quantization parameters, so the error names them (and the repair can keep them in float).
Runs in the conversion child (targets/tflite/convert.py).

Some quantized graphs make LiteRT abort (SIGABRT in XNNPACK's delegate while it prepares the graph) instead of
failing: loaded in the converter child, that killed the child before the repair could name the op, and the whole
INT8 kind died. ``check`` therefore loads and runs the model in a process of its own (``load_and_run_isolated``:
a crash is an error line), and when the quantization parameters name no op, ``bisect`` finds the first op whose
presence makes the check fail: it loads the main graph cut after its first k ops (``prefix``), each in a process of
its own, halving the range of k (about log2(ops) loads of a second or two each).
"""
from __future__ import annotations

import math

import numpy as np

from edgebuild.targets.tflite.describe import tensor_name

WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
MIN_RATIO, MAX_RATIO = 2.0 ** -32, 256.0
MAX_SANE_SCALE = 1e6  # an activation scale above this means a range of ~1e8: a calibration artefact
PROBE_TIMEOUT_S = 300.0  # one isolated load-and-run (a float model of a few hundred MB takes a few seconds)


def load_and_run(path, feed: dict[str, np.ndarray], keys: dict[str, str], perms: dict[str, list | None]) -> str | None:
    """Load with XNNPACK, run one sample; the first error line, or None when it works."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        it = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=OpResolverType.AUTO)
        it.allocate_tensors()
        details = it.get_signature_runner().get_input_details()
        for name, key in keys.items():
            d = details[key]
            x = np.asarray(feed[name])
            if perms.get(name):
                x = x.transpose(perms[name])
            scale, zp = d["quantization"]
            if np.dtype(d["dtype"]).kind in "iu" and scale and x.dtype.kind == "f":
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / scale) + zp, info.min, info.max)
            it.set_tensor(d["index"], np.ascontiguousarray(x, dtype=d["dtype"]).reshape(d["shape"]))
        it.invoke()
    except (RuntimeError, ValueError) as e:
        return " ".join(str(e).split())[:300] or type(e).__name__
    return None


def _probe(job: tuple) -> str | None:
    return load_and_run(*job)


def load_and_run_isolated(path, feed: dict[str, np.ndarray], keys: dict[str, str], perms: dict[str, list | None],
                          timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``load_and_run`` in a process of its own: LiteRT's crash (an abort while XNNPACK prepares the graph) is an
    error line here, not the death of the process that asked."""
    import re

    from edgebuild.errors import ConversionError
    from edgebuild.targets.isolated import run_isolated

    try:
        return run_isolated(_probe, (str(path), feed, keys, perms), timeout, what="XNNPACK load check",
                            name="xnnpack-check")
    except ConversionError as e:
        how = re.search(r"(crashed \([^)]*\)|timed out after \S+ s)", str(e))
        return f"LiteRT {how.group(1) if how else 'failed'} loading or running the model with XNNPACK" if how \
            else " ".join(str(e).split())[:300]


def prefix(model: bytes, k: int) -> bytes:
    """The model with its main graph cut after its first ``k`` ops: its outputs are the tensors those ops make that
    none of them reads (and the model's own outputs they make); inputs, buffers and other subgraphs unchanged."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    g = m.subgraphs[0]
    g.operators = list(g.operators[:k])
    made = [int(o) for op in g.operators for o in op.outputs if o >= 0]
    read = {int(i) for op in g.operators for i in (op.inputs if op.inputs is not None else []) if i >= 0}
    finals = {int(o) for o in g.outputs}
    outs = [o for o in dict.fromkeys(made) if o not in read or o in finals]
    g.outputs = outs
    for sig in m.signatureDefs or []:
        if sig.subgraphIndex == 0:
            tm = []
            for n, o in enumerate(outs):
                t = schema.TensorMapT()
                t.name, t.tensorIndex = f"cut_{n}".encode(), o
                tm.append(t)
            sig.outputs = tm
    builder = flatbuffers.Builder(len(model) + 1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def bisect(path, feed: dict[str, np.ndarray], keys: dict[str, str], perms: dict[str, list | None],
           scratch) -> dict | None:
    """The first op (in the main graph's order) whose presence makes the isolated load check fail: ``{"op",
    "outputs", "why"}``; None when the cut models do not fail the way the whole one does (not one op's fault)."""
    from pathlib import Path

    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    m = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    g = m.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    cut = Path(scratch) / "cut.tflite"
    lo, hi, loads = 0, len(g.operators), 0  # the first lo ops load and run; all hi ops do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cut.write_bytes(prefix(data, mid))
        loads += 1
        if load_and_run_isolated(cut, feed, keys, perms):
            hi = mid
        else:
            lo = mid
    if not g.operators:
        return None
    cut.write_bytes(prefix(data, hi))
    fails = load_and_run_isolated(cut, feed, keys, perms)  # the error of the shortest failing cut (again)
    cut.unlink(missing_ok=True)
    if not fails:  # the whole graph fails, no cut of it does: not one op's fault
        return None
    op = g.operators[hi - 1]
    code = m.operatorCodes[op.opcodeIndex]
    outputs = [tensor_name(g.tensors[int(o)].name) for o in op.outputs]
    return {"op": names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM"), "outputs": outputs,
            "why": f"the graph fails once this op (number {hi - 1} of {len(g.operators)}) is in it ({fails}; "
                   f"bisected in {loads + 1} isolated loads)"}



def suspects(path) -> list[dict]:
    """Ops whose quantization XNNPACK rejects: ``{"op", "outputs", "why"}``."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {t["index"]: t for t in it.get_tensor_details()}

    def scale(i: int) -> float | None:
        t = tensors.get(i)
        if t is None or np.dtype(t["dtype"]).kind not in "iu":
            return None
        scales = t["quantization_parameters"]["scales"]
        return float(np.max(scales)) if len(scales) else None

    found = []
    for op in it._get_ops_details():
        ins = [i for i in op["inputs"] if i >= 0]
        outs = list(op["outputs"])
        why = []
        for i in ins + outs:
            s = scale(i)
            if s is not None and (not math.isfinite(s) or s <= 0 or s > MAX_SANE_SCALE):
                why.append(f"tensor {tensors[i]['name']!r} has scale {s:.3g}")
        if op["op_name"] in WEIGHTED and len(ins) >= 2 and outs:
            si, sw, so = scale(ins[0]), scale(ins[1]), scale(outs[0])
            if None not in (si, sw, so) and so > 0:
                ratio = si * sw / so
                if not MIN_RATIO <= ratio < MAX_RATIO:
                    why.append(f"requantization scale {ratio:.3g} outside [2^-32, 256)")
        if why:
            found.append({"op": op["op_name"], "outputs": [tensors[o]["name"] for o in outs], "why": "; ".join(why[:2])})
    return found


def describe(found: list[dict]) -> str:
    return "; ".join(f"{f['op']} ({f['outputs'][0] if f['outputs'] else '?'}): {f['why']}" for f in found[:4]) + \
        (f"; and {len(found) - 4} more" if len(found) > 4 else "")


def coverage(path) -> dict:
    """How much of a .tflite XNNPACK takes in LiteRT: ``{"ops", "delegated", "partitions", "fallback"}``.

    LiteRT lists a model's own ops first, then one ``DELEGATE`` node per partition XNNPACK took (its inputs and
    outputs are the partition's borders). A partition's ops are found by walking back from its outputs to its
    inputs; every op in none of them runs on LiteRT's builtin kernels (``fallback``: op name -> count). Each
    partition border in a float model with int8 islands (or the reverse) costs a copy and a cache miss; a model
    XNNPACK takes whole has one partition."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=OpResolverType.AUTO)
    it.allocate_tensors()
    nodes = it._get_ops_details()
    delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
    ops = [n for n in nodes if n["op_name"] != "DELEGATE"]
    producer = {int(t): k for k, n in enumerate(ops) for t in n["outputs"] if t >= 0}
    taken: set[int] = set()
    for d in delegates:
        borders = {int(t) for t in d["inputs"] if t >= 0}
        stack = [int(t) for t in d["outputs"] if t >= 0]
        while stack:
            k = producer.get(stack.pop())
            if k is None or k in taken:
                continue
            taken.add(k)
            stack.extend(int(t) for t in ops[k]["inputs"] if t >= 0 and int(t) not in borders)
    fallback: dict[str, int] = {}
    for k, n in enumerate(ops):
        if k not in taken:
            fallback[n["op_name"]] = fallback.get(n["op_name"], 0) + 1
    return {"ops": len(ops), "delegated": len(taken), "partitions": len(delegates), "fallback": fallback}
