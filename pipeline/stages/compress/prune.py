"""Compression step ``prune``: unstructured magnitude pruning or structured channel pruning.

- ``method: unstructured`` zeroes the smallest-magnitude weights of Conv/Linear layers
  (``torch.nn.utils.prune``, L1, made permanent), per layer or with one global threshold. The weights stay
  dense: no dense format (ONNX, TFLite, OpenVINO IR) gets smaller or faster from zeros alone — the record
  says so and shows what a compressed file would gain.
- ``method: structured`` removes whole channels with torch-pruning (``MagnitudePruner`` on a
  ``DependencyGraph``, L2 group magnitude): every layer coupled to a channel — BatchNorm, depthwise convs,
  both sides of a residual add, the next layer's inputs — shrinks with it, so the graph stays consistent and
  the model really gets fewer MACs and parameters.

The final classifier (the last ``nn.Linear``) keeps all its outputs, and layers listed in ``exclude``
(names as in ``model.named_modules()``; a name covers its sub-tree) are never touched.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.pipeline.stages.compress.measure import PRUNABLE, is_excluded, last_linear, unknown_names

KIND = "prune"
METHODS = ("unstructured", "structured")
SCOPES = ("layer", "global")
MAX_GLOBAL_RATIO = 0.9  # global structured pruning never removes more than this share of one layer's channels
DENSE_NOTE = ("unstructured pruning only sets weights to zero: the dense model (and every dense ONNX/TFLite/OpenVINO "
              "artifact) is exactly as large and as fast as before; zeros pay off only with a sparse-aware runtime "
              "or a compressed file (see zlib_bytes), so use method=structured for a smaller, faster model")


def names_option(value) -> tuple[str, ...]:
    """A list of layer names, or one string of names separated by ';' or spaces (the CLI splits on ',')."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.replace(";", " ").split() if v)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"exclude must be a list of layer names, got {value!r}")


@dataclass(frozen=True)
class Config:
    method: str = "unstructured"
    ratio: float = 0.5  # unstructured: share of weights zeroed; structured: share of channels removed per group
    scope: str = "layer"  # layer: the same ratio in every layer | global: one threshold across layers
    exclude: tuple[str, ...] = ()
    round_to: int | None = None  # structured: keep channel counts multiples of this (e.g. 8 for SIMD/NPUs)

    def __post_init__(self):
        object.__setattr__(self, "exclude", names_option(self.exclude))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be a number between 0 and 1 (exclusive), got {self.ratio!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ValueError(f"round_to must be a positive integer, got {self.round_to!r}")
        if self.round_to is not None and self.method != "structured":
            raise ValueError("round_to applies to method=structured only")


def run(model: nn.Module, cfg: Config, ctx) -> tuple[nn.Module, dict]:
    missing = unknown_names(model, cfg.exclude)
    if missing:
        raise BadInputError(f"compress {ctx.label}: exclude names no layer of the model: {', '.join(missing)}")
    classifier = last_linear(model)
    protected = cfg.exclude + ((classifier,) if classifier else ())
    if cfg.method == "unstructured":
        return unstructured(model, cfg, protected, ctx.label)
    return structured(model, cfg, ctx, classifier)


# ---- unstructured ------------------------------------------------------------------------------------
def unstructured(model: nn.Module, cfg: Config, protected: tuple[str, ...], label: str) -> tuple[nn.Module, dict]:
    from torch.nn.utils import prune

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE) and not is_excluded(n, protected)]
    if not layers:
        raise BadInputError(f"compress {label}: no Conv/Linear layer left to prune (the final classifier and "
                            f"exclude={list(cfg.exclude)} are kept)")
    zipped_before = _zlib_bytes(model)
    if cfg.scope == "global":
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                                  amount=float(cfg.ratio))
    else:
        for _, m in layers:
            prune.l1_unstructured(m, "weight", amount=float(cfg.ratio))
    for _, m in layers:
        prune.remove(m, "weight")  # permanent: the mask is folded into a plain weight tensor
    per_layer = {n: {"weights": m.weight.numel(), "sparsity": _pct(m.weight)} for n, m in layers}
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    return model, {
        "method": "unstructured", "scope": cfg.scope, "kept": list(protected),
        "sparsity_pruned_layers": round(100.0 * zeros / total, 2),
        "sparsity_all_params": round(100.0 * sum(int((p == 0).sum()) for p in model.parameters())
                                     / sum(p.numel() for p in model.parameters()), 2),
        "per_layer": per_layer, "zlib_bytes": {"before": zipped_before, "after": _zlib_bytes(model)},
        "note": DENSE_NOTE,
    }


def _pct(w: torch.Tensor) -> float:
    return round(100.0 * float((w == 0).sum()) / w.numel(), 2)


def _zlib_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(zlib.compress(buf.getvalue(), 6))


# ---- structured --------------------------------------------------------------------------------------
def structured(model: nn.Module, cfg: Config, ctx, classifier: str | None) -> tuple[nn.Module, dict]:
    import torch_pruning as tp

    modules = dict(model.named_modules())
    name_of = {id(m): n for n, m in modules.items()}
    excluded = {id(m) for n, m in modules.items() if is_excluded(n, cfg.exclude)}
    ignored = [m for n, m in modules.items() if is_excluded(n, cfg.exclude) or n == classifier]
    before = _widths(model)
    try:
        pruner = tp.pruner.MagnitudePruner(
            model, ctx.example, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=float(cfg.ratio), global_pruning=cfg.scope == "global",
            max_pruning_ratio=MAX_GLOBAL_RATIO if cfg.scope == "global" else 1.0,
            ignored_layers=ignored, round_to=cfg.round_to)
        pruned, skipped = 0, []
        for group in pruner.step(interactive=True):
            if any(id(dep.target.module) in excluded for dep, _ in group):
                # the group would change an excluded layer's inputs: leave the whole group alone
                skipped.append(name_of.get(id(group[0].dep.target.module), str(group[0].dep.target.module)))
                continue
            group.prune()
            pruned += 1
    except (RuntimeError, ValueError, KeyError, IndexError, AssertionError) as e:
        raise ConversionError(f"compress {ctx.label}: torch-pruning could not prune this model "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
    after = _widths(model)
    channels = {n: [before[n], after.get(n)] for n in before if after.get(n) != before[n]}
    if not channels:
        raise BadInputError(f"compress {ctx.label}: nothing could be pruned (every channel is coupled to the final "
                            f"classifier or to exclude={list(cfg.exclude)})")
    return model, {"method": "structured", "scope": cfg.scope, "importance": "L2 group magnitude (torch-pruning)",
                   "kept": [n for n in (*cfg.exclude, classifier) if n], "groups_pruned": pruned,
                   "groups_skipped_for_exclude": skipped, "channels": channels}


def _widths(model: nn.Module) -> dict[str, int]:
    """Output channels/features of every Conv/Linear (what structured pruning changes)."""
    return {n: m.out_channels if hasattr(m, "out_channels") else m.out_features
            for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
