"""The detection task (pipeline/tasks.py ``detection``): the outputs decoded by the plan pipeline/detection_plan.py
finds (threshold, NMS), and the score: detections of the artifact matched to the FP32 model's (F1) and the mean
average precision against labels."""
from __future__ import annotations

import numpy as np

from edgebuild.pipeline.detection_plan import (  # noqa: F401 (DETECTION_OPTIONS, with_image_size: re-exported)
    DETECTION_OPTIONS, DetectionPlan, as_rows, check_options, detection_plan, with_image_size)
from edgebuild.pipeline.errors import BadInputError

def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)  # (np.maximum: np.clip's wrapper costs more than the math)
    area = lambda b: np.maximum(b[..., 2] - b[..., 0], 0) * np.maximum(b[..., 3] - b[..., 1], 0)  # noqa: E731
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


def _anchor_points(plan: DetectionPlan) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) centre of every anchor cell, and its stride, in the outputs' anchor order (row-major per level)."""
    xy, stride = [], []
    for rows, cols, s in plan.levels:
        yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        xy.append(np.stack([(xx.ravel() + plan.cell_offset) * s, (yy.ravel() + plan.cell_offset) * s], 1))
        stride.append(np.full(rows * cols, s))
    return np.concatenate(xy), np.concatenate(stride)


def _dfl_sample(outputs: dict, plan: DetectionPlan, i: int, points, threshold: float):
    """One sample of a DFL head: (boxes x1y1x2y2, scores [K, C]) of the anchors whose best score passes ``threshold``."""
    n = len(plan.names) // 2
    scores = np.concatenate([as_rows(outputs[s][i]) for s in plan.names[:n]]).astype(np.float64)
    if plan.sigmoid:
        scores = 1.0 / (1.0 + np.exp(-scores))
    centres, stride = points
    if len(scores) != len(centres):
        raise BadInputError(f"task detection (dfl layout): {len(scores)} anchors in the outputs, {len(centres)} in the grid")
    keep = scores.max(1) >= threshold
    dist = np.concatenate([as_rows(outputs[b][i]) for b in plan.names[n:]])[keep].astype(np.float64)
    dist = dist.reshape(-1, 4, plan.bins)
    if plan.softmax:
        dist = np.exp(dist - dist.max(-1, keepdims=True))
        dist /= dist.sum(-1, keepdims=True)
    ltrb = (dist * np.arange(plan.bins)).sum(-1) * stride[keep, None]  # expected distance per side, in pixels
    c = centres[keep]
    return np.concatenate([c - ltrb[:, :2], c + ltrb[:, 2:]], 1), scores[keep]


def decode_detections(outputs: dict[str, np.ndarray], options: dict,
                      plan: DetectionPlan | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per sample: (boxes [K, 4] x1y1x2y2, scores [K], classes [K]) after score threshold and class-wise NMS.

    Layouts: ``yolo`` — one output [4 + C, A] or [A, 4 + C] per sample (cx, cy, w, h, class scores; YOLOv8
    and later); ``yolo_obj`` — [A, 5 + C] (cx, cy, w, h, objectness, class scores; YOLOv5/v7); ``ssd`` — a
    boxes output [A, 4] (x1, y1, x2, y2 unless ``box_format``) and a scores output [A, C]; ``dfl`` — per FPN
    level a scores output [A_l, C] and a box-distribution output [A_l, 4 x bins] (GFL/DFL heads: PicoDet,
    NanoDet-Plus, raw YOLOv6/v8): each side (left, top, right, bottom) is the expectation of a softmax over the
    bins times the level's stride, from the centre of the anchor's cell. ``plan`` (``detection_plan``): how to
    read them, settled on the reference so an artifact is read the same way.
    """
    o = check_options(options)
    plan = plan or detection_plan(outputs, options)
    n = len(outputs[plan.names[0]])
    points = _anchor_points(plan) if plan.layout == "dfl" else None
    result = []
    for i in range(n):
        if plan.layout == "dfl":
            boxes, scores = _dfl_sample(outputs, plan, i, points, o["score_threshold"])
            fmt = "xyxy"
        elif plan.layout == "ssd":
            boxes = outputs[plan.names[0]][i].reshape(-1, 4).astype(np.float64)
            scores = outputs[plan.names[1]][i].reshape(len(boxes), -1).astype(np.float64)
            fmt = "xyxy" if o["box_format"] == "auto" else o["box_format"]
            if o["background_class"] is not None:
                scores = scores.copy()
                scores[:, int(o["background_class"])] = 0.0
        else:
            a = outputs[plan.names[0]][i].astype(np.float64)
            a = a.reshape([d for d in a.shape if d != 1] or [1])
            if a.ndim != 2:
                raise BadInputError(f"task detection ({plan.layout}): output {plan.names[0]} must be [4+C, anchors] per sample, got {list(a.shape)}")
            a = a.T if a.shape[0] < a.shape[1] else a  # -> [anchors, 4 + C]
            fmt = "cxcywh" if o["box_format"] == "auto" else o["box_format"]
            boxes = a[:, :4]
            scores = a[:, 5:] * a[:, 4:5] if plan.layout == "yolo_obj" else a[:, 4:]
        boxes = _xyxy(boxes, fmt)
        cls = scores.argmax(1) if len(scores) else np.zeros(0, np.int64)
        best = scores[np.arange(len(scores)), cls]
        keep = best >= o["score_threshold"]
        result.append(_nms(boxes[keep], best[keep], cls[keep], o["iou_threshold"], int(o["max_detections"])))
    return result


def _pairs(det, truth, iou_min: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching, the detections in score order: (flag per detection: matched; flag per truth:
    used)."""
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
    return tp, used


def _match(det, truth, iou_min: float) -> tuple[np.ndarray, int]:
    """(true-positive flag per detection, in score order; number of truths)."""
    return _pairs(det, truth, iou_min)[0], len(truth[0])


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


def _near_tie_band(o: dict) -> tuple[float, float] | None:
    """(lower, upper) score of a near-tie detection: within ``near_tie_ratio`` of the threshold on either side — of
    the score below a threshold of 0.5, of one minus the score above it (a 0.85 threshold: 0.8125-0.88, not 0.68-1);
    None for exact matching (ratio 1, or a threshold that is no probability)."""
    from edgebuild.pipeline.metrics import NEAR_TIE_RATIO

    ratio, t = o["near_tie_ratio"] if o["near_tie_ratio"] is not None else NEAR_TIE_RATIO, o["score_threshold"]
    if ratio >= 1 or not 0 < t < 1:
        return None
    return (t * ratio, t / ratio) if t <= 0.5 else (1 - (1 - t) / ratio, 1 - (1 - t) * ratio)


def _near_ties(a, b_below, matched: np.ndarray, upper: float, iou: float) -> int:
    """How many of ``a``'s boxes the exact matching left unmatched, scored below ``upper``, that a box of the other
    side found just below the threshold (``b_below``) matches, one to one."""
    left = ~matched & (a[1] < upper)
    if not left.any() or not len(b_below[0]):
        return 0
    return int(_pairs(tuple(x[left] for x in a), b_below, iou)[0].sum())


def _agreement(d, r, d_low, r_low, o: dict, band) -> tuple[int, int, int]:
    """(exact pairs, FP32 boxes found only as near-ties, artifact boxes kept only as near-ties) of one sample: one
    one-to-one matching of the boxes above the threshold, then each side's unmatched near-tie boxes against the other
    side's boxes between the band's lower score and the threshold (boxes no exact pair used)."""
    tp, used = _pairs(d, r, o["match_iou"])
    if band is None:
        return int(tp.sum()), 0, 0
    t = o["score_threshold"]
    below = lambda x: tuple(v[x[1] < t] for v in x)  # noqa: E731 (the band boxes of a low-threshold decode)
    return (int(tp.sum()), _near_ties(r, below(d_low), used, band[1], o["match_iou"]),
            _near_ties(d, below(r_low), tp, band[1], o["match_iou"]))


def detection(outputs: dict, reference: dict, labels, options: dict) -> dict:
    o = check_options(options)
    plan = detection_plan(reference, options)  # read the FP32 outputs' layout once; the artifact's are read alike
    dets, refs = decode_detections(outputs, options, plan), decode_detections(reference, options, plan)
    n_det, n_ref = sum(len(d[0]) for d in dets), sum(len(r[0]) for r in refs)
    band = _near_tie_band(o)
    if band:  # a box one side finds just below the threshold, where the other finds it just above, agrees
        low = {**options, "score_threshold": band[0]}
        dets_low, refs_low = decode_detections(outputs, low, plan), decode_detections(reference, low, plan)
    else:
        dets_low = refs_low = [None] * len(dets)
    counts = np.array([_agreement(d, r, dl, rl, o, band) for d, r, dl, rl in zip(dets, refs, dets_low, refs_low)]
                      ).reshape(-1, 3).sum(0)
    tp, near_ref, near_det = (int(c) for c in counts)
    top = [bool(len(d[0])) and _match(tuple(x[:1] for x in d), tuple(x[:1] for x in r), o["match_iou"])[0].all()
           for d, r in zip(dets, refs) if len(r[0])]
    scores = {"f1": 100.0 * (2 * tp + near_ref + near_det) / (n_det + n_ref) if n_det + n_ref else 100.0,
              "f1_exact": 100.0 * 2 * tp / (n_det + n_ref) if n_det + n_ref else 100.0,
              "precision": 100.0 * (tp + near_det) / n_det if n_det else 100.0,
              "recall": 100.0 * (tp + near_ref) / n_ref if n_ref else 100.0,
              "top1_agreement": 100.0 * float(np.mean(top)) if top else 100.0,
              "mAP50_vs_fp32": _average_precision(dets, refs, o["match_iou"]),
              "detections_per_sample": n_det / max(len(dets), 1)}
    if labels is not None and labels.ndim == 3:  # ground-truth boxes: [N, K, 5] class, x1, y1, x2, y2 (-1 pads)
        truths = [(b[b[:, 0] >= 0, 1:], np.ones(int((b[:, 0] >= 0).sum())), b[b[:, 0] >= 0, 0].astype(np.int64))
                  for b in labels]
        scores["mAP50"] = _average_precision(dets, truths, o["match_iou"])
    return scores
