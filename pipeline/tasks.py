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

from edgebuild.pipeline.errors import BadInputError

TASKS = ("auto", "classification", "detection", "segmentation", "embedding", "regression", "sequence", "generic")
# budget name -> limit, applied when the build sets none for that score (see README "Judging outputs")
DEFAULT_GATES = {
    "detection": {"f1_min": 90.0},  # detections (after threshold + NMS) matching the FP32 model's, %
    "segmentation": {"miou_min": 90.0},  # mean IoU of the artifact's masks with the FP32 masks, %
    "sequence": {"sequence_agreement_min": 98.0},  # greedy-decoded sequences equal to the FP32 ones, %
    "embedding": {"cosine_mean_min": 0.98},  # mean cosine of the artifact's embeddings with the FP32 ones
}
DETECTION_OPTIONS = {"layout": "auto", "score_threshold": 0.25, "iou_threshold": 0.45, "match_iou": 0.5,
                     "max_detections": 100, "box_format": "auto", "background_class": None,
                     "boxes_output": None, "scores_output": None}


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


# ---- detection -----------------------------------------------------------------------------------------
def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _nms(boxes, scores, classes, iou_threshold: float, max_det: int):
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order) and len(keep) < max_det:
        i, order = order[0], order[1:]
        keep.append(i)
        if len(order):
            same = classes[order] == classes[i]
            order = order[~(same & (_iou(boxes[i], boxes[order]) > iou_threshold))]
    keep = np.array(keep, dtype=np.int64)
    return boxes[keep], scores[keep], classes[keep]


def _xyxy(b: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "cxcywh":
        return np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
    if fmt == "yxyx":
        return b[:, [1, 0, 3, 2]]
    return b


def _detection_layout(outputs: dict, o: dict) -> tuple[str, list[str]]:
    names = list(outputs)
    if o["layout"] != "auto":
        layout = o["layout"]
    elif o["boxes_output"] or (len(names) >= 2 and any(outputs[n].shape[-1] == 4 for n in names)):
        layout = "ssd"
    else:
        layout = "yolo"
    if layout == "ssd":
        boxes = o["boxes_output"] or next((n for n in names if outputs[n].shape[-1] == 4), None)
        scores = o["scores_output"] or next((n for n in names if n != boxes and outputs[n].ndim == outputs[boxes].ndim), None)
        if boxes is None or scores is None:
            raise BadInputError("task detection (ssd layout) needs a boxes output [..., N, 4] and a scores output [..., N, C]; "
                                "set task_options boxes_output/scores_output")
        return layout, [boxes, scores]
    if layout not in ("yolo", "yolo_obj"):
        raise BadInputError(f"task_options.layout must be auto, yolo, yolo_obj or ssd, got {layout!r}")
    return layout, [o["scores_output"] or names[0]]


def decode_detections(outputs: dict[str, np.ndarray], options: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per sample: (boxes [K, 4] x1y1x2y2, scores [K], classes [K]) after score threshold and class-wise NMS.

    Layouts: ``yolo`` — one output [4 + C, A] or [A, 4 + C] per sample (cx, cy, w, h, class scores; YOLOv8
    and later); ``yolo_obj`` — [A, 5 + C] (cx, cy, w, h, objectness, class scores; YOLOv5/v7); ``ssd`` — a
    boxes output [A, 4] (x1, y1, x2, y2 unless ``box_format``) and a scores output [A, C].
    """
    o = {**DETECTION_OPTIONS, **options}
    layout, names = _detection_layout(outputs, o)
    n = len(outputs[names[0]])
    result = []
    for i in range(n):
        if layout == "ssd":
            boxes = outputs[names[0]][i].reshape(-1, 4).astype(np.float64)
            scores = outputs[names[1]][i].reshape(len(boxes), -1).astype(np.float64)
            fmt = "xyxy" if o["box_format"] == "auto" else o["box_format"]
            if o["background_class"] is not None:
                scores = scores.copy()
                scores[:, int(o["background_class"])] = 0.0
        else:
            a = outputs[names[0]][i].astype(np.float64)
            a = a.reshape([d for d in a.shape if d != 1] or [1])
            if a.ndim != 2:
                raise BadInputError(f"task detection ({layout}): output {names[0]} must be [4+C, anchors] per sample, got {list(a.shape)}")
            a = a.T if a.shape[0] < a.shape[1] else a  # -> [anchors, 4 + C]
            fmt = "cxcywh" if o["box_format"] == "auto" else o["box_format"]
            boxes = a[:, :4]
            scores = a[:, 5:] * a[:, 4:5] if layout == "yolo_obj" else a[:, 4:]
        boxes = _xyxy(boxes, fmt)
        cls = scores.argmax(1)
        best = scores[np.arange(len(scores)), cls]
        keep = best >= o["score_threshold"]
        result.append(_nms(boxes[keep], best[keep], cls[keep], o["iou_threshold"], int(o["max_detections"])))
    return result


def _match(det, truth, iou_min: float) -> tuple[np.ndarray, int]:
    """(true-positive flag per detection, in score order; number of truths)."""
    boxes, scores, classes = det
    t_boxes, t_classes = truth[0], truth[2]
    used = np.zeros(len(t_boxes), bool)
    tp = np.zeros(len(boxes), bool)
    for j in np.argsort(-scores, kind="stable"):
        cand = (~used) & (t_classes == classes[j])
        if cand.any():
            ious = np.where(cand, _iou(boxes[j], t_boxes), -1.0)
            k = int(ious.argmax())
            if ious[k] >= iou_min:
                used[k], tp[j] = True, True
    return tp, len(t_boxes)


def _average_precision(dets: list, truths: list, iou_min: float) -> float:
    """mAP over classes (all-point interpolated AP), ``truths`` as ground truth, in %."""
    classes = sorted({int(c) for t in truths for c in t[2]})
    if not classes:
        return 100.0 if not any(len(d[0]) for d in dets) else 0.0
    aps = []
    for c in classes:
        scores, flags, n_truth = [], [], 0
        for d, t in zip(dets, truths):
            dc = tuple(x[d[2] == c] for x in d)
            tc = tuple(x[t[2] == c] for x in t)
            tp, n = _match(dc, tc, iou_min)
            order = np.argsort(-dc[1], kind="stable")
            scores += list(dc[1][order])
            flags += list(tp[order])
            n_truth += n
        order = np.argsort(-np.array(scores), kind="stable")
        hits = np.array(flags, dtype=np.float64)[order]
        tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
        recall = tp / n_truth
        precision = tp / np.maximum(tp + fp, 1e-12)
        r = np.concatenate([[0.0], recall, [1.0]])
        p = np.concatenate([[1.0], precision, [0.0]])
        p = np.maximum.accumulate(p[::-1])[::-1]
        aps.append(float(np.sum((r[1:] - r[:-1]) * p[1:])))
    return 100.0 * float(np.mean(aps))


def detection(outputs: dict, reference: dict, labels, options: dict) -> dict:
    o = {**DETECTION_OPTIONS, **options}
    dets, refs = decode_detections(outputs, o), decode_detections(reference, o)
    tp = sum(int(_match(d, r, o["match_iou"])[0].sum()) for d, r in zip(dets, refs))
    n_det, n_ref = sum(len(d[0]) for d in dets), sum(len(r[0]) for r in refs)
    top = [bool(len(d[0])) and _match(tuple(x[:1] for x in d), tuple(x[:1] for x in r), o["match_iou"])[0].all()
           for d, r in zip(dets, refs) if len(r[0])]
    scores = {"f1": 100.0 * 2 * tp / (n_det + n_ref) if n_det + n_ref else 100.0,
              "precision": 100.0 * tp / n_det if n_det else 100.0, "recall": 100.0 * tp / n_ref if n_ref else 100.0,
              "top1_agreement": 100.0 * float(np.mean(top)) if top else 100.0,
              "mAP50_vs_fp32": _average_precision(dets, refs, o["match_iou"]),
              "detections_per_sample": n_det / max(len(dets), 1)}
    if labels is not None and labels.ndim == 3:  # ground-truth boxes: [N, K, 5] class, x1, y1, x2, y2 (-1 pads)
        truths = [(b[b[:, 0] >= 0, 1:], np.ones(int((b[:, 0] >= 0).sum())), b[b[:, 0] >= 0, 0].astype(np.int64))
                  for b in labels]
        scores["mAP50"] = _average_precision(dets, truths, o["match_iou"])
    return scores


# ---- other built-in tasks ------------------------------------------------------------------------------
def _masks(a: np.ndarray, channel_axis: int) -> np.ndarray:
    a = np.moveaxis(a, channel_axis + 1, 1) if a.ndim >= 4 else a[:, None]
    if a.shape[1] > 1:
        return a.argmax(1)
    threshold = 0.5 if a.min() >= 0 and a.max() <= 1 else 0.0
    return (a[:, 0] > threshold).astype(np.int64)


def segmentation(outputs: dict, reference: dict, labels, options: dict) -> dict:
    name = default_output(reference, options)
    axis = int(options.get("channel_axis", 0))
    m, r = _masks(outputs[name], axis), _masks(reference[name], axis)
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


def ctc_greedy(a: np.ndarray, blank: int, class_axis: int) -> list[tuple[int, ...]]:
    seqs = []
    for s in a:
        s = np.moveaxis(s, class_axis, -1)
        s = s.reshape(-1, s.shape[-1]).argmax(-1)
        keep = np.concatenate([[True], s[1:] != s[:-1]]) & (s != blank)
        seqs.append(tuple(int(t) for t in s[keep]))
    return seqs


def sequence(outputs: dict, reference: dict, labels, options: dict) -> dict:
    name = default_output(reference, options)
    blank, axis = int(options.get("blank", 0)), int(options.get("class_axis", -1))
    out, ref = ctc_greedy(outputs[name], blank, axis), ctc_greedy(reference[name], blank, axis)
    tokens_out = np.moveaxis(outputs[name], axis if axis < 0 else axis + 1, -1).argmax(-1)
    tokens_ref = np.moveaxis(reference[name], axis if axis < 0 else axis + 1, -1).argmax(-1)
    scores = {"sequence_agreement": 100.0 * float(np.mean([a == b for a, b in zip(out, ref)])),
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
