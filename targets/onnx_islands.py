"""INT8 graphs that onnxruntime refuses to load: the root cause fixed before quantizing, and the float island found
when a load still fails.

**The root cause (onnxruntime 1.32's QDQ quantizer).** A bias initializer shared by several layers (tf2onnx folds equal
constants into one: Spotify Basic Pitch's 18 constant-Q ``conv1d`` layers all read one zero bias
``.../conv1d_25;.../conv1d_25``) is duplicated per layer by ``QDQQuantizer._dup_initializer``, which names the copies
``<bias name><N>`` with N counted over the *initializers* only. ``.../conv1d_25;.../conv1d_25`` + ``2`` is
``.../conv1d_25;.../conv1d_252``, the name of a Conv *output* in the same graph: the bias's DequantizeLinear then
writes a second producer of that tensor, the Neg after it reads a ``{36}`` vector where it expected ``{1,36,1,172}``,
and onnxruntime refuses the graph ("Invalid attribute perm {0, 2, 3, 1}, input shape = {36}", or "All inputs to
Concat must have same rank" further down). Excluding the node the error names changes nothing (the collision is
made upstream, by whichever layer's bias copy takes the name), and renaming every tensor to ``t<k>`` only moves the
collision (``t12`` + ``3`` = ``t123``). :func:`unshare_biases` gives every later use of a shared bias its own copy,
named so that it collides with no name of the graph, before quantizing: the quantizer then never duplicates a bias.

The same quantizer names what it adds ``<tensor>_scale``, ``<tensor>_zero_point``, ``<tensor>_QuantizeLinear_Output``,
``<tensor>_DequantizeLinear_Output``...; a graph that already holds ``h`` and ``h_DequantizeLinear_Output`` gives a
model with two definitions of one name ("Duplicate definition of name", or a KeyError while quantizing).
:func:`quantizer_safe_names_in` renames such inner tensors first. A graph *output* keeps its name (the user's
interface): a collision there is left to the float island (pipeline/stages/islands.py).
"""

from __future__ import annotations

from pathlib import Path

# the ops whose input 2 onnxruntime's QDQ quantizer quantizes as a bias (operators/conv.py, gemm.py, norm.py)
BIAS_OPS = ("Conv", "ConvTranspose", "Gemm", "InstanceNormalization", "LayerNormalization")


def unshare_biases_in(model) -> int:
    """Every use of a bias initializer after its first gets its own uniquely named copy (in place; see the module
    docstring). Returns how many copies were made."""
    import onnx

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    names = set(inits) | {t for n in graph.node for t in (*n.input, *n.output)} | {v.name for v in graph.input} | \
        {v.name for v in graph.output} | {v.name for v in graph.value_info}
    seen: set[str] = set()
    made = 0
    for node in graph.node:
        if node.op_type not in BIAS_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            continue
        bias = node.input[2]
        if bias not in inits:
            continue
        if bias in seen:
            k = 1
            while f"{bias}__bias{k}" in names:
                k += 1
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[bias])
            copy.name = f"{bias}__bias{k}"
            graph.initializer.append(copy)
            names.add(copy.name)
            node.input[2] = copy.name
            made += 1
        seen.add(bias)
    return made


# the suffixes onnxruntime.quantization appends to a tensor's name for what it adds (quant_utils.py, qdq_quantizer.py)
QUANTIZER_SUFFIXES = ("_scale", "_zero_point", "_quantized", "_QuantizeLinear", "_QuantizeLinear_Input",
                      "_QuantizeLinear_Output", "_DequantizeLinear", "_DequantizeLinear_Input",
                      "_DequantizeLinear_Output")


def _subgraph_names(graph) -> set[str]:
    """Every name the subgraphs of ``graph``'s nodes (If/Loop bodies) use: they may read outer tensors by name."""
    import onnx

    out: set[str] = set()
    for n in graph.node:
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                out |= {t for m in g.node for t in (*m.input, *m.output)} | _subgraph_names(g)
    return out


def quantizer_safe_names_in(model) -> int:
    """Inner tensors named ``<another tensor><a quantizer suffix>`` renamed ``..._t<k>`` (in place; see the module
    docstring). Node names are unchanged (float layers name nodes). Returns how many were renamed."""
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | _subgraph_names(graph)
    names = {i.name for i in graph.initializer} | {t for n in graph.node for t in (*n.input, *n.output) if t} | keep
    rename: dict[str, str] = {}
    for t in sorted(names - keep):
        for suffix in QUANTIZER_SUFFIXES:
            if t.endswith(suffix) and t[: -len(suffix)] in names:
                k = 1
                while f"{t}_t{k}" in names:
                    k += 1
                rename[t] = f"{t}_t{k}"
                names.add(rename[t])
                break
    if not rename:
        return 0
    for i in graph.initializer:
        i.name = rename.get(i.name, i.name)
    for n in graph.node:
        n.input[:] = [rename.get(t, t) for t in n.input]
        n.output[:] = [rename.get(t, t) for t in n.output]
    for v in graph.value_info:
        v.name = rename.get(v.name, v.name)
    return len(rename)


def quantizer_safe(path: Path | str) -> int:
    """:func:`unshare_biases_in` and :func:`quantizer_safe_names_in` on the ONNX file at ``path`` (rewritten only when
    something changed). Returns how many biases were copied and tensors renamed."""
    import onnx

    model = onnx.load(str(path))
    made = quantizer_safe_names_in(model) + unshare_biases_in(model)
    if made:
        onnx.save(model, str(path))
    return made
