"""TFLite INT8 of a transformer: LayerNorm, Softmax and GELU stay float (the ``transformer_float`` setting).

TFLite has no int8 LayerNorm: TF lowers it to MEAN, SQUARED_DIFFERENCE, RSQRT, MUL, SUB and ADD, each quantized per
tensor, and a mean or a variance whose range is a hundredth of its input's loses most of its bits. GELU's
``x * 0.5 * (1 + erf(x / sqrt(2)))`` (erf as tanh, targets/tflite/rewrite/ops.py) is five int8 ops in a row, and the
attention Softmax reads logits that share one int8 scale with the mask. Measured on the real 3-layer MiniLM sentence
encoder (paraphrase-MiniLM-L3-v2; per-tensor error against the FP32 .tflite of the same graph): all-int8, the first
LayerNorm's output already had a relative RMS error of 0.22 and the pooled embedding a cosine of 0.78 to FP32. With
what is listed here float: 0.987 (the task's budget: 0.98), 96.5 % of the weights int8 (the embedding tables and
every weighted MatMul but one), 198 of 210 ops in 2 XNNPACK partitions, 2.07x the FP32 speed on the host.
ONNX Runtime's and NNCF's transformer recipes keep the same ops float (targets/onnx/static.py, targets/openvino.py).

Also float: attention's products of two activations (XNNPACK has no int8 BATCH_MATMUL of two activations: in int8
they ran on LiteRT's own kernels between XNNPACK partitions), the scaling and mask arithmetic before each Softmax
(``(1 - mask) * -3.4e38`` calibrates to an int8 scale of 1.3e36, which LiteRT aborts on), and the feed-forward outlier:
BERT-style encoders have a few hidden dimensions with outlier activations, and in MiniLM layer 0's second
feed-forward MatMul spans [-5.7, 192] (its residual Add [-10, 214]) where the other MatMul outputs span about 10; with
LayerNorm, Softmax and GELU float but those two int8 the cosine was 0.854, with them float too 0.987
(targets/tflite/mixed.py ``outlier_ops``, found on the calibrated ranges).

``float_nodes`` names the ONNX nodes when the graph has attention (targets/regions.py ``is_transformer``); the
conversion child keeps their TFLite ops float like the accuracy search's float layers (targets/tflite/mixed.py).
"""
from __future__ import annotations

from pathlib import Path

FLOAT_OPS = ("LayerNormalization", "Softmax", "Gelu")
GELU_GLUE = ("Div", "Mul", "Add")  # x / sqrt(2) before the Erf; + 1, * x, * 0.5 after it
MASK_GLUE = ("Add", "Sub", "Mul", "Div", "Where", "Cast", "Unsqueeze", "Expand", "Reshape", "Equal", "Not")


def float_nodes(onnx_path: Path | str) -> list[str]:
    """The names of the LayerNormalization, Softmax and GELU nodes (``Gelu``, or an ``Erf`` with the Div before it
    and the Add/Mul after it), the MatMuls of two activations and the scaling/mask arithmetic before each Softmax, of
    a graph with attention; [] for any other graph."""
    import onnx

    from edgebuild.targets.regions import graph_index, is_transformer

    if not is_transformer(onnx_path):
        return []
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer, consumers = graph_index(graph)
    constant = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    keep = {id(n) for n in graph.node if n.op_type in FLOAT_OPS}
    # attention's products of two activations (Q K^T, P V): XNNPACK has no int8 BATCH_MATMUL of two activations, so
    # in int8 they ran on LiteRT's reference kernels between partitions; in float XNNPACK takes them
    keep.update(id(n) for n in graph.node if n.op_type == "MatMul" and not any(i in constant for i in n.input))
    # what the attention Softmax reads: the 1/sqrt(d) scaling and the mask arithmetic ((1 - mask) * -3.4e38: an
    # int8 scale of 1.3e36, which XNNPACK refuses and LiteRT's int8 SUB aborts on)
    todo = [producer.get(n.input[0]) for n in graph.node if n.op_type == "Softmax"]
    while todo:
        n = todo.pop()
        if n is None or id(n) in keep or n.op_type not in MASK_GLUE:
            continue
        keep.add(id(n))
        todo += [producer.get(i) for i in n.input if i not in constant]
    for erf in (n for n in graph.node if n.op_type == "Erf"):
        keep.add(id(erf))
        before = producer.get(erf.input[0])
        if before is not None and before.op_type in ("Div", "Mul"):
            keep.add(id(before))
        frontier = [erf]
        for _ in range(3):  # (1 + erf) -> x * that -> * 0.5, in whichever order the exporter wrote them
            frontier = [c for n in frontier for o in n.output for c in consumers.get(o, []) if c.op_type in GELU_GLUE]
            keep.update(id(n) for n in frontier)
    return [n.name for n in graph.node if id(n) in keep and n.name]
