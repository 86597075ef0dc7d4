"""Outputs that are an input, unchanged (``output = Identity(input_ids)``, as sentence-transformers exports give).

onnx2tf drops such an output (the Keras graph has nothing to compute for it), so the TF graph has fewer outputs
than the ONNX model and the conversion used to end there. The TFLite model is converted without them; its
``io["outputs"]`` keeps them in their place as ``{"name", "from_input"}``, and a runner returns the input it was
given. The artifact's notes and metadata say which outputs the ``.tflite`` does not compute.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def find(onnx_path: Path) -> dict[str, str]:
    """{output name: input name} for each graph output that is a graph input, directly or through Identity nodes."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input and n.output}
    found = {}
    for out in graph.output:
        name = out.name
        while name in identity and name not in inputs:
            name = identity[name]
        if name in inputs:
            found[out.name] = name
    return found


def trimmed_copy(onnx_path: Path, drop: dict[str, str], dest: Path) -> Path:
    """A copy of the model without the pass-through outputs ``drop`` (what onnx2tf converts)."""
    import onnx

    model = onnx.load(str(onnx_path))
    kept = [o for o in model.graph.output if o.name not in drop]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(dest))
    return dest


def spec(name: str, from_input: str, source_shape, source_dtype: str) -> dict:
    """The ``io["outputs"]`` entry of an output the ``.tflite`` does not compute."""
    return {"name": name, "from_input": from_input, "source_shape": list(source_shape), "source_dtype": source_dtype}


def value(entry: dict, feed: dict[str, np.ndarray]) -> np.ndarray:
    """What a runner returns for a pass-through output: the input it was fed, as float like every output."""
    return np.asarray(feed[entry["from_input"]]).astype(np.float32)
