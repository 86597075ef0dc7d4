"""Tiny data helpers for the INT8 tests (issue 28): samples made here, no download."""
from __future__ import annotations

import numpy as np


def sample_set(rng, n: int, shape: tuple, name: str = "x"):
    """``n`` normal samples of one float input ``name`` of shape ``[1, *shape]``, as the pipeline's SampleSet."""
    from edgebuild.calibration.dataset import SampleSet

    return SampleSet("samples", {name: rng.normal(0, 1, (n, *shape)).astype(np.float32)}, shapes={name: (1, *shape)})


def outlier_chain(path, rng, outliers=(0, 3), width: int = 32, depth: int = 6, big: float = 1000.0):
    """An MLP of ``depth`` MatMuls (m1..m<depth>, 16 inputs, 4 class scores) in which the input of each layer in
    ``outliers`` (0-based) has one channel ``big`` times the others, undone by that layer's weights: the FP32 model is
    an ordinary classifier, but a per-tensor int8 range on those inputs wastes every level on one channel, so exactly
    those layers must stay float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sizes = [16] + [width] * (depth - 1) + [4]
    ws = [rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    nodes, inits, x = [], [], "x"
    for i in outliers:
        if i > 0:
            ws[i - 1][:, 0] *= big  # the layer before makes channel 0 of layer i's input huge
        ws[i][0] /= big  # ... which layer i undoes
    for i, w in enumerate(ws, 1):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"m{i}"))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def outlier_input(rng, n: int, big: float = 1000.0):
    """Samples for ``outlier_chain`` with outlier 0 (the model input itself): channel 0 ``big`` times the others."""
    from edgebuild.calibration.dataset import SampleSet

    x = rng.normal(0, 1, (n, 16)).astype(np.float32)
    x[:, 0] *= big
    return SampleSet("samples", {"x": x}, shapes={"x": (1, 16)})
