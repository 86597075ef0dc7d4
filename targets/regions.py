"""Graph regions INT8 should leave in float from the start: a signal-processing front-end and a post-processing tail.

A front-end built from ops (an STFT, a constant-Q transform or a mel filterbank as Pad/Slice/Mul/Concat/Pow/Log...)
is everything between the model's inputs and its first weighted layer (a Conv, ConvTranspose, MatMul or Gemm with
constant weights, an LSTM/GRU), or, for a spectrogram whose transform is convolutions with fixed kernels, everything
up to its Log (``spectral_frontend``); a post-processing tail (box decoding, NonMaxSuppression, TopK) is everything between
the last weighted layer and the outputs. A plain CNN has a handful of ops there at most (a Transpose, a Sub/Div
normalization); a region of ``MIN_REGION`` ops or more, or one holding NMS/TopK or an output Softmax/Sigmoid
(``POST_OPS``), is kept in float: quantizing it costs
accuracy for no speed (it is a small share of the time): an audio-to-notes model's 192 constant-Q ops in 8-bit gave
an output cosine of 0.89 vs FP32, in float 0.9996. (Its INT8 graphs onnxruntime refused to load, "All inputs to
Concat must have same rank", were a name collision of the quantizer's, fixed in targets/onnx_islands.py.)
"""
from __future__ import annotations

from pathlib import Path

MIN_REGION = 12
WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN")
# a tail holding one of these stays float: NMS/TopK (post-processing), and the output activations whose 8-bit
# output loses what the task reads: a Softmax over 6625 CTC symbols quantized per tensor (step 1/255) ties the arg-max
# of near-equal symbols (PP-OCRv4's recogniser: alone it cost 20 of the INT8 loss 44, strings agreeing 10 %), a
# Sigmoid's small probabilities collapse to zero (a text detector's mask IoU 87 vs 90). They are a negligible share
# of the time and hold no weights.
POST_OPS = ("NonMaxSuppression", "TopK", "Softmax", "LogSoftmax", "Sigmoid")


def graph_index(graph) -> tuple[dict, dict[str, list]]:
    """(tensor -> the node producing it, tensor -> the nodes reading it, in graph order) of an ONNX graph (its own
    nodes, not its subgraphs'): the index every graph walk here and in the ONNX/OpenVINO backends starts from."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    return producer, consumers


def float_regions(onnx_path: Path | str) -> dict[str, list[str]]:
    """{"frontend": node names, "postprocess": node names}: the regions to keep float (empty lists when none)."""
    return {k: [n.name for n in v if n.name] for k, v in float_region_nodes(onnx_path).items()}


def float_region_nodes(onnx_path: Path | str) -> dict[str, list]:
    """``float_regions`` as ONNX NodeProtos, unnamed nodes included (a decode tail appended to an exported detector
    often has no node names; the TFLite backend finds their ops through their tensors, targets/tflite/mixed.py)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    constant = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer, consumers = graph_index(graph)

    def weighted(n) -> bool:
        return n.op_type in WEIGHTED and any(t in constant for t in n.input[1:] if t) or \
            (n.op_type in ("MatMul", "Gemm") and bool(n.input) and n.input[0] in constant)

    def reach(starts, step) -> list:
        seen, todo, out = set(), list(starts), []
        while todo:
            n = todo.pop()
            if id(n) in seen or weighted(n) or n.op_type == "Constant":
                continue
            seen.add(id(n))
            out.append(n)
            todo += step(n)
        return out

    inputs = {i.name for i in graph.input} - constant
    front = reach([c for t in inputs for c in consumers.get(t, [])],
                  lambda n: [c for o in n.output for c in consumers.get(o, [])])
    back = reach([producer[o.name] for o in graph.output if o.name in producer],
                 lambda n: [producer[t] for t in n.input if t in producer])
    if not any(weighted(n) for n in graph.node) or is_transformer(onnx_path):
        # attention's activation MatMuls carry no constant weights: the walk would run through every block (and the
        # transformer recipe already keeps LayerNorm, Softmax and the mask arithmetic float)
        return {"frontend": [], "postprocess": []}
    keep = lambda region, ops=(): len(region) >= MIN_REGION or any(n.op_type in ops for n in region)  # noqa: E731
    spectral = spectral_frontend(graph, inputs, producer)
    if len(spectral) >= MIN_REGION:
        front = [*spectral, *[n for n in front if id(n) not in {id(m) for m in spectral}]]
    return {"frontend": front if keep(front) else [], "postprocess": back if keep(back, POST_OPS) else []}


# ops of a learned network: a front-end holding one is no fixed signal processing
LEARNED_OPS = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
               "Clip", "Softmax", "LogSoftmax", "Softplus", "Mish", "Gelu", "BatchNormalization",
               "InstanceNormalization", "LayerNormalization", "GroupNormalization", "LSTM", "GRU", "RNN")


def spectral_frontend(graph, inputs: set[str], producer: dict) -> list:
    """A spectrogram computed inside the graph: the first Log reached from an input and everything it depends on,
    when no op of a learned network (``LEARNED_OPS``) is among them. Its convolutions hold fixed kernels (Spotify
    Basic Pitch's constant-Q transform: 26 Convs, Neg/stack for the real and imaginary parts, Sqrt of their squares,
    Log: 192 ops; a mel filterbank is a MatMul), so the first-weighted-layer walk stopped at its first Conv; 8-bit
    there cost the model its output (cosine 0.89), float there passes (issue 28)."""
    for log in (n for n in graph.node if n.op_type == "Log"):
        seen, todo, region, from_input = set(), [log], [], False
        while todo:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type in LEARNED_OPS:
                return []
            region.append(n)
            from_input = from_input or any(t in inputs for t in n.input)
            todo += [producer[t] for t in n.input if t in producer]
        if from_input:
            return [n for n in graph.node if id(n) in seen]
    return []


def describe(regions: dict[str, list[str]]) -> str | None:
    parts = [f"{len(v)} {k} op(s)" for k, v in regions.items() if v]
    return ("kept in float from the start: " + ", ".join(parts) + " (a signal-processing front-end before the first "
            "weighted layer / post-processing after the last)") if parts else None


ATTENTION_GLUE = ("Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Dropout", "Transpose", "Reshape")


def is_transformer(onnx_path: Path) -> bool:
    """Attention in the graph: a Softmax whose input comes from a MatMul (through scaling/mask arithmetic) and
    whose output feeds a MatMul — the pattern of every (self-)attention block, whatever the model's name."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer, consumers = graph_index(graph)

    def back(node, depth):
        if node is None or depth > 4:
            return False
        if node.op_type in ("MatMul", "Gemm"):
            return True
        return node.op_type in ATTENTION_GLUE and any(back(producer.get(t), depth + 1) for t in node.input)

    def forward(tensor, depth):
        for c in consumers.get(tensor, []):
            if c.op_type == "MatMul" or (depth < 3 and c.op_type in ATTENTION_GLUE and any(forward(o, depth + 1) for o in c.output)):
                return True
        return False

    return any(n.op_type == "Softmax" and back(producer.get(n.input[0]), 0) and forward(n.output[0], 0) for n in graph.node)
