"""Task evaluators: what a model's outputs *mean*, scored the same way on the FP32 reference and an artifact.

``task:`` in edgebuild.yaml selects one (``task_options:`` tunes it); ``evaluator: pkg.mod:fn`` adds a
user's own. Each returns named scores, higher is better; the gate compares the artifact's scores with the
reference's (``<score>_drop``) or with a floor (``<score>_min``), see ``DEFAULT_GATES``.

Outputs reach an evaluator stacked over samples, by output name: ``{name: [N, *shape]}``.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import numpy as np

from edgebuild.pipeline.detection import (  # noqa: F401 (re-exported: the task evaluators' one namespace)
    DETECTION_OPTIONS, DetectionPlan, decode_detections, detection, detection_plan, with_image_size)
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.metrics import NEAR_TIE_RATIO

TASKS = ("auto", "classification", "detection", "segmentation", "embedding", "regression", "sequence", "generic")
# budget name -> limit, applied when the build sets none for that score (see README "Judging outputs")
DEFAULT_GATES = {
    "detection": {"f1_min": 90.0},  # detections (after threshold + NMS) matching the FP32 model's, %
    "segmentation": {"miou_min": 90.0},  # mean IoU of the artifact's masks with the FP32 masks, %
    "sequence": {"sequence_agreement_min": 98.0},  # greedy-decoded sequences equal to the FP32 ones, %
    "embedding": {"cosine_mean_min": 0.98},  # mean cosine of the artifact's embeddings with the FP32 ones
}


def _vector(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


def default_output(outputs: dict, options: dict) -> str:
    """The output a task scores: ``task_options.output``, else the first output that holds real values (not an
    integer tensor passed through: a sentence encoder's first outputs can be its input ids and mask)."""
    if options.get("output"):
        return options["output"]
    for name, a in outputs.items():
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.mod(a, 1) == 0):
            return name
    return next(iter(outputs))


# ---- other built-in tasks ------------------------------------------------------------------------------
def mask_threshold(reference: np.ndarray) -> float:
    """A one-channel map's foreground threshold, read from the FP32 reference and applied to both sides: 0.5 for
    probabilities (a Sigmoid's [0, 1]), 0 for logits. Read per side, a reference Sigmoid at 1.0000001 was judged as
    logits (everything above 0 is text) against the artifact's 0.5: a text detector's FP16 scored mIoU 90.1 where its
    masks agree to 99.9 %."""
    from edgebuild.pipeline.detection_plan import in_unit_range

    return 0.5 if in_unit_range(reference) else 0.0


def _masks(a: np.ndarray, channel_axis: int, threshold: float) -> np.ndarray:
    a = np.moveaxis(a, channel_axis + 1, 1) if a.ndim >= 4 else a[:, None]
    if a.shape[1] > 1:
        return a.argmax(1)
    return (a[:, 0] > threshold).astype(np.int64)


def segmentation(outputs: dict, reference: dict, labels, options: dict) -> dict:
    name = default_output(reference, options)
    axis = int(options.get("channel_axis", 0))
    threshold = mask_threshold(reference[name])
    m, r = _masks(outputs[name], axis, threshold), _masks(reference[name], axis, threshold)
    ious = []
    for c in np.union1d(np.unique(m), np.unique(r)):
        inter, union = np.sum((m == c) & (r == c)), np.sum((m == c) | (r == c))
        ious.append(inter / union)
    return {"miou": 100.0 * float(np.mean(ious)), "pixel_agreement": 100.0 * float((m == r).mean())}


def embedding(outputs: dict, reference: dict, labels, options: dict) -> dict:
    name = default_output(reference, options)
    out, ref = _vector(outputs[name]).astype(np.float64), _vector(reference[name]).astype(np.float64)

    def neighbours(e):
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    scores = {"nn_agreement": 100.0 * float((neighbours(out) == neighbours(ref)).mean()) if len(out) > 2 else 100.0}
    from edgebuild.pipeline.metrics import per_sample_cosine

    scores["cosine_mean"] = float(per_sample_cosine(ref, out).mean())
    return scores


def _frames(a: np.ndarray, class_axis: int) -> np.ndarray:
    """One sample's class scores as [frames, classes]."""
    return np.moveaxis(a, class_axis, -1).reshape(-1, a.shape[class_axis])


def ctc_greedy(a: np.ndarray, blank: int, class_axis: int) -> list[tuple[int, ...]]:
    seqs = []
    for s in a:
        s = _frames(s, class_axis).argmax(-1)
        keep = np.concatenate([[True], s[1:] != s[:-1]]) & (s != blank)
        seqs.append(tuple(int(t) for t in s[keep]))
    return seqs


def _log_scores(frames: np.ndarray) -> np.ndarray:
    """Scores whose differences are log-probability ratios: logits and log-softmax as they are, probabilities (a
    sample wholly in [0, 1] up to float rounding: softmax or per-class sigmoid) as their log."""
    from edgebuild.pipeline.detection_plan import in_unit_range

    f = frames.astype(np.float64)
    return np.log(np.maximum(f, 1e-30)) if in_unit_range(f) else f


def near_tie_only(out: np.ndarray, ref: np.ndarray, class_axis: int, ratio: float) -> bool:
    """True when every frame where the artifact's top class differs from FP32's is a near-tie for FP32: the class
    the artifact picked scores, in FP32, within log(1 / ratio) of FP32's own pick."""
    o, r = _frames(out, class_axis), _log_scores(_frames(ref, class_axis))
    picked = o.argmax(-1)
    differ = picked != r.argmax(-1)
    if not differ.any():
        return True
    gap = r.max(-1)[differ] - r[differ, picked[differ]]
    return bool(np.all(gap <= -np.log(ratio)))


def sequence(outputs: dict, reference: dict, labels, options: dict) -> dict:
    name = default_output(reference, options)
    blank, axis = int(options.get("blank", 0)), int(options.get("class_axis", -1))
    ratio = float(options.get("near_tie_ratio", NEAR_TIE_RATIO))
    if not 0 < ratio <= 1:
        raise BadInputError(f"task_options.near_tie_ratio must be in (0, 1] (1: exact agreement), got {ratio}")
    out, ref = ctc_greedy(outputs[name], blank, axis), ctc_greedy(reference[name], blank, axis)
    exact = [a == b for a, b in zip(out, ref)]
    agree = [e or (ratio < 1 and near_tie_only(o, r, axis, ratio))
             for e, o, r in zip(exact, outputs[name], reference[name])]
    tokens_out = np.moveaxis(outputs[name], axis if axis < 0 else axis + 1, -1).argmax(-1)
    tokens_ref = np.moveaxis(reference[name], axis if axis < 0 else axis + 1, -1).argmax(-1)
    scores = {"sequence_agreement": 100.0 * float(np.mean(agree)),
              "sequence_agreement_exact": 100.0 * float(np.mean(exact)),
              "token_agreement": 100.0 * float((tokens_out == tokens_ref).mean())}
    if labels is not None and labels.ndim == 2:  # padded label sequences (-1 = padding)
        truth = [tuple(int(t) for t in row if t >= 0) for row in labels]
        scores["sequence_accuracy"] = 100.0 * float(np.mean([a == t for a, t in zip(out, truth)]))
    return scores


BUILTIN: dict[str, Callable] = {"detection": detection, "segmentation": segmentation, "embedding": embedding,
                                "sequence": sequence}


# ---- user evaluators -----------------------------------------------------------------------------------
def load_evaluator(ref: str, search: tuple = ()) -> Callable:
    """``pkg.mod:fn`` -> fn(outputs, labels, reference) -> {score: value}, higher is better; its module is looked
    for in ``search`` (the config's folders), then the current directory, imported by its own file path
    (nothing is put on sys.path)."""
    from edgebuild.refs import import_ref

    obj = import_ref(ref, "evaluator", search=(*search, Path.cwd()))
    if not callable(obj):
        raise BadInputError(f"evaluator {ref} is not a function")
    return obj


def call_evaluator(fn: Callable, ref: str, outputs: dict, labels, reference: dict) -> dict[str, float]:
    try:
        params = inspect.signature(fn).parameters
        scores = fn(outputs, labels, reference) if len(params) >= 3 else fn(outputs, labels)
    except Exception as e:
        raise BadInputError(f"evaluator {ref} raised {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(scores, dict) or not scores:
        raise BadInputError(f"evaluator {ref} must return a non-empty dict of named scores, got {type(scores).__name__}")
    try:
        return {str(k): float(v) for k, v in scores.items()}
    except (TypeError, ValueError):
        raise BadInputError(f"evaluator {ref} returned a non-numeric score: {scores!r}"[:300]) from None
