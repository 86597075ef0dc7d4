"""Compression step ``distill``: knowledge distillation, or plain recovery fine-tuning.

The student is the current model. The teacher is, by default, the original model as loaded, before any
compression step (``prune`` then ``distill`` distills the pruned model from the unpruned one); ``teacher:
previous`` takes the model before this step instead (self-distillation when ``distill`` comes first), and
``teacher: package.module:attr`` (+ ``teacher_weights``) any other model with the same outputs.
For class scores the loss is

    alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · cross-entropy(student, labels)

(Hinton et al.; without labels alpha must be 1). ``alpha: 0`` is plain fine-tuning on the labels. For
outputs that are not class scores the loss is the mean squared error to the teacher's output.

AdamW with a cosine learning-rate schedule, shuffled with ``spec.seed``: the same spec gives the same model.
The training data (``--train``, the demo's ``digits:train``) never overlaps evaluation (checked before any
step runs); the evaluation set is only *measured* each epoch — never used to pick an epoch — and the last
epoch's model is kept. Weights that are exactly zero when the step starts (unstructured pruning) are kept
at zero (``keep_sparsity``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgebuild.pipeline.stages.compress.measure import (
    PRUNABLE, as_tensors, batches, first_outputs, is_class_scores, quality,
)
from edgebuild.pipeline.errors import BadInputError

KIND = "distill"
NEEDS_TRAIN = True
TEACHERS = ("original", "previous")


def _positive(value, name: str, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")


@dataclass(frozen=True)
class Config:
    epochs: int = 5
    lr: float = 2e-3
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the distillation term; 0 = fine-tuning on labels only
    weight_decay: float = 1e-4
    teacher: str = "original"  # original (before compression) | previous (before this step) | package.module:attr
    teacher_weights: str | None = None
    keep_sparsity: bool = True
    threads: int | None = None  # torch intra-op threads while training (None: torch's default); 1 avoids
    # oversubscription slow-downs for small models on a busy machine

    def __post_init__(self):
        _positive(self.epochs, "epochs", int)
        _positive(self.batch_size, "batch_size", int)
        _positive(self.lr, "lr")
        _positive(self.temperature, "temperature")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.teacher, str) or not (self.teacher in TEACHERS or ":" in self.teacher):
            raise ValueError(f"teacher must be original, previous or package.module:attr, got {self.teacher!r}")
        if self.threads is not None:
            _positive(self.threads, "threads", int)
        if self.teacher_weights and self.teacher in TEACHERS:
            raise ValueError("teacher_weights needs teacher: package.module:attr")


def run(student: nn.Module, cfg: Config, ctx) -> tuple[nn.Module, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        return _distill(student, cfg, ctx)
    finally:
        torch.set_num_threads(threads)


def _distill(student: nn.Module, cfg: Config, ctx) -> tuple[nn.Module, dict]:
    train = ctx.training_data()
    teacher = {"original": ctx.original, "previous": ctx.before}[cfg.teacher] if cfg.teacher in TEACHERS \
        else load_teacher(cfg, ctx)
    with torch.no_grad():
        targets = first_outputs(teacher, train, ctx.inputs)  # the teacher is fixed: its outputs once, in eval mode
        probe = as_tensors(student.eval()(*ctx.example))[0]
    classes = is_class_scores(targets)
    if tuple(probe.shape[1:]) != tuple(targets.shape[1:]):
        raise BadInputError(f"compress {ctx.label}: teacher outputs {list(targets.shape[1:])}, "
                            f"student {list(probe.shape[1:])} per sample")
    if classes and cfg.alpha < 1.0 and train.labels is None:
        raise BadInputError(f"compress {ctx.label}: training data {train.name} has no labels; "
                            "set alpha=1 to distill from the teacher alone")
    labels = None if train.labels is None else torch.from_numpy(np.asarray(train.labels, dtype=np.int64))
    loss_fn = _kd_loss(cfg) if classes else _mse_loss

    torch.manual_seed(ctx.spec.seed)
    rng = np.random.default_rng(ctx.spec.seed)
    steps = math.ceil(len(train) / cfg.batch_size)
    opt = torch.optim.AdamW(student.parameters(), lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    masks = _zero_masks(student) if cfg.keep_sparsity else []
    history = []
    for epoch in range(1, cfg.epochs + 1):
        with ctx.stage(f"compression {ctx.label}: epoch {epoch}/{cfg.epochs}"):
            student.train()
            total, seen = 0.0, 0
            for sel, x in batches(train, ctx.inputs, cfg.batch_size, rng.permutation(len(train))):
                if len(sel) < 2 and steps > 1:  # BatchNorm cannot train on a batch of one
                    continue
                out = as_tensors(student(*x))[0]
                loss = loss_fn(out, targets[sel], None if labels is None else labels[sel])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                _apply(masks)
                total, seen = total + float(loss.detach()) * len(sel), seen + len(sel)
            student.eval()
            entry = {"epoch": epoch, "loss": round(total / max(seen, 1), 5), "lr_end": opt.param_groups[0]["lr"]}
            entry.update({f"eval_{k}": round(v, 3) for k, v in
                          quality(first_outputs(student, ctx.evalset, ctx.inputs), ctx.evalset, None).items()})
            history.append(entry)
    return student.eval(), {
        "teacher": {"original": "the original model (before compression)",
                    "previous": "the model before this step"}.get(cfg.teacher, cfg.teacher),
        "loss": ("alpha*T^2*KL(teacher||student) + (1-alpha)*CE" if cfg.alpha > 0 else "CE (fine-tuning)")
        if classes else "MSE to the teacher's output",
        "optimizer": "AdamW, cosine schedule", "training": {"source": train.name, "samples": len(train)},
        "kept_zero_weights": sum(int((~m).sum()) for _, m in masks), "epochs": history,
        "selection": "last epoch (the evaluation set is measured, never used for selection)",
    }


def _kd_loss(cfg: Config):
    t, alpha = float(cfg.temperature), float(cfg.alpha)

    def loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        total = torch.zeros(())
        if alpha > 0:
            kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                          reduction="batchmean")
            total = total + alpha * t * t * kl
        if alpha < 1:
            total = total + (1 - alpha) * F.cross_entropy(student, labels)
        return total

    return loss


def _mse_loss(student: torch.Tensor, teacher: torch.Tensor, labels) -> torch.Tensor:
    return F.mse_loss(student, teacher)


def _zero_masks(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, mask) for Conv/Linear weights that already hold exact zeros (mask True = trainable)."""
    return [(m.weight, m.weight.detach() != 0) for m in model.modules()
            if isinstance(m, PRUNABLE) and bool((m.weight == 0).any())]


@torch.no_grad()
def _apply(masks: list) -> None:
    for w, keep in masks:
        w.mul_(keep)


def load_teacher(cfg: Config, ctx) -> nn.Module:
    """Import ``package.module:attr`` (an nn.Module, or a factory returning one) and load its weights."""
    from pathlib import Path

    from edgebuild.refs import import_ref

    try:  # a user's model package next to edgebuild.yaml or in the current directory, by its own file path
        obj = import_ref(cfg.teacher, "teacher", search=(*ctx.spec.python_path, Path.cwd()))
    except BadInputError as e:
        raise BadInputError(f"compress {ctx.label}: {e}") from None
    if not isinstance(obj, nn.Module) and callable(obj):
        obj = obj()
    if not isinstance(obj, nn.Module):
        raise BadInputError(f"compress {ctx.label}: teacher {cfg.teacher} is not an nn.Module (nor a factory of one)")
    if cfg.teacher_weights:
        from edgebuild.pipeline.stages.load import load_state_dict

        obj.load_state_dict(load_state_dict(Path(cfg.teacher_weights)))
    return obj.eval()
