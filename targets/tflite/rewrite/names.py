"""Names TensorFlow or onnx2tf cannot take, made safe before onnx2tf (exact: only names change).

- **Node names TensorFlow refuses as scope names** (PaddlePaddle exports name nodes ``Softmax@0``, ``Conv@3``):
  onnx2tf passes the node name to ops such as ``tf.nn.softmax(name=...)``, which raise "'Softmax@0' is not a
  valid scope name" (the PP-OCR classifier's arm64 failure). Such names get ``_`` for each refused character
  (unique); tensor names are untouched, so float_layers (matched on the source file's node outputs) still work.
- **Model output tensors named with a ':'** (torch names some ``onnx::Shape_422``, as in a MiniLM export): onnx2tf
  turns ':' into ``__`` in its tensor map and loses such an output (the TF graph had one output fewer than the
  ONNX model). The tensor is renamed the way onnx2tf would name it; outputs are matched by position, so nothing
  downstream sees the new name.
"""
from __future__ import annotations

import re

_SCOPE_FIRST = re.compile(r"[A-Za-z0-9.]")
_SCOPE_REST = re.compile(r"[^A-Za-z0-9_.\\/>-]")


def tf_scope_safe_node_names(model):
    """Node names TF accepts as name scopes (``^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$``), unique."""
    bad = [n for n in model.graph.node if n.name and not _scope_ok(n.name)]
    if not bad:
        return model, None
    taken = {n.name for n in model.graph.node}
    first = bad[0].name
    for n in bad:
        base = scope_safe(n.name)
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        n.name = name
    return model, (f"{len(bad)} node name(s) TF refuses as scope names made safe ({first!r} -> {bad[0].name!r}; "
                   f"onnx2tf names TF ops after them)")


def scope_safe(name: str) -> str:
    """A node name as tf_scope_safe_node_names renames it (before a suffix that keeps it unique): what onnx2tf's
    errors then name (torch's ``/color_hist_layer/ScatterElements`` -> ``n/color_hist_layer/ScatterElements``)."""
    base = _SCOPE_REST.sub("_", name)
    return base if _SCOPE_FIRST.match(base) else f"n{base}"


def tf_safe_output_names(model):
    """Model outputs whose tensor name has a ':' renamed as onnx2tf sanitizes names (':' -> '__'), unique."""
    bad = [o.name for o in model.graph.output if ":" in o.name]
    if not bad:
        return model, None
    taken = {t for n in model.graph.node for t in (*n.input, *n.output)} | {i.name for i in model.graph.input}
    renamed = {}
    for old in bad:
        new, k = old.replace(":", "__"), 0
        while new in taken:
            k += 1
            new = f"{old.replace(':', '__')}_{k}"
        taken.add(new)
        renamed[old] = new
    for n in model.graph.node:
        n.input[:] = [renamed.get(t, t) for t in n.input]
        n.output[:] = [renamed.get(t, t) for t in n.output]
    for v in (*model.graph.output, *model.graph.value_info):
        v.name = renamed.get(v.name, v.name)
    return model, f"{len(bad)} output tensor name(s) with ':' renamed as onnx2tf names them ({bad[0]!r} -> {renamed[bad[0]]!r})"


def _scope_ok(name: str) -> bool:
    return bool(_SCOPE_FIRST.match(name)) and not _SCOPE_REST.search(name)
