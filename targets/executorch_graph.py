"""The torch program side of the ExecuTorch backend (targets/executorch.py): what is done to the torch.export program
before XNNPACK lowers it, and what is read from it after.

- ``prelu_for_xnnpack``: PReLU on tensors that are not 4-D rewritten (XNNPACK's layout pass asserts on them);
- ``half_module``: the module in FP16 behind float32 I/O;
- ``quantize_pt2e``: PT2E with the XNNPACK quantizer (recurrent ops unrolled first, float layers filtered out);
- ``int8_share``: the share of the weights held as int8 after convert;
- ``onnx_scope_module`` / ``float_nodes``: the FP32 ONNX node names of the search mapped to the torch program's nodes;
- ``delegation``: XNNPACK's partitions and the ops left to the portable kernels.

Everything here runs in the converter child (targets/isolated.py), like the conversion that calls it.
"""
from __future__ import annotations

import re

import numpy as np

from edgebuild.errors import ConversionError
from edgebuild.targets.executorch_scan import GATES, LOOP_PREFIX, op_name, supported, to_scan


PRELU_OPS = ("aten._prelu_kernel.default", "aten.prelu.default")


def prelu_for_xnnpack(ep, example):
    """PReLU on a tensor that is not 4-D (after a Linear: MTCNN's RNet/ONet) written as relu(x) - w * relu(-x):
    ExecuTorch 1.5.1's XNNPACK layout pass (ChannelsLastTaggedReshapePass) asserts on it ("non-NHWC compatible
    node"), failing the whole lowering, FP32 too. 4-D PReLU stays one op. Returns the program and how many."""
    import torch

    gm = ep.module()
    aten = torch.ops.aten
    found = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in PRELU_OPS
             and getattr(n.args[0].meta.get("val"), "dim", lambda: 4)() != 4]
    if not found:
        return ep, 0
    graph = gm.graph
    for n in found:
        x, w = n.args[0], n.args[1]
        rank = x.meta["val"].dim()
        with graph.inserting_before(n):
            if rank > 2:  # the weight is per channel (dim 1): [C] -> [C, 1, ...] to broadcast over the rest
                w = graph.call_function(aten.reshape.default, (w, [-1] + [1] * (rank - 2)))
            pos = graph.call_function(aten.relu.default, (x,))
            neg = graph.call_function(aten.relu.default, (graph.call_function(aten.neg.default, (x,)),))
            out = graph.call_function(aten.sub.Tensor, (pos, graph.call_function(aten.mul.Tensor, (neg, w))))
        n.replace_all_uses_with(out)
        graph.erase_node(n)
    gm.recompile()
    return torch.export.export(gm, example, strict=False), len(found)


def half_module(module):
    """``module`` in FP16 behind float32 I/O: floating inputs cast to half on entry, floating outputs back to float32
    on exit (XNNPACK runs the casts), so the .pte takes and gives what the source model does."""
    import torch

    class HalfWrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.half()

        def forward(self, *args):
            args = [a.half() if a.is_floating_point() else a for a in args]
            out = self.inner(*args)
            leaves = torch.utils._pytree.tree_leaves(out)
            return tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in leaves)

    return HalfWrapper(module)


def quantize_pt2e(ep, example, precision: str, s: dict, calib, job: dict):
    """PT2E: prepare with XNNPACKQuantizer, calibrate (static) or observe the weights (dynamic), convert, re-export."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgebuild.targets.isolated import set_phase

    dynamic = precision == "dynamic"
    config = get_symmetric_quantization_config(is_per_channel=bool(s.get("per_channel", True)), is_dynamic=dynamic)
    if not dynamic and s.get("observer", "minmax") == "minmax":
        config = _with_minmax_activations(config)
    quantizer = XNNPACKQuantizer().set_global(config)
    record: dict = {"quantizer": "executorch XNNPACKQuantizer (PT2E, torchao.quantization.pt2e)",
                    "weights": "int8 symmetric " + ("per-channel" if s.get("per_channel", True) or dynamic else "per-tensor")}
    gm = ep.module()
    if not supported(gm):
        ep, record["recurrent_unrolled"] = unroll_recurrent(ep)
        gm = ep.module()
    recurrent_floats: dict[str, set[int]] = {}
    if s.get("float_layers"):
        kept, floats = float_nodes(gm, s["float_layers"], job)
        for name in (f for f in floats if LAYER_MARK in f):  # an unrolled graph has no recurrent op to name
            node, layer = name.split(LAYER_MARK)
            recurrent_floats.setdefault(node, set()).add(int(layer))
        quantizer.set_filter_function(lambda n: n.name not in floats)
        record["float_layers_kept"] = kept
    set_phase("PT2E prepare")
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        if dynamic or calib is None:
            set_phase("observing the weights (dynamic INT8)")
            prepared(*example)
        else:
            names = [i["name"] for i in job["inputs"]]
            for i in range(len(calib)):
                set_phase(f"calibrating ({i + 1}/{len(calib)} samples)")
                feed = calib.feed(i)
                prepared(*(torch.from_numpy(np.array(feed[n], copy=True)) for n in names))
    set_phase("PT2E convert")
    converted = convert_pt2e(prepared)
    scanned = to_scan(converted, quantized=True, float_layers=recurrent_floats)
    if scanned:
        record["recurrent_scan"] = scanned
        record["recurrent_weights"] = "int8 symmetric per-channel (the loop form's, whatever per_channel says)"
        record["recurrent_activations"] = "float, quantized per run (dynamic)"
    record["activations"] = ("float, quantized per run (dynamic)" if dynamic else
                             f"int8 per-tensor, {s.get('observer', 'minmax')} ranges")
    set_phase("re-exporting the quantized program")
    record["int8_weight_share"] = round(int8_share(converted), 4)
    return torch.export.export(converted, example, strict=False), record


def recurrent_as_scan(ep, example):
    """A float program's LSTM/GRU/RNN ops as ``torch.scan`` loops (targets/executorch_scan.py); the ops rewritten."""
    import torch

    gm = ep.module()
    scanned = to_scan(gm, quantized=False)
    if not scanned:
        return ep, []
    return torch.export.export(gm, example, strict=False), scanned


RECURRENT_OPS = tuple(GATES)
RECURRENT_ONNX = ("LSTM", "GRU", "RNN")
LAYER_MARK = "@"  # "<recurrent node>@<layer>": a float layer inside a recurrent op


def recurrent_ops(graph) -> list[str]:
    """The LSTM/GRU/RNN ops of a torch.export graph."""
    present = {op_name(n) for n in graph.nodes if n.op == "call_function"}
    return [name for name in RECURRENT_OPS if name in present]


def unroll_recurrent(ep):
    """LSTM/GRU/RNN ops, when the loop form (executorch_scan.py) does not take one of them (projections), decomposed
    into their per-step Linear and gate ops (torch's own decompositions) before PT2E:
    the XNNPACK quantizer has no pattern for the fused recurrent op, which would leave its weights float; unrolled,
    each weight is one int8 constant shared by every step. Returns the program and the ops unrolled."""
    import torch
    from torch._decomp import get_decompositions

    ops = recurrent_ops(ep.graph)
    if not ops:
        return ep, []
    table = get_decompositions([getattr(torch.ops.aten, name.split(".")[0]).input for name in ops])
    return ep.run_decompositions(table), ops


def _with_minmax_activations(config):
    """The static config with min-max activation observers instead of XNNPACK's histogram ones."""
    import dataclasses

    from torchao.quantization.pt2e import MinMaxObserver

    spec = config.input_activation
    act = dataclasses.replace(spec, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    return dataclasses.replace(config, input_activation=act, output_activation=act)


def int8_share(gm) -> float:
    """Share of the weight elements held as int8 after PT2E convert (the rest stays float), the weights of recurrent
    loop modules (executorch_scan.py) included."""
    import torch

    tensors = []
    seen = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith(LOOP_PREFIX):
            tensors += gm.get_submodule(node.target).weight_tensors()
        if node.op != "get_attr" or node.target in seen:
            continue
        seen.add(node.target)
        tensors.append((_attr(gm, node.target), _is_quant_param(node)))
    int8 = total = 0
    for t, is_scale in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() < 2:
            continue
        if t.dtype == torch.int8:
            int8 += t.numel()
            total += t.numel()
        elif t.is_floating_point() and not is_scale:
            total += t.numel()
    return int8 / total if total else 0.0


def _is_quant_param(node) -> bool:
    """Scales and zero points of per-channel quantization are attributes too; they are not weights."""
    return any("quantize" in str(getattr(u, "target", "")) and u.args and u.args[0] is not node for u in node.users)


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


SCOPE_OPS = {"Conv": ("conv",), "ConvTranspose": ("conv_transpose",), "Gemm": ("linear", "addmm", "mm"),
             "MatMul": ("linear", "matmul", "mm", "bmm"), "Add": ("add",), "Mul": ("mul",), "Concat": ("cat",),
             "Relu": ("relu",), "AveragePool": ("avg_pool",), "GlobalAveragePool": ("adaptive_avg_pool", "mean")}


def onnx_scope_module(onnx_name: str) -> tuple[str, str] | None:
    """(torch module path, ONNX op type) of a node name the TorchScript-based exporter wrote, e.g.
    ``/layer1/layer1.0/conv1/Conv`` -> ("layer1.0.conv1", "Conv"); ``/features/features.3/Conv`` -> ("features.3",
    "Conv"). A scope part "seq.0" under "seq" is that Sequential's child 0. None for other names."""
    if not onnx_name.startswith("/"):
        return None
    parts = onnx_name.strip("/").split("/")
    op = re.sub(r"_\d+$", "", parts[-1])
    path: list[str] = []
    for part in parts[:-1]:
        if path and part.startswith(path[-1] + "."):  # "layer1.0" under "layer1": the child, named in full
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path), op


def float_nodes(gm, layers, job: dict) -> tuple[dict[str, list[str]], set[str]]:
    """FX nodes of the torch program that each ONNX layer came from: the module path its ONNX scope names, ops of the
    ONNX op's kind (a Conv's conv, a Gemm's linear); a dynamo-exported name ``node_<fx name>`` names the node itself.
    An ONNX LSTM/GRU/RNN (one per layer: ``LSTM``, ``LSTM_1``...) names one layer of the torch op:
    ``<node>@<layer>``, kept float by its loop form (executorch_scan.py). A layer that maps to no node is a
    ConversionError (the try fails; nothing stays float silently)."""
    by_module: dict[str, list] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            stack = n.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            by_module.setdefault(_plain_path(path), []).append(n)
    names = {n.name for n in gm.graph.nodes}
    kept: dict[str, list[str]] = {}
    for layer in layers:
        scoped = onnx_scope_module(layer)
        recurrent = [n for n in by_module.get(scoped[0], []) if op_name(n) in RECURRENT_OPS] \
            if scoped is not None and scoped[1] in RECURRENT_ONNX else []
        if recurrent:
            hits = [_recurrent_layer(recurrent, layer, job)]
        elif scoped is not None:
            path, op = scoped
            kinds = SCOPE_OPS.get(op)
            hits = [n.name for n in by_module.get(path, [])
                    if kinds is None or any(k in str(n.target) for k in kinds)]
        else:
            bare = layer[len("node_"):] if layer.startswith("node_") else layer
            hits = [bare] if bare in names else []
        if not hits:
            raise ConversionError(f"{job['target']}: float layer {layer} maps to no op of the torch program")
        kept[layer] = hits
    return kept, {h for hits in kept.values() for h in hits}


def _recurrent_layer(nodes, layer: str, job: dict) -> str:
    """``<node>@<layer>`` of an ONNX LSTM/GRU/RNN name: the exporter writes one ONNX node per layer and call, numbered
    on through the scope (``LSTM``, ``LSTM_1``, ...), so the n-th is found by counting the layers of the scope's
    recurrent ops in graph order."""
    suffix = re.search(r"_(\d+)$", layer)
    index = int(suffix.group(1)) if suffix else 0
    for node in nodes:
        if index < node.args[4]:
            return f"{node.name}{LAYER_MARK}{index}"
        index -= node.args[4]
    raise ConversionError(f"{job['target']}: float layer {layer} is past the {sum(n.args[4] for n in nodes)} "
                          "recurrent layers of its scope in the torch program")


def _plain_path(path: str) -> str:
    """nn_module_stack paths of a re-exported module may read ``L['self'].layer1[0]``: as ``layer1.0``."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).strip(".")


def delegation(gm) -> dict:
    """How much of the program XNNPACK took: its partitions and the ops left to ExecuTorch's portable kernels (in
    the bodies of recurrent loops too)."""
    delegates, outside = 0, set()
    graphs = [gm.graph] + [getattr(gm, n.args[0].target).graph for n in gm.graph.nodes
                           if n.op == "call_function" and getattr(n.target, "__name__", "") == "scan"]
    for n in (n for graph in graphs for n in graph.nodes):
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", str(n.target))
        if "executorch_call_delegate" in name:
            delegates += 1
        elif name != "getitem" and "getitem" not in name:
            outside.add(re.sub(r"^(aten|dim_order_ops)[._]", "", name.split("::")[-1]))
    return {"xnnpack_partitions": delegates, "ops_outside_xnnpack": sorted(outside)}
