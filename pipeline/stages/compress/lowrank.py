"""Compression step ``lowrank``: factorize Linear and Conv layers by truncated SVD.

- ``nn.Linear(n, m)`` with weight W [m, n] = U S Vᵀ becomes ``Linear(n, r, bias=False) -> Linear(r, m)``
  with weights √S Vᵀ and U √S (the bias stays on the second).
- ``nn.ConvNd(c, m, k)`` with ``groups=1`` (k×k or 1×1): the kernel reshaped to [m, c·k²] is factorized the
  same way into a k×k conv with r filters (same stride, padding, dilation) followed by a 1×1 conv with the
  bias. Both parts run at the output resolution, so parameters and MACs shrink by the same factor.

The rank of each layer is the smallest that keeps ``energy`` of the squared singular values (default
0.9), or ``rank_ratio`` of the full rank. A layer is left alone — and listed in the record with the reason —
when the factorized pair would not have fewer parameters (r·(m + c·k²) ≥ m·c·k², hence no fewer MACs),
when it is a grouped/depthwise conv, the final classifier, or named in ``exclude``.
The factorized layer replaces the original as an ``nn.Sequential`` of the two parts (names ``<layer>.0``,
``<layer>.1``). A fine-tuning step (``distill``) after it usually recovers most of the accuracy lost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.stages.compress.measure import is_excluded, last_linear, unknown_names
from edgebuild.pipeline.stages.compress.prune import names_option

KIND = "lowrank"
DEFAULT_ENERGY = 0.9
LAYER_KINDS = ("all", "linear", "conv")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fraction(value, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


@dataclass(frozen=True)
class Config:
    energy: float | None = None  # keep this share of sum(S²) per layer (default 0.9 when no rank_ratio)
    rank_ratio: float | None = None  # or: rank = ceil(rank_ratio · full rank)
    layers: str = "all"  # all | linear | conv
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "exclude", names_option(self.exclude))
        _fraction(self.energy, "energy")
        _fraction(self.rank_ratio, "rank_ratio")
        if self.energy is not None and self.rank_ratio is not None:
            raise ValueError("give energy or rank_ratio, not both")
        if self.energy is None and self.rank_ratio is None:
            object.__setattr__(self, "energy", DEFAULT_ENERGY)
        if self.layers not in LAYER_KINDS:
            raise ValueError(f"layers must be one of {', '.join(LAYER_KINDS)}, got {self.layers!r}")


def run(model: nn.Module, cfg: Config, ctx) -> tuple[nn.Module, dict]:
    missing = unknown_names(model, cfg.exclude)
    if missing:
        raise BadInputError(f"compress {ctx.label}: exclude names no layer of the model: {', '.join(missing)}")
    classifier = last_linear(model)
    types = {"all": (nn.Linear, *CONVS), "linear": (nn.Linear,), "conv": CONVS}[cfg.layers]
    factorized, skipped = {}, {}
    for name, layer in [(n, m) for n, m in model.named_modules() if type(m) in types]:
        reason = _skip_reason(name, layer, cfg, classifier)
        if reason is None:
            new, info = factorize(layer, cfg)
            if new is None:
                reason = info
            else:
                _replace(model, name, new)
                factorized[name] = info
        if reason is not None:
            skipped[name] = reason
    if not factorized:
        raise BadInputError(f"compress {ctx.label}: no layer would get smaller at "
                            f"{_how(cfg)}; left alone: {skipped}")
    return model, {"rank_rule": _how(cfg), "factorized": factorized, "left_alone": skipped}


def _how(cfg: Config) -> str:
    return f"energy {cfg.energy}" if cfg.energy is not None else f"rank_ratio {cfg.rank_ratio}"


def _skip_reason(name: str, layer: nn.Module, cfg: Config, classifier: str | None) -> str | None:
    if name == classifier:
        return "final classifier"
    if is_excluded(name, cfg.exclude):
        return "excluded"
    if isinstance(layer, CONVS) and layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    return None


def choose_rank(s: torch.Tensor, cfg: Config) -> int:
    """Rank from the singular values ``s`` (descending) by retained energy or by ratio of the full rank."""
    if cfg.rank_ratio is not None:
        return max(1, math.ceil(cfg.rank_ratio * len(s)))
    energy = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    return min(len(s), int(torch.searchsorted(energy, torch.tensor(cfg.energy, dtype=torch.float64))) + 1)


def factorize(layer: nn.Module, cfg: Config) -> tuple[nn.Module | None, dict | str]:
    """The two-layer replacement and its record, or (None, why not) when it would not reduce parameters."""
    w = layer.weight.detach()
    out_dim = w.shape[0]
    mat = w.reshape(out_dim, -1).double()  # [m, c·k²] for convs, [m, n] for linears
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = choose_rank(s, cfg)
    dense, split = mat.numel(), r * (mat.shape[0] + mat.shape[1])
    kept = float((s[:r] ** 2).sum() / (s ** 2).sum())
    if split >= dense:
        return None, f"no reduction at rank {r} of {len(s)} ({split} >= {dense} weights)"
    root = s[:r].sqrt()
    first_w = (root[:, None] * vh[:r]).to(w.dtype)  # [r, c·k²]
    second_w = (u[:, :r] * root[None, :]).to(w.dtype)  # [m, r]
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first, second = nn.Linear(layer.in_features, r, bias=False), nn.Linear(r, out_dim, bias=bias)
        first.weight.data.copy_(first_w)
        second.weight.data.copy_(second_w)
    else:
        conv = type(layer)
        first = conv(layer.in_channels, r, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode)
        second = conv(r, out_dim, 1, bias=bias)
        first.weight.data.copy_(first_w.reshape(first.weight.shape))
        second.weight.data.copy_(second_w.reshape(second.weight.shape))
    if bias:
        second.bias.data.copy_(layer.bias.detach())
    pair = nn.Sequential(first, second).to(device=w.device).train(layer.training)
    return pair, {"rank": r, "full_rank": len(s), "energy_kept": round(kept, 4), "weights": [dense, split]}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
