"""Measuring and inspecting torch models for the compression record (imports torch).

``measure`` gives the numbers recorded before and after every step: parameters, MACs (counted by
``torch.utils.flop_counter.FlopCounterMode``, so every op torch knows is counted, not a hand-written
per-layer formula), FP32 size (bytes of the serialized state dict), evaluation accuracy and top-1
agreement with the original model, and CPU latency at batch 1 on one thread.
"""
from __future__ import annotations

import io
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline.spec import InputSpec

LATENCY_RUNS, LATENCY_WARMUP = 50, 5
EVAL_BATCH = 256
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ---- model inspection ------------------------------------------------------------------------------
def example_inputs(inputs: tuple[InputSpec, ...]) -> tuple[torch.Tensor, ...]:
    """Batch-1 zero tensors with the model's input shapes and dtypes (for tracing and shape checks)."""
    return tuple(torch.zeros(i.shape, dtype=getattr(torch, i.dtype)) for i in inputs)


def as_tensors(out) -> list[torch.Tensor]:
    """A model's output(s) as a flat list of tensors (tensor, tuple/list, or dict of tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in as_tensors(o)]


def last_linear(model: nn.Module) -> str | None:
    """Name of the final classifier: the last ``nn.Linear`` registered in the model (None if there is none)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def layer_names(model: nn.Module, types=PRUNABLE) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, types)]


def is_excluded(name: str, exclude: tuple[str, ...]) -> bool:
    """``exclude`` names a layer or a whole sub-tree (``features.3`` excludes ``features.3.0`` too)."""
    return any(name == e or name.startswith(e + ".") for e in exclude)


def unknown_names(model: nn.Module, exclude: tuple[str, ...]) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    return [e for e in exclude if not any(is_excluded(n, (e,)) for n in names)]


# ---- running on a data set -------------------------------------------------------------------------
def batches(data: SampleSet, inputs: tuple[InputSpec, ...], batch_size: int, order=None):
    """Tuples of input tensors (in the model's input order) over ``data``, ``batch_size`` samples each."""
    idx = np.arange(len(data)) if order is None else np.asarray(order)
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        b = data.batch(sel)  # stacked along each input's own batch axis (state, 0-d inputs too)
        yield sel, tuple(torch.from_numpy(np.ascontiguousarray(b[i.name])) for i in inputs)


@torch.no_grad()
def first_outputs(model: nn.Module, data: SampleSet, inputs: tuple[InputSpec, ...]) -> torch.Tensor:
    """The model's first output over the whole set, concatenated along the batch axis (eval mode)."""
    with eval_mode(model):
        return torch.cat([as_tensors(model(*x))[0].float() for _, x in batches(data, inputs, EVAL_BATCH)])


def is_class_scores(out: torch.Tensor) -> bool:
    return out.ndim == 2 and out.shape[1] > 1


@contextmanager
def eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---- the numbers ------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one batch-1 forward pass (FlopCounterMode counts 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), eval_mode(model), FlopCounterMode(display=False) as counter:
        model(*example)
    return int(counter.get_total_flops()) // 2


def fp32_size(model: nn.Module) -> int:
    """Bytes of the serialized FP32 state dict (what a dense checkpoint of this model costs)."""
    buf = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, buf)
    return buf.getbuffer().nbytes


def latency_ms(model: nn.Module, example: tuple[torch.Tensor, ...], runs: int = LATENCY_RUNS) -> float:
    """Median wall time of a batch-1 forward pass on one CPU thread (thread count restored after)."""
    times = []
    with torch.no_grad(), eval_mode(model), one_thread():
        for _ in range(LATENCY_WARMUP):
            model(*example)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(*example)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class Reference:
    """The original model's outputs on the evaluation set, for agreement/fidelity of every later model."""

    outputs: torch.Tensor
    labels: np.ndarray | None


def quality(out: torch.Tensor, data: SampleSet, ref: Reference | None) -> dict:
    """Accuracy (classifier with labels), top-1 agreement with the original, or cosine for other outputs."""
    m: dict = {}
    if is_class_scores(out):
        pred = out.argmax(1).numpy()
        if data.labels is not None and data.labels.ndim == 1:  # class labels (not detection boxes)
            m["accuracy"] = float((pred == data.labels).mean() * 100)
        if ref is not None:
            m["top1_agreement"] = float((pred == ref.outputs.argmax(1).numpy()).mean() * 100)
    elif ref is not None and ref.outputs.shape == out.shape:
        a, b = ref.outputs.flatten(1).double(), out.flatten(1).double()
        m["cosine_min"] = float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())
    return m


def measure(model: nn.Module, data: SampleSet, inputs: tuple[InputSpec, ...], ref: Reference | None,
            with_latency: bool = True) -> tuple[dict, torch.Tensor]:
    """Everything the record says about one model state; also returns its outputs on ``data``."""
    example = example_inputs(inputs)
    out = first_outputs(model, data, inputs)
    m = {"params": count_params(model), "macs": count_macs(model, example), "fp32_bytes": fp32_size(model),
         **quality(out, data, ref)}
    if with_latency:
        m["latency_ms"] = round(latency_ms(model, example), 4)
    return m, out


def summary(first: dict, last: dict) -> dict:
    """Overall effect of the whole compression: reductions as ratios (×), accuracy drop in points."""
    def ratio(key):
        return round(first[key] / last[key], 3) if last.get(key) else None

    s = {"mac_reduction": ratio("macs"), "param_reduction": ratio("params"), "size_reduction": ratio("fp32_bytes"),
         "accuracy_drop": round(first["accuracy"] - last["accuracy"], 3) if "accuracy" in first and "accuracy" in last else None}
    if "top1_agreement" in last:
        s["top1_agreement"] = last["top1_agreement"]
    if first.get("latency_ms") and last.get("latency_ms"):
        s["latency_speedup"] = round(first["latency_ms"] / last["latency_ms"], 3)
    return s
