"""Graph helpers shared by the rewrites: static shapes and element types after ONNX shape inference, node
attributes, fresh tensor names, node replacement, and which tensors are non-negative by their producer.
"""
from __future__ import annotations


def opset_of(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def static_shapes(model) -> dict[str, list[int]]:
    """Static tensor shapes after ONNX shape inference (unknown dims as -1)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    out = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    for i in g.initializer:
        out[i.name] = list(i.dims)
    return out


def replace_nodes(model, replacements: dict[int, list], initializers: list) -> None:
    nodes = []
    for i, node in enumerate(model.graph.node):
        nodes.extend(replacements.get(i, [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)


def finish(model, replacements: dict[int, list], initializers: list, done: list[str], what: str,
           count: str | None = None):
    """A rewrite pass's result: ``(model, None)`` when it rewrote nothing, else the model with ``replacements``
    applied and its note, ``what`` followed by the first five nodes ``done`` (or their number and ``count``)."""
    if not done:
        return model, None
    replace_nodes(model, replacements, initializers)
    listed = f"{len(done)} {count}" if count else f"{', '.join(done[:5])}{' ...' if len(done) > 5 else ''}"
    return model, f"{what}: {listed}"


def node_attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def unique_name(model, base: str) -> str:
    names = {n for node in model.graph.node for n in node.output} | {i.name for i in model.graph.initializer}
    name, k = base, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    return name


def nonnegative(tensor: str, producer: dict, consts: dict) -> bool:
    """Is every value of ``tensor`` >= 0 by the op that makes it (Relu, Sigmoid, Clip with a lower bound >= 0),
    looking through ops that move values without changing them (Transpose, Reshape, Identity)?"""
    node = producer.get(tensor)
    for _ in range(8):
        if node is None or node.op_type not in ("Transpose", "Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze"):
            break
        node = producer.get(node.input[0])
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("Relu", "Sigmoid", "HardSigmoid", "Softmax"):
        return True
    if node.op_type == "Clip":
        lo = node_attrs(node).get("min") if len(node.input) == 1 else \
            (float(consts[node.input[1]].ravel()[0]) if len(node.input) > 1 and node.input[1] in consts
             and consts[node.input[1]].size == 1 else None)
        return lo is not None and lo >= 0
    return False


def elem_types(model) -> dict[str, int]:
    """ONNX element type of every tensor whose type shape inference knows."""
    import onnx

    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        g = model.graph
    out = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    out.update({i.name: i.data_type for i in g.initializer})
    return out
