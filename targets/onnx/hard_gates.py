"""HardSigmoid and HardSwish in int8 on ONNX Runtime: the gate as Add -> Clip, its slope folded into a scale.

ONNX Runtime has no int8 HardSigmoid or HardSwish kernel, so a QDQ graph runs each one in float between a
DequantizeLinear and a QuantizeLinear. In MobileNetV3 / PP-LCNet nets every conv is followed by one: on PaddleOCR's
document-orientation classifier (28 HardSwish, onnxruntime 1.32, one thread, AVX2 host) the int8 convs took 1.93 ms
against FP32's 3.61 ms, and the HardSwish chains (DQ -> HardSigmoid -> Q -> QLinearMul) another 1.94 ms, so INT8 ran
at FP32's speed. A table lookup (Cast + Gather of a 256-entry table) is exact but onnxruntime's Gather copies element
by element: 21 ms.

What this does instead, before calibration (``decompose``), exact in float:

- ``HardSigmoid(u; a, b)`` (a > 0) becomes ``Clip(u + b/a, 0, 1/a) * a``;
- a ``HardSwish(x)`` op becomes ``x * HardSigmoid(x; 1/6, 1/2)``, decomposed as above;
- ``x * Clip(x + 3, 0, 6) / 6`` (or ``* (1/6)``), the exporters' form, gets its ``/ 6`` moved onto the gate:
  ``x * (Clip(x + 3, 0, 6) * 1/6)``.

The quantizer then makes the Add a QLinearAdd and folds the Clip into its output range. After quantizing
(``fold``), each gate's ``* a`` (named with ``MARK``) is folded into the scale of the DequantizeLinear that reads the
Clip's int8 output (``s * a``): no op is left for it. The gate's int8 grid is the same one, 256 steps over its range.
Measured on that classifier: the gate chains 1.94 -> ~1.2 ms. A layer the settings keep in float is not rewritten;
where the quantizer leaves a ``* a`` float, it stays as it is (the graph is exact either way).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.targets.regions import graph_index

MARK = "/int8_gate_scale"  # the name of the Mul by a gate's slope, folded into a scale after quantizing
GATE_OPS = ("Add", "Mul")  # the op types the rewrite's gate is quantized as


def applies(op_types) -> bool:
    """Whether the quantizer's op types (None: its whole registry) make the rewritten gate int8."""
    return op_types is None or all(t in op_types for t in GATE_OPS)


def decompose(src: Path, out: Path, skip: set[str]) -> int:
    """``src``'s HardSigmoid / HardSwish gates rewritten into ``out`` as described above (the nodes named in ``skip``
    left as they are); the number rewritten. ``out`` is written only when some is."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    producer, consumers = graph_index(graph)
    outputs = {o.name for o in graph.output}
    constants = _constants(graph)
    extra: list = []
    replaced: dict[int, list] = {}
    dropped: set[int] = set()

    def const(name: str, value: float) -> str:
        extra.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    def gate(u: str, a: float, b: float, out_name: str, base: str) -> list:
        """Clip(u + b/a, 0, 1/a) * a into ``out_name`` (whose name, unique in the graph, the constants take)."""
        shifted, clipped = f"{out_name}/shifted", f"{out_name}/clipped"
        add = helper.make_node("Add", [u, const(f"{out_name}/offset", b / a)], [shifted], name=f"{base}/add")
        if opset >= 11:
            clip = helper.make_node("Clip", [shifted, const(f"{out_name}/low", 0.0), const(f"{out_name}/high", 1 / a)],
                                    [clipped], name=f"{base}/clip")
        else:
            clip = helper.make_node("Clip", [shifted], [clipped], name=f"{base}/clip", min=0.0, max=1 / a)
        mul = helper.make_node("Mul", [clipped, const(f"{out_name}/slope", a)], [out_name], name=base + MARK)
        return [add, clip, mul]

    for n in graph.node:
        name = n.name or n.output[0]
        if n.name in skip or id(n) in dropped:
            continue
        if n.op_type == "HardSigmoid":
            attrs = {a.name: a.f for a in n.attribute}
            a, b = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
            if a > 0:
                replaced[id(n)] = gate(n.input[0], a, b, n.output[0], name)
        elif n.op_type == "HardSwish":
            g = f"{n.output[0]}/gate"
            replaced[id(n)] = gate(n.input[0], 1 / 6, 0.5, g, name) + [
                helper.make_node("Mul", [n.input[0], g], [n.output[0]], name=name)]
        elif n.op_type in ("Div", "Mul"):
            moved = _scaled_product(n, producer, consumers, outputs, constants, skip)
            if moved is not None:
                product, clipped, scale = moved
                g = f"{clipped}/scaled"
                slope = helper.make_node("Mul", [clipped, const(f"{clipped}/slope", scale)], [g], name=name + MARK)
                x = product.input[1] if product.input[0] == clipped else product.input[0]
                replaced[id(product)] = [slope, helper.make_node("Mul", [x, g], [n.output[0]], name=product.name)]
                dropped.add(id(n))
    if not replaced:
        return 0
    nodes = []
    for n in graph.node:
        if id(n) not in dropped:
            nodes += replaced.get(id(n), [n])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra)
    onnx.save(model, str(out))
    return len(replaced)


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    found = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    found[n.output[0]] = numpy_helper.to_array(a.t)
    return found


def _scaled_product(last, producer, consumers, outputs: set[str], constants: dict, skip: set[str]):
    """(the product Mul, the Clip's output, the scale) when ``last`` is ``Mul(x, Clip(..)) / c`` or ``* c`` with a
    positive scalar ``c``, the product and the Clip's output read once; else None."""
    c = constants.get(last.input[1]) if len(last.input) == 2 else None
    if c is None or c.size != 1 or float(c.reshape(-1)[0]) <= 0:
        return None
    scale = 1 / float(c.reshape(-1)[0]) if last.op_type == "Div" else float(c.reshape(-1)[0])
    product = producer.get(last.input[0])
    if product is None or product.op_type != "Mul" or product.name in skip or \
            len(consumers.get(product.output[0], [])) != 1 or product.output[0] in outputs:
        return None
    for t in product.input:
        clip = producer.get(t)
        if clip is not None and clip.op_type == "Clip" and len(consumers.get(t, [])) == 1 and t not in outputs:
            return product, t, scale
    return None


def fold(path: Path) -> int:
    """In the quantized model at ``path``: each ``DQ(Q_a) -> Mul(·, a) -> Q_b -> DQ_b`` whose Mul carries ``MARK``
    becomes ``DQ(Q_a)`` with the scale ``s_a * a`` read where ``DQ_b`` was; the number folded (the file is rewritten
    only when some is)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    producer, consumers = graph_index(graph)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    gone: set[int] = set()
    removed_nodes, added = [], []
    for mul in graph.node:
        if mul.op_type != "Mul" or not mul.name.endswith(MARK):
            continue
        found = _foldable(mul, producer, consumers, inits, outputs)
        if found is None:
            continue
        dq_a, q_b, factor, removed = found
        scale = numpy_helper.to_array(inits[dq_a.input[1]]).astype(np.float32) * np.float32(factor)
        name = f"{mul.output[0]}/folded_scale"
        added.append(numpy_helper.from_array(scale, name))
        for dq_b in consumers[q_b.output[0]]:
            del dq_b.input[:]
            dq_b.input.extend([dq_a.input[0], name, *dq_a.input[2:]])
        gone |= {id(n) for n in removed}
        removed_nodes += removed
    if not gone:
        return 0
    kept = [n for n in graph.node if id(n) not in gone]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(added)
    # the removed nodes' own scales and constants (not where a subgraph could read them from the outer scope)
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in kept for a in n.attribute):
        read = {t for n in kept for t in n.input} | outputs
        orphans = {t for n in removed_nodes for t in n.input} - read
        for i in [i for i in graph.initializer if i.name in orphans]:
            graph.initializer.remove(i)
    onnx.save(model, str(path))
    return len(added)


def _foldable(mul, producer, consumers, inits, outputs: set[str]):
    """(DQ_a, Q_b, the factor, the nodes to remove) for a marked Mul whose data input is a per-tensor
    ``DQ(Q_a)`` read only by it and whose output goes through ``Q_b`` to DequantizeLinears only; else None."""
    from onnx import numpy_helper

    def value(t):
        if t in inits:
            return numpy_helper.to_array(inits[t]).astype(np.float64), []
        dq = producer.get(t)
        if dq is None or dq.op_type != "DequantizeLinear" or any(i not in inits for i in dq.input if i):
            return None, []
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0
        own = [dq] if len(consumers.get(t, [])) == 1 else []
        return (q - zp) * numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64), own

    for data, other in ((0, 1), (1, 0)):
        factor, const_nodes = value(mul.input[other])
        dq_a = producer.get(mul.input[data])
        if factor is None or factor.size != 1 or float(factor.reshape(-1)[0]) <= 0 or dq_a is None or \
                dq_a.op_type != "DequantizeLinear" or len(consumers.get(dq_a.output[0], [])) != 1:
            continue
        q_a = producer.get(dq_a.input[0])
        scale = inits.get(dq_a.input[1])
        if q_a is None or q_a.op_type != "QuantizeLinear" or scale is None or int(np.prod(scale.dims)) != 1:
            continue
        readers = consumers.get(mul.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or mul.output[0] in outputs:
            continue
        q_b = readers[0]
        after = consumers.get(q_b.output[0], [])
        if not after or q_b.output[0] in outputs or any(n.op_type != "DequantizeLinear" for n in after):
            continue
        return dq_a, q_b, float(factor.reshape(-1)[0]), [mul, q_b, dq_a, *const_nodes]
    return None
