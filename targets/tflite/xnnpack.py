"""Does a .tflite load and run in LiteRT with XNNPACK (the device's default CPU path)? If not, which ops?

LiteRT only says ``failed to create XNNPACK runtime ... Node number N (TfLiteXNNPackDelegate) failed to
prepare`` (N is the delegate's own node, not the op at fault). XNNPACK refuses a quantized graph when a
tensor's scale is not a positive normal number, or when an op's requantization scale
(input scale x weight scale / output scale for CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV;
input / output scale for the others) falls outside [2^-32, 256). ``suspects`` finds those ops from the
model's own quantization parameters, so the error names them (and the repair can keep them in float).
Runs in the conversion child (targets/tflite/convert.py).
"""
from __future__ import annotations

import math

import numpy as np

WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
MIN_RATIO, MAX_RATIO = 2.0 ** -32, 256.0
MAX_SANE_SCALE = 1e6  # an activation scale above this means a range of ~1e8: a calibration artefact


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
