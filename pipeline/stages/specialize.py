"""Graph pass: an ``If`` whose condition the data never varies becomes the plain branch it always takes.

A voice-activity model branches on its 0-d ``sr`` input (8 kHz or 16 kHz path); onnxruntime's quantizer does not
reach inside If subgraphs, OpenVINO converts (and fails on) the untaken branch, onnx2tf has no If at all. When
every evaluation (and calibration) sample gives the inputs a condition depends on one and the same value, that
value is the model the user deploys: the condition is folded, the taken branch is inlined and the untaken one
dropped, so every backend sees a plain graph.

The interface stays as it was: a frozen input remains a graph input (device code still feeds it), but the graph
no longer reads it — it computes as if the recorded value had been fed. The specialized graph is checked to give
the original's outputs on the evaluation data before it replaces it.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MAX_CHECK_SAMPLES = 16
MAX_REL_DIFF = 1e-5


def specialize_constant_ifs(model, datasets: Iterable) -> tuple[object, dict[str, object], list[str]]:
    """Return (model, frozen input values, notes); the model is unchanged (and no input frozen) when no If's
    condition is fixed by the data, or when the specialized graph would not compute what the original does.
    Repeated while it inlines: an inlined branch may hold Ifs of its own (Silero VAD's LSTM sits in a decoder If
    whose condition is a Shape of the state input: fixed by the data's shapes)."""
    datasets = list(datasets)
    frozen, notes = {}, []
    for _ in range(4):
        model, more_frozen, more = _specialize_once(model, datasets)
        frozen.update(more_frozen)
        notes += more
        if not more_frozen and not any("inlined" in n for n in more):
            break
    return model, frozen, notes


def _specialize_once(model, datasets: list) -> tuple[object, dict[str, object], list[str]]:
    g = model.graph
    ifs = [n for n in g.node if n.op_type == "If"]
    if not ifs:
        return model, {}, []
    datasets = [d for d in datasets if d is not None and len(d)]
    if not datasets:
        return model, {}, []
    graph_inputs = {i.name for i in g.input} - {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    deps = {n.name or n.output[0]: _input_deps(n.input[0], producer, graph_inputs) for n in ifs}
    needed = set().union(*deps.values())
    constant = {name: v for name in needed if (v := _constant_value(name, datasets)) is not None}
    fixed = [n for n in ifs if deps[n.name or n.output[0]] <= set(constant)]
    if not fixed:
        varying = sorted(needed - set(constant))
        return model, {}, [f"If node(s) kept: their condition depends on input(s) {varying}, which vary in the data"]

    conds = _evaluate(model, [n.input[0] for n in fixed], datasets[0].feed(0))
    for i in range(1, min(len(datasets[0]), 4)):  # a condition read from shapes only: the same on other samples too
        again = _evaluate(model, [n.input[0] for n in fixed], datasets[0].feed(i))
        fixed = [n for n in fixed if again[n.input[0]] == conds[n.input[0]]]
    out = _copy(model)
    inlined = []
    for node in fixed:
        branch = _attr_graph(node, "then_branch" if conds[node.input[0]] else "else_branch")
        inner = {o for n in branch.node for o in n.output} | {t.name for t in branch.initializer}
        if inner & _all_names(out.graph, skip=node):
            continue  # a name the branch defines clashes with the outer graph: keep this If as it is
        _inline(out.graph, node, branch)
        inlined.append(f"{node.name or node.output[0]} -> {'then' if conds[node.input[0]] else 'else'}")
    if not inlined:
        return model, {}, ["If node(s) kept: their branches reuse names of the outer graph"]
    frozen = {k: constant[k] for k in sorted(set().union(*(deps[n.name or n.output[0]] for n in fixed)))}
    _freeze(out.graph, frozen)
    _drop_dead_nodes(out.graph)
    diff = _max_rel_diff(model, out, datasets[0])
    if diff is None or diff > MAX_REL_DIFF:
        why = "it does not run" if diff is None else f"its outputs differ by {diff:.2g} (relative)"
        return model, {}, [f"If node(s) kept: the specialized graph was refused ({why})"]
    shown = ", ".join(f"{k}={_show(v)}" for k, v in frozen.items()) or "the inputs' sizes"
    return out, {k: v.tolist() for k, v in frozen.items()}, [
        f"graph specialized for {shown} (the value of every data sample): If {', '.join(inlined)} inlined, "
        f"untaken branch(es) dropped; the input(s) stay in the interface but are ignored "
        f"(outputs identical to the original on the evaluation data, max relative difference {diff:.1g})"]


def _input_deps(name: str, producer: dict, graph_inputs: set[str]) -> set[str]:
    seen, todo, found = set(), [name], set()
    while todo:
        t = todo.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in graph_inputs:
            found.add(t)
        elif t in producer:
            node = producer[t]
            if node.op_type in ("Shape", "Size"):  # reads its input's shape only: fixed when the inputs' sizes are
                continue
            todo.extend(node.input)
            todo.extend(_outer_refs(node))
    return found


def _outer_refs(node) -> list[str]:
    """Names a node's subgraphs read (a control-flow node's condition may depend on them too)."""
    refs = []
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in sub.node:
                refs.extend(n.input)
                refs.extend(_outer_refs(n))
    return refs


def _constant_value(name: str, datasets) -> np.ndarray | None:
    first = None
    for data in datasets:
        for i in range(len(data)):
            v = np.asarray(data.feed(i)[name])
            if first is None:
                first = v
            elif v.shape != first.shape or not np.array_equal(v, first):
                return None
    return first


def _evaluate(model, names: list[str], feed: dict) -> dict[str, bool]:
    from onnx import TensorProto, helper

    probe = _copy(model)
    have = {o.name for o in probe.graph.output}
    for n in names:
        if n not in have:
            probe.graph.output.append(helper.make_tensor_value_info(n, TensorProto.BOOL, None))
    values = _run(probe, feed, names)
    return {n: bool(np.asarray(v).reshape(-1)[0]) for n, v in zip(names, values)}


def _run(model, feed: dict, names: list[str] | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    return sess.run(names, {k: v for k, v in feed.items() if k in wanted})


def _inline(graph, node, branch) -> None:
    from onnx import helper

    new = list(branch.node) + [helper.make_node("Identity", [b.name], [o], name=f"{node.name or o}/out{i}")
                               for i, (b, o) in enumerate(zip(branch.output, node.output)) if o]
    graph.initializer.extend(branch.initializer)
    graph.value_info.extend(v for v in branch.value_info)
    nodes = list(graph.node)
    at = next(i for i, n in enumerate(nodes) if n is node or n == node)
    del graph.node[:]
    graph.node.extend(nodes[:at] + new + nodes[at + 1:])


def _freeze(graph, frozen: dict[str, np.ndarray]) -> None:
    """Every read of a frozen input reads a constant of its value instead (subgraphs included)."""
    from onnx import numpy_helper

    rename = {}
    for name, value in frozen.items():
        const = f"{name}__frozen"
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), const))
        rename[name] = const
    _rename_reads(graph, rename)


def _rename_reads(graph, rename: dict[str, str]) -> None:
    for n in graph.node:
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _rename_reads(sub, rename)


def _drop_dead_nodes(graph) -> None:
    while True:
        used = {o.name for o in graph.output} | set(_reads(graph))
        keep = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = set(_reads(graph))
    inits = [t for t in graph.initializer if t.name in used or t.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _reads(graph) -> list[str]:
    out = []
    for n in graph.node:
        out.extend(n.input)
        out.extend(_outer_refs(n))
    return out


def _max_rel_diff(original, specialized, data) -> float | None:
    worst = 0.0
    for i in range(min(len(data), MAX_CHECK_SAMPLES)):
        feed = data.feed(i)
        try:
            a, b = _run(original, feed), _run(specialized, feed)
        except Exception:
            return None
        for x, y in zip(a, b):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            if x.shape != y.shape:
                return None
            worst = max(worst, float(np.max(np.abs(x - y), initial=0.0) / max(np.max(np.abs(x), initial=0.0), 1e-12)))
    return worst


def _attr_graph(node, name: str):
    return next(a.g for a in node.attribute if a.name == name)


def _all_names(graph, skip=None) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        if skip is not None and n == skip:
            continue
        names.update(n.output)
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names |= _all_names(sub)
    return names


def _copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _show(v: np.ndarray) -> str:
    return str(v.item()) if v.size == 1 else f"array{list(v.shape)}"
