"""The float island of an INT8 graph that fails to load or convert, found from the failure itself.

The search (stages/search.py ``recover``) calls :func:`error_island`, which asks :func:`find_island` which nodes to
keep in float so that the INT8 graph loads. Each question is a cheap check (an INT8 conversion calibrated on 1-2
samples: only whether the result loads matters, not its accuracy), at most ``max_checks`` of them; the island found is
then converted once for real and judged like any other try. The order of the questions:

1. the nodes the error names (onnxruntime: ``Node (NAME) Op (Concat) ...``; :func:`nodes_named_in`);
2. those nodes with everything upstream of them (the broken tensor is often made upstream of the node that trips on
   it: a quantizer's copy of a shared bias taking a tensor's name, targets/onnx_islands.py);
3. a bisection for loadability over the model's quantizable nodes in topological order: the shortest float prefix
   that loads (the failure sits inside it), then, with the checks left, the latest start of that prefix that still
   loads (a window ending at the failure rather than the whole front of the graph).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgebuild.pipeline.errors import EdgeBuildError
from edgebuild.pipeline.stages.candidate import Attempt
from edgebuild.pipeline.stages.search_state import Search, share_calibration
from edgebuild.specs import Precision
from edgebuild.targets.base import Backend
from edgebuild.targets.profiles import TargetProfile

MAX_CHECKS = 8  # cheap load checks per failed INT8 graph (a bisection over 2^6 = 64 nodes, or a coarser one)


def quantizable_order(onnx_path: Path | str) -> tuple[list[str], dict[str, set[str]]]:
    """The named nodes a quantizer sees, in topological order (ONNX graphs are stored sorted), and each one's direct
    producers among them. Nodes computed from constants only (folded into weights before quantizing, so a float
    layer naming them would name no node of the quantized graph) are left out."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    constant = {i.name for i in graph.initializer}
    order: list[str] = []
    producer: dict[str, str] = {}
    parents: dict[str, set[str]] = {}
    for n in graph.node:
        inputs = [t for t in n.input if t]
        if n.op_type == "Constant" or (inputs and all(t in constant for t in inputs)):
            constant.update(n.output)
            continue
        if not n.name:
            continue
        order.append(n.name)
        parents[n.name] = {producer[t] for t in inputs if t in producer}
        for o in n.output:
            producer[o] = n.name
    return order, parents


def upstream(nodes: list[str], parents: dict[str, set[str]]) -> set[str]:
    """``nodes`` and every node they depend on."""
    seen, todo = set(), list(nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(parents.get(n, ()))
    return seen


@dataclass
class Island:
    """What :func:`find_island` found: ``nodes`` (empty when nothing it tried made the graph load) and every check."""
    nodes: list[str] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    how: str = ""

    def record(self) -> dict:
        shown = self.nodes if len(self.nodes) <= 24 else [*self.nodes[:12], "...", *self.nodes[-12:]]
        return {"nodes": shown, "node_count": len(self.nodes), "how": self.how, "rounds": self.rounds}


def find_island(order: list[str], parents: dict[str, set[str]], named: list[str],
                loads: Callable[[list[str]], str | None], max_checks: int = MAX_CHECKS,
                time_left: Callable[[], bool] = lambda: True) -> Island:
    """The float island that makes the INT8 graph load (see the module docstring). ``loads(float_nodes)`` converts
    cheaply with ``float_nodes`` in float and returns None when the result loads, else the error (one line)."""
    island = Island()
    pos = {n: i for i, n in enumerate(order)}
    named = [n for n in named if n in pos]

    def check(nodes: list[str], what: str) -> bool | None:
        if len(island.rounds) >= max_checks or not time_left():
            return None
        error = loads(nodes)
        island.rounds.append({"float_nodes": len(nodes), "what": what, "loads": error is None,
                              **({"error": error[:300]} if error else {})})
        return error is None

    def sort(nodes) -> list[str]:
        return sorted(set(nodes), key=pos.__getitem__)

    if named:
        if check(named, "the nodes the error names"):
            island.nodes, island.how = named, "the nodes the error names"
            return island
        region = sort(upstream(named, parents))
        if len(region) > len(named) and len(region) < len(order):
            ok = check(region, "the named nodes and everything upstream of them")
            if ok is None:
                return island
            if ok:  # the failure is upstream of the named nodes: bisect there
                return _bisect(island, region, named, check, "upstream of the nodes the error names", True)
    return _bisect(island, list(order), named, check, "bisection over the quantizable nodes in topological order",
                   False)


def _bisect(island: Island, nodes: list[str], named: list[str], check, how: str, whole_loads: bool) -> Island:
    """``named`` plus ``nodes[lo:hi]`` with the smallest ``hi`` and then the largest ``lo`` that load, within the checks
    left. ``whole_loads``: ``nodes`` whole in float was checked and loads (else a prefix must be seen to load)."""
    def with_named(part):
        return [*part, *[n for n in named if n not in part]]

    lo, hi = 0, len(nodes)  # (every node in float is no INT8 graph at all: never checked whole)
    bad = 0  # nodes[:bad] is known not to load (nothing in float, or only the named nodes)
    found = False
    while hi - bad > 1:
        mid = (bad + hi) // 2
        ok = check(with_named(nodes[:mid]), f"the first {mid} of {len(nodes)} in float")
        if ok is None:
            break
        if ok:
            hi, found = mid, True
        else:
            bad = mid
    if not (found or whole_loads):
        island.how = f"{how}: no float prefix checked loaded"
        return island
    good_lo, top = 0, hi  # nodes[good_lo:hi] loads; nodes[top:hi] is not known to
    while top - good_lo > 1:
        mid = (good_lo + top) // 2
        ok = check(with_named(nodes[mid:hi]), f"nodes {mid}..{hi} of {len(nodes)} in float")
        if ok is None:
            break
        if ok:
            good_lo = mid
        else:
            top = mid
    lo = good_lo
    island.nodes = with_named(nodes[lo:hi])
    island.how = f"{how}: nodes {lo}..{hi} of {len(nodes)}"
    return island


QUANT_SUFFIXES = ("_QuantizeLinear", "_DequantizeLinear", "_quantized", "_quant", "_dequant", "_output_0")


def nodes_named_in(onnx_path, text: str) -> list[str]:
    """The FP32 graph's nodes an error message names (onnxruntime: "Node (/Concat_3) Op (Concat) ..."), also through
    the quantizer's renaming (``/Concat_3_quant``): the region a failed INT8 graph should keep in float. Whole names
    only: onnxruntime's ``Node (NAME)`` form first, then the message's words split at spaces, quotes, brackets and
    commas (tf2onnx names hold ``;``: ``model_1/cq/stack_8;model_1/cq/stack_8_Concat__319``), then the older
    identifier-like tokens."""
    import re

    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    by_name = {n.name: n.name for n in graph.node if n.name}
    by_output = {o: n.name for n in graph.node if n.name for o in n.output}
    tokens = re.findall(r"Node \((.+?)\) Op \(", text)
    for word in re.findall(r"[^\s'\"(),\[\]{}<>]+", text):
        tokens += [word, word.rstrip(".:;,")]
    tokens += re.findall(r"[\w./@:-]+", text)
    found = []
    for token in tokens:
        for cut in ("", *QUANT_SUFFIXES):
            t = token[: -len(cut)] if cut and token.endswith(cut) else token
            name = by_name.get(t) or by_output.get(t)
            if name and len(t) > 2 and name not in found:
                found.append(name)
    return found


ISLAND_CALIBRATION_SAMPLES = 2  # a load check's calibration: only whether the INT8 graph loads matters


def error_island(ctx, backend: Backend, profile: TargetProfile, search: Search, error) -> Attempt | None:
    """A first INT8 conversion that failed to load or convert: the float island that makes it load, found by cheap
    load checks (:func:`find_island`: the nodes the error names, the region upstream of them, else a bisection over the
    quantizable nodes), then ONE real conversion with that island in float, judged as usual, before any variant (the
    audio-to-notes model's 9 INT8 tries all failed on one Concat). Recorded as ``error_island``."""
    if error is None or not (profile.allow_float_layers and backend.supports_float_layers):
        return None
    path = ctx.job.model.onnx_path
    order, parents = quantizable_order(path)
    named = [n for n in nodes_named_in(path, str(error)) if n in set(order)]
    settings = backend.requested_settings(profile)
    calib = ctx.job.calib.subset(range(min(ISLAND_CALIBRATION_SAMPLES, len(ctx.job.calib))))
    checked = ctx.work.scratch / profile.name / "island"
    share_calibration(ctx, backend, profile)  # the load checks' 2-sample ranges, calibrated once

    def loads(float_nodes: list[str]) -> str | None:
        where = checked / str(len(island_rounds))
        island_rounds.append(where)
        try:
            art = backend.convert(ctx.job.model, profile, Precision.INT8, calib, where,
                                  settings.replace(float_layers=tuple(float_nodes)))
            backend.runner(art, 1)  # the load check
            return None
        except EdgeBuildError as e:
            return str(e).splitlines()[0] if str(e) else type(e).__name__
        finally:
            shutil.rmtree(where, ignore_errors=True)

    island_rounds: list = []
    with ctx.work.stage(f"{profile.name}: the INT8 graph failed to load or convert: finding its float island"):
        island = find_island(order, parents, named, loads, time_left=lambda: time.monotonic() < search.deadline)
    record = {"named": named, **island.record()}
    search.record.error_island = record
    if not island.nodes:
        record["result"] = "no float island found: " + (island.how or "the error names no node of the model")
        return None
    a = search.attempt(f"INT8 with {len(island.nodes)} node(s) in float (the island that makes it load)",
                       Precision.INT8, settings.replace(float_layers=tuple(island.nodes)))
    record["result"] = ("converted and met the budget" if a is not None and a.quality_ok else
                        "did not help" if a is None else "converted, missed the budget")
    return a if a is not None and a.quality_ok else None
