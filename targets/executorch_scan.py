"""Recurrent layers for ExecuTorch as a loop, not an unrolled graph (run in the converter child only).

ExecuTorch 1.5.1 has no recurrent op for XNNPACK: torch's decomposition unrolls an LSTM/GRU/RNN into one Linear and
gate chain per layer and time step, and ``to_edge_transform_and_lower`` runs its pass pipeline over every node
(about 2.3 s a step for a 3-layer LSTM(256): 6 min per conversion at 160 steps). Here each recurrent op becomes:

- the input projection of every step at once (one Linear over [T*B, I], outside the loop), and
- ``torch.scan`` over time of the recurrent cell (one Linear per gate on h, the gate non-linearities), whose body
  ExecuTorch's emitter writes as a loop of jump instructions.

The cost of lowering no longer grows with the number of steps (Resemblyzer's encoder: 23-25 s a conversion; its
FP32 .pte 7.0 ms on this 2-core host, PyTorch eager ~6 ms). What the stock flow lacks, added here: XNNPACK's
partitioner only tags the top-level graph (``scan_partitioner`` tags each loop body too, so the cell runs as one
XNNPACK delegate per step), and it takes a Linear only with constant weights, while ``torch.export`` passes the
weights a loop body closes over as loop inputs (``body_constants`` makes them constants of the body again, and
writes the edge dialect's ``mm(x, permute(W))`` as a Linear).

Quantized (``quantized=True``): the weights of both projections are int8 per output channel and the activations are
quantized per run (dynamic, XNNPACK's QD8 x QC8W): a static per-tensor scale for h over every step would be set by
the largest step. Recurrent ops with projections (``proj_size``) keep torch's unrolled form (``supported``)."""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LOOP_PREFIX = "edgebuild_scan_"  # the loop modules' names in the rewritten graph
GATES = {"lstm.input": 4, "gru.input": 3, "rnn_tanh.input": 1, "rnn_relu.input": 1}


def op_name(node) -> str:
    """A call's ATen op as ``lstm.input``."""
    return str(node.target).replace("aten.", "")


def supported(gm) -> list[str]:
    """The recurrent ops of ``gm`` this module rewrites (every one, or none: a graph keeps one form). An op in
    training mode with dropout is not taken (the loop has no dropout)."""
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) in GATES]
    if not ops or not all(_layer_params(gm, n) is not None and not (n.args[6] and n.args[5]) for n in ops):
        return []
    return sorted({op_name(n) for n in ops})


def _layer_params(gm, node):
    """Per layer and direction, (w_ih, w_hh, b_ih, b_hh) as tensors; None when a weight is computed in the graph or
    the op has projections."""
    import torch

    params, has_bias, layers, bidirectional = node.args[2], node.args[3], node.args[4], node.args[7]
    per = 4 if has_bias else 2
    dirs = 2 if bidirectional else 1
    if len(params) != per * layers * dirs or any(p.op != "get_attr" for p in params):
        return None
    tensors = [attrgetter(p.target)(gm).detach() for p in params]
    groups = []
    for k in range(layers * dirs):
        w_ih, w_hh, *bias = tensors[k * per:(k + 1) * per]
        b_ih, b_hh = bias if bias else (torch.zeros(w_ih.shape[0], dtype=w_ih.dtype),) * 2
        groups.append((w_ih, w_hh, b_ih, b_hh))
    return groups


def to_scan(gm, quantized: bool, float_layers: dict[str, set[int]] | None = None) -> list[str]:
    """Replace each recurrent op of ``gm`` by a ``ScanRecurrent`` submodule (in place); the ops replaced.
    ``float_layers``: per recurrent node name, the layers whose weights stay float in a quantized program (the
    accuracy search's float islands). A node named there that is not in ``gm`` is a ValueError."""
    ops = supported(gm)
    if not ops:
        return []
    if quantized:
        import torchao.quantization.pt2e  # noqa: F401 — registers the quantized_decomposed ops
    recurrent = [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) in GATES]
    unknown = set(float_layers or {}) - {n.name for n in recurrent}
    if unknown:
        raise ValueError(f"float layers name no recurrent op of the program: {', '.join(sorted(unknown))}")
    beyond = [f"{n.name}@{i}" for n in recurrent for i in (float_layers or {}).get(n.name, ()) if i >= n.args[4]]
    if beyond:
        raise ValueError(f"float layers beyond their op's layers: {', '.join(beyond)}")
    for k, node in enumerate(recurrent):
        kind, dirs = op_name(node), 2 if node.args[7] else 1
        floats = (float_layers or {}).get(node.name, set())
        module = loop_module_class()(kind, _layer_params(gm, node), node.args[4], node.args[7], node.args[8],
                               {g for g in range(node.args[4] * dirs) if quantized and g // dirs not in floats})
        name = f"{LOOP_PREFIX}{k}"
        gm.add_submodule(name, module)
        hx = node.args[1]
        states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0], *states))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        weights = list(node.args[2])
        gm.graph.erase_node(node)
        for holder in weights:  # the op's own weights, now held by the loop module
            if not holder.users:
                gm.graph.erase_node(holder)
                owner, _, attr = holder.target.rpartition(".")
                if not any(n.op == "get_attr" and n.target == holder.target for n in gm.graph.nodes):
                    delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return ops


def _quantize_channels(w: torch.Tensor):
    """int8 symmetric per output channel: (q, scale, zero point)."""
    import torch

    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(torch.float32)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale, torch.zeros_like(scale, dtype=torch.int64)


def loop_module_class():
    """``ScanRecurrent`` (torch is imported here, not with the module: every target module is imported to list the
    targets)."""
    import torch

    class ScanRecurrent(torch.nn.Module):
        """An LSTM/GRU/RNN op (torch's argument layout) as per-layer input projections and a ``torch.scan`` cell."""

        def __init__(self, kind: str, groups, layers: int, bidirectional: bool, batch_first: bool, quantized: set[int]):
            """``groups``: per layer and direction (layer * directions + direction), its weights; ``quantized``: the
            groups whose weights are int8 (the others stay float)."""
            super().__init__()
            self.kind, self.gates, self.layers = kind, GATES[kind], layers
            self.dirs, self.batch_first, self.quantized = 2 if bidirectional else 1, batch_first, set(quantized)
            self.hidden = groups[0][1].shape[1]
            for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(groups):
                h = self.hidden
                # the input projection carries both biases, but GRU's b_hn, which r multiplies
                b_hh_in = torch.cat([b_hh[:2 * h], torch.zeros_like(b_hh[:h])]) if kind == "gru.input" else b_hh
                b_in = b_ih + b_hh_in
                self._weight(f"ih{k}", w_ih, k)
                self.register_buffer(f"b_in{k}", b_in.contiguous())
                for g in range(self.gates):
                    self._weight(f"hh{k}_{g}", w_hh[g * h:(g + 1) * h], k)
                if kind == "gru.input":
                    self.register_buffer(f"b_hn{k}", b_hh[2 * h:].clone())

        def _weight(self, name: str, w: torch.Tensor, group: int) -> None:
            if group in self.quantized:
                q, scale, zero = _quantize_channels(w)
                self.register_buffer(name + "_q", q)
                self.register_buffer(name + "_s", scale)
                self.register_buffer(name + "_z", zero)
            else:
                self.register_buffer(name, w.clone(memory_format=torch.contiguous_format))  # a slice: its own storage

        def weight_tensors(self) -> list[tuple[torch.Tensor, bool]]:
            """Its buffers as (tensor, whether it is a quantization scale rather than a weight)."""
            return [(t, name.endswith("_s")) for name, t in self.named_buffers()]

        def _linear(self, x, name: str, bias=None):
            if not hasattr(self, name + "_q"):
                return torch.nn.functional.linear(x, getattr(self, name), bias)
            qd = torch.ops.quantized_decomposed
            scale, zero = qd.choose_qparams.tensor(x, -128, 127, 2 ** -12, torch.int8)
            x = qd.dequantize_per_tensor.tensor(qd.quantize_per_tensor.tensor(x, scale, zero, -128, 127, torch.int8),
                                                scale, zero, -128, 127, torch.int8)
            w = qd.dequantize_per_channel.default(getattr(self, name + "_q"), getattr(self, name + "_s"),
                                                  getattr(self, name + "_z"), 0, -127, 127, torch.int8)
            return torch.nn.functional.linear(x, w, bias)

        def forward(self, x, *states):
            from torch._higher_order_ops.scan import scan

            seq = x.transpose(0, 1) if self.batch_first else x  # [T, B, I]
            steps, batch = seq.shape[0], seq.shape[1]
            finals: list[list[torch.Tensor]] = [[] for _ in states]
            for layer in range(self.layers):
                outs = []
                for d in range(self.dirs):
                    k = layer * self.dirs + d
                    src = seq.flip(0) if d else seq
                    proj = self._linear(src.reshape(steps * batch, src.shape[-1]), f"ih{k}", getattr(self, f"b_in{k}"))
                    proj = proj.reshape(steps, batch, self.gates * self.hidden)
                    xs = [proj[..., g * self.hidden:(g + 1) * self.hidden].contiguous() for g in range(self.gates)]
                    init = tuple(s[k] for s in states)
                    carry, ys = scan(lambda c, gx, k=k: self._cell(k, c, gx), init, xs)
                    for f, c in zip(finals, carry):
                        f.append(c)
                    outs.append(ys.flip(0) if d else ys)
                seq = outs[0] if self.dirs == 1 else torch.cat(outs, dim=-1)
            out = seq.transpose(0, 1) if self.batch_first else seq
            return (out, *(torch.stack(f) for f in finals))

        def _cell(self, k: int, carry, gx):
            h = carry[0]
            rec = [self._linear(h, f"hh{k}_{g}", getattr(self, f"b_hn{k}") if self.kind == "gru.input" and g == 2
                                else None) for g in range(self.gates)]
            if self.kind == "lstm.input":
                i, f = torch.sigmoid(gx[0] + rec[0]), torch.sigmoid(gx[1] + rec[1])
                g, o = torch.tanh(gx[2] + rec[2]), torch.sigmoid(gx[3] + rec[3])
                c = f * carry[1] + i * g
                h = o * torch.tanh(c)
                return (h, c), h.clone()
            if self.kind == "gru.input":
                r, z = torch.sigmoid(gx[0] + rec[0]), torch.sigmoid(gx[1] + rec[1])
                n = torch.tanh(gx[2] + r * rec[2])
                h = (1 - z) * n + z * h
                return (h,), h.clone()
            pre = gx[0] + rec[0]
            h = torch.tanh(pre) if self.kind == "rnn_tanh.input" else torch.relu(pre)
            return (h,), h.clone()

    return ScanRecurrent


def body_constants():
    """An ExecuTorch program pass: the parameters, buffers and constants a loop body receives as loop inputs become
    constants of the body (XNNPACK takes a Linear only with constant weights), and the top-level ones left unused
    are dropped."""
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult

    class BodyConstants(ExportedProgramPassBase):
        def call(self, ep):
            moved = _constants_into_bodies(ep)
            return ExportedProgramPassResult(ep, bool(moved))

    return BodyConstants()


def _constants_into_bodies(ep) -> int:
    import copy

    import torch
    from torch.export.graph_signature import InputKind

    kinds = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs if s.kind in kinds}
    gm, moved = ep.graph_module, 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.scan]:
        body = getattr(gm, node.args[0].target)
        init, xs, extra = node.args[1], node.args[2], list(node.args[3])
        holders = [p for p in body.graph.nodes if p.op == "placeholder"][len(init) + len(xs):]
        keep = []
        for arg, holder in zip(extra, holders):
            spec = specs.get(arg.name)
            if spec is None:
                keep.append(arg)
                continue
            value = ep.constants[spec.target] if spec.kind == InputKind.CONSTANT_TENSOR else ep.state_dict[spec.target]
            _holder_to_attr(body, holder, value.detach(), f"_edgebuild_{spec.target.replace('.', '_')}")
            moved += 1
        node.args = (node.args[0], init, xs, tuple(keep))
        body.graph.lint()
        body.recompile()
    if not moved:
        return 0
    unused = [s for s in ep.graph_signature.input_specs if s.kind in kinds
              and not any(n.op == "placeholder" and n.name == s.arg.name and n.users for n in gm.graph.nodes)]
    signature = copy.deepcopy(ep.graph_signature)
    for spec in unused:
        signature.input_specs.remove(next(s for s in signature.input_specs if s.arg.name == spec.arg.name))
        store = ep.constants if spec.kind == InputKind.CONSTANT_TENSOR else ep._state_dict
        store.pop(spec.target, None)
        gm.graph.erase_node(next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name))
    ep._graph_signature = signature
    gm.recompile()
    return moved


def _holder_to_attr(body, holder, value, attr: str) -> None:
    """Replace a body placeholder by a constant attribute named ``attr`` (unique in the program); a Linear the edge
    dialect wrote as ``mm(x, permute(W))`` (``addmm`` with a bias) is a Linear again: XNNPACK, given the permute,
    transposed W at every step (66 ms against 9 ms for Resemblyzer's LSTM), and, given a transposed constant, read
    it as a Linear's weight (wrong results)."""
    from executorch.exir.dialects._ops import ops as exir_ops

    body.register_buffer(attr, value.clone())
    with body.graph.inserting_before(holder):
        const = body.graph.get_attr(attr)
    const.meta = dict(holder.meta)
    holder.replace_all_uses_with(const)
    body.graph.erase_node(holder)
    edge = exir_ops.edge.aten
    for user in list(const.users):  # mm(x, W^T) / addmm(b, x, W^T), as the edge dialect writes a Linear
        if user.target != edge.permute_copy.default or list(user.args[1]) != [1, 0]:
            continue
        for mm in [u for u in user.users if u.target in (edge.mm.default, edge.addmm.default)]:
            plain = mm.target == edge.mm.default
            if mm.args[1 if plain else 2] is not user or mm.kwargs:
                continue  # W^T as the input, or addmm's beta/alpha: not a Linear
            args = (mm.args[0], const) if plain else (mm.args[1], const, mm.args[0])
            with body.graph.inserting_before(mm):
                linear = body.graph.call_function(edge.linear.default, args)
            linear.meta = dict(mm.meta)
            mm.replace_all_uses_with(linear)
            body.graph.erase_node(mm)
        if not user.users:
            body.graph.erase_node(user)


def scan_partitioner():
    """XNNPACK's partitioner, which tags the top-level graph, extended to the bodies of ``torch.scan`` loops: each
    body's nodes are tagged by the same XNNPACK configs (their own tag names). A body's per-step output copy stays
    outside (XNNPACK takes no output that is also the carried state)."""
    import copy

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.backend.partitioner import Partitioner, PartitionResult
    from executorch.exir.graph_module import get_control_flow_submodules

    class ScanPartitioner(Partitioner):
        def __init__(self):
            self.inner = XnnpackPartitioner()
            super().__init__()
            self.delegation_spec = self.inner.delegation_spec

        def ops_to_not_decompose(self, ep):
            return self.inner.ops_to_not_decompose(ep)

        def partition(self, ep):
            tags = dict(self.inner.partition(ep).partition_tags)
            for k, (_name, body, _node) in enumerate(get_control_flow_submodules(ep.graph_module)):
                view = copy.copy(ep)  # the XNNPACK configs read the program's signature and its graph module
                view._graph_module = body
                inner = self.inner.partition(view).partition_tags
                outputs = set(body.graph.output_node().all_input_nodes)
                for n in body.graph.nodes:
                    tag = n.meta.get("delegation_tag")
                    if tag is None or tag.startswith("scan"):
                        continue
                    if n in outputs and "clone" in str(n.target):  # the per-step output's copy of a carried state
                        del n.meta["delegation_tag"]
                    else:
                        n.meta["delegation_tag"] = f"scan{k}_{tag}"
                tags.update({f"scan{k}_{t}": spec for t, spec in inner.items()})
            return PartitionResult(tagged_exported_program=ep, partition_tags=tags)

    return ScanPartitioner()
