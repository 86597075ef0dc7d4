"""Task evaluators: what a model's outputs *mean*, scored the same way on the FP32 reference and an artifact.

``task:`` in edgebuild.yaml selects one (``task_options:`` tunes it); ``evaluator: pkg.mod:fn`` adds a
user's own. Each returns named scores, higher is better; the gate compares the artifact's scores with the
reference's (``<score>_drop``) or with a floor (``<score>_min``), see ``DEFAULT_GATES``.

Outputs reach an evaluator stacked over samples, by output name: ``{name: [N, *shape]}``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
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
                     "boxes_output": None, "scores_output": None,
                     # layout dfl (GFL / Distribution Focal Loss heads: PicoDet, NanoDet-Plus, GFL, raw YOLOv6/v8)
                     "strides": None, "bins": None, "input_size": None, "cell_offset": 0.5, "scores_activation": "auto"}
LAYOUTS = ("auto", "yolo", "yolo_obj", "ssd", "dfl")
DFL_MIN_BINS = 4  # auto-detection: a side's distribution has at least 4 bins (PicoDet/NanoDet 8, GFL/YOLOv8 16-17)
STRIDE_CHOICES = tuple(2 ** k for k in range(11))  # strides tried when none are given: 1 .. 1024


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


def _check_options(options: dict) -> dict:
    """The detection options merged over the defaults; a wrong one is exit 2 with one line naming it."""
    unknown = sorted(set(options) - set(DETECTION_OPTIONS))
    if unknown:
        raise BadInputError(f"task_options.{unknown[0]} is not a detection option ({', '.join(DETECTION_OPTIONS)})")
    o = {**DETECTION_OPTIONS, **options}

    def bad(key: str, want: str):
        raise BadInputError(f"task_options.{key} must be {want}, got {o[key]!r}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if o["layout"] not in LAYOUTS:
        bad("layout", " or ".join((", ".join(LAYOUTS[:-1]), LAYOUTS[-1])))
    for key in ("score_threshold", "iou_threshold", "match_iou"):
        if not number(o[key]) or (key != "score_threshold" and not 0 < o[key] <= 1):
            bad(key, "a number" if key == "score_threshold" else "a number in (0, 1]")
    if not number(o["max_detections"]) or int(o["max_detections"]) != o["max_detections"] or o["max_detections"] < 1:
        bad("max_detections", "a positive integer")
    strides = o["strides"]
    if strides is not None and not (number(strides) and strides > 0) and not (
            isinstance(strides, (list, tuple)) and strides and all(number(s) and s > 0 for s in strides)):
        bad("strides", "a positive number (the finest level's; each next level doubles it) or a list of them, finest first")
    if o["bins"] is not None and not (isinstance(o["bins"], int) and not isinstance(o["bins"], bool) and o["bins"] >= 2):
        bad("bins", "an integer >= 2 (values per box side: reg_max + 1)")
    size = o["input_size"]
    if size is not None and not (number(size) and size > 0) and not (
            isinstance(size, (list, tuple)) and len(size) == 2 and all(number(d) and d > 0 for d in size)):
        bad("input_size", "[height, width] in pixels")
    if not number(o["cell_offset"]) or not 0 <= o["cell_offset"] <= 1:
        bad("cell_offset", "a number in [0, 1] (anchor point within its cell: PicoDet 0.5, NanoDet 0)")
    if o["scores_activation"] not in ("auto", "none", "sigmoid"):
        bad("scores_activation", "auto, none or sigmoid")
    for key in ("boxes_output", "scores_output"):
        v = o[key]
        if v is not None and not isinstance(v, str) and not (
                isinstance(v, (list, tuple)) and v and all(isinstance(n, str) for n in v)):
            bad(key, "an output name or a list of output names")
    return o


@dataclass(frozen=True)
class DetectionPlan:
    """How a model's detection outputs are read: settled once on the FP32 reference, applied alike to every artifact.

    ``names``: yolo/yolo_obj (output,); ssd (boxes, scores); dfl (scores per level..., boxes per level...).
    ``levels`` (dfl): (rows, cols, stride) of each level's anchor grid, finest first, in the outputs' anchor order."""

    layout: str
    names: tuple[str, ...]
    levels: tuple[tuple[int, int, float], ...] = ()
    bins: int = 0
    sigmoid: bool = False  # dfl: scores are logits (the reference leaves [0, 1]): sigmoid before the threshold
    softmax: bool = True  # dfl: box values are logits of each side's distribution (not already probabilities)
    cell_offset: float = 0.5

    def describe(self) -> str:
        if self.layout != "dfl":
            return f"layout {self.layout} ({', '.join(self.names)})"
        grids = ", ".join(f"{h}x{w}/{s:g}" for h, w, s in self.levels)
        return f"layout dfl: {len(self.levels)} levels (rows x cols / stride: {grids}), {self.bins} bins per side"


def _rows(a: np.ndarray) -> np.ndarray:
    """One sample's output as [anchors, values] (its last axis holds the values, leading 1s and levels are flattened)."""
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def _unit(a: np.ndarray) -> bool:
    return bool(a.size) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def _grid_count(h: float, w: float, s: float) -> int:
    return int(np.ceil(h / s - 1e-9) * np.ceil(w / s - 1e-9))


def _stride_list(strides, n_levels: int) -> list[float] | None:
    if strides is None:
        return None
    if isinstance(strides, (list, tuple)):
        return [float(s) for s in strides]
    return [float(strides) * 2 ** k for k in range(n_levels)]


def _grids(anchors: list[int], o: dict) -> tuple[tuple[tuple[int, int, float], ...], str]:
    """(rows, cols, stride) per level for pairs with these anchor counts (finest first), or ((), why not).

    With ``input_size`` (edgebuild fills it from the model's image input): each level is ceil(H / s) x ceil(W / s)
    cells (PicoDet/NanoDet), at the given strides or the strides that double from level to level that fit; one
    output pair may hold several levels concatenated. Without it, the finest grid is the factorisation of its
    anchor count that the halving reproduces (ties: the squarest, then the wider), at stride ``strides`` or 8 —
    agreement with FP32 is the same at any scale, only ground-truth boxes need the real one."""
    n_levels = len(anchors)
    given = _stride_list(o["strides"], n_levels)
    size = o["input_size"]
    if size is not None:
        h, w = (float(size), float(size)) if not isinstance(size, (list, tuple)) else (float(size[0]), float(size[1]))
        fits = lambda strides: [_grid_count(h, w, s) for s in strides]  # noqa: E731
        grid = lambda strides: tuple((int(np.ceil(h / s - 1e-9)), int(np.ceil(w / s - 1e-9)), s) for s in strides)  # noqa: E731
        if given is not None:
            if len(given) == n_levels and fits(given) == anchors:
                return grid(given), ""
            if n_levels == 1 and sum(fits(given)) == anchors[0]:
                return grid(given), ""
            return (), (f"strides {[f'{s:g}' for s in given]} on a {h:g}x{w:g} input give "
                        f"{fits(given)} anchors per level; the outputs have {anchors}")
        for s0 in STRIDE_CHOICES:
            strides = [s0 * 2 ** k for k in range(n_levels)]
            if fits(strides) == anchors:
                return grid(strides), ""
            if n_levels == 1:  # levels concatenated in one output pair
                for k in range(2, 7):
                    strides = [s0 * 2 ** j for j in range(k)]
                    if sum(fits(strides)) == anchors[0]:
                        return grid(strides), ""
        return (), f"anchor counts {anchors} fit no strides that double per level on a {h:g}x{w:g} input (set task_options.strides)"
    if n_levels == 1:
        side = int(round(np.sqrt(anchors[0])))
        if side * side != anchors[0]:
            return (), f"one level of {anchors[0]} anchors and no input size (set task_options.input_size)"
        s = given[0] if given else 8.0
        return ((side, side, s),), ""
    strides = given if given is not None else [8.0 * 2 ** k for k in range(n_levels)]
    if len(strides) != n_levels:
        return (), f"{len(strides)} strides for {n_levels} levels ({anchors} anchors)"
    found = []
    for r in range(1, anchors[0] + 1):
        if anchors[0] % r:
            continue
        c = anchors[0] // r
        dims = [(int(np.ceil(r * strides[0] / s - 1e-9)), int(np.ceil(c * strides[0] / s - 1e-9))) for s in strides]
        if [a * b for a, b in dims] == anchors:
            found.append((abs(r - c), r > c, tuple((a, b, s) for (a, b), s in zip(dims, strides))))
    if not found:
        return (), f"anchor counts {anchors} are no grids that halve per level (set task_options.input_size or strides)"
    return min(found)[2], ""


def _dfl_pairs(outputs: dict, o: dict) -> tuple[list[tuple[str, str]], str]:
    """(scores, boxes) output pairs, finest level first, or ([], why not)."""
    anchors = {n: _rows(a[0]).shape[0] for n, a in outputs.items()}
    width = {n: _rows(a[0]).shape[1] for n, a in outputs.items()}
    listed = lambda v: [v] if isinstance(v, str) else list(v or ())  # noqa: E731
    scores, boxes = listed(o["scores_output"]), listed(o["boxes_output"])
    for n in scores + boxes:
        if n not in outputs:
            raise BadInputError(f"task_options: {n!r} is not an output of the model ({', '.join(outputs)})")
    min_bins = o["bins"] or DFL_MIN_BINS
    is_boxes = lambda n: width[n] % 4 == 0 and width[n] // 4 >= min_bins  # noqa: E731
    if scores or boxes:
        if len(scores) != len(boxes):
            raise BadInputError(f"task_options: {len(scores)} scores_output for {len(boxes)} boxes_output (one of each per level)")
        for s, b in zip(scores, boxes):
            if anchors[s] != anchors[b]:
                raise BadInputError(f"task_options: scores output {s} has {anchors[s]} anchors, boxes output {b} {anchors[b]}")
        pairs = list(zip(scores, boxes))
    else:
        by_count: dict[int, list[str]] = {}
        for n in outputs:
            by_count.setdefault(anchors[n], []).append(n)
        pairs = []
        for count, names in by_count.items():
            if len(names) != 2:
                return [], (f"outputs {', '.join(names)} ({count} anchors) are not one scores and one boxes output "
                            "(set task_options scores_output/boxes_output)")
            cand = [n for n in names if is_boxes(n)]
            if len(cand) == 2:  # both widths fit 4 x bins: the box logits are the ones outside [0, 1]
                cand = [n for n in names if not _unit(outputs[n])] if sum(_unit(outputs[n]) for n in names) == 1 else cand
            if len(cand) != 1:
                return [], (f"outputs {', '.join(names)}: no single one is box distributions [N, 4 x bins] "
                            "(set task_options scores_output/boxes_output)")
            pairs.append((next(n for n in names if n != cand[0]), cand[0]))
    pairs.sort(key=lambda p: -anchors[p[0]])
    return pairs, ""


def _dfl_plan(outputs: dict, o: dict, explicit: bool) -> DetectionPlan | None:
    """The dfl plan, or None when ``layout: auto`` and the outputs are not a DFL head (an explicit ``layout: dfl``
    and options that do not fit are exit 2)."""
    def fail(why: str):
        if explicit:
            raise BadInputError(f"task detection (dfl layout): {why}")
        return None

    pairs, why = _dfl_pairs(outputs, o)
    if not pairs:
        return fail(why or "no outputs")
    scores, boxes = [p[0] for p in pairs], [p[1] for p in pairs]
    widths = {_rows(outputs[b][0]).shape[1] for b in boxes}
    classes = {_rows(outputs[s][0]).shape[1] for s in scores}
    if len(widths) != 1 or len(classes) != 1:
        return fail(f"levels differ in box width {sorted(widths)} or class count {sorted(classes)}")
    width = widths.pop()
    bins = o["bins"] or width // 4
    if not explicit and bins < DFL_MIN_BINS:
        return None
    if width != 4 * bins:
        if o["bins"]:
            raise BadInputError(f"task_options.bins {o['bins']} does not fit boxes output {boxes[0]} "
                                f"({width} values per anchor, 4 x bins)")
        return fail(f"boxes output {boxes[0]} has {width} values per anchor, not 4 x bins")
    if not explicit and all(_unit(outputs[b]) for b in boxes) and o["strides"] is None and o["bins"] is None:
        return None  # probabilities in every box output: more likely another head than DFL logits
    levels, why = _grids([_rows(outputs[s][0]).shape[0] for s in scores], o)
    if not levels:
        if o["strides"] is not None or explicit:
            raise BadInputError(f"task detection (dfl layout): {why}")
        return None
    act = o["scores_activation"]
    sigmoid = act == "sigmoid" or (act == "auto" and not all(_unit(outputs[s]) for s in scores))
    dist = np.concatenate([_rows(outputs[b][0]) for b in boxes]).reshape(-1, 4, bins)
    softmax = not (float(dist.min()) >= 0 and np.allclose(dist.sum(-1), 1.0, atol=1e-3))
    return DetectionPlan("dfl", (*scores, *boxes), levels, bins, sigmoid, softmax, float(o["cell_offset"]))


def detection_plan(outputs: dict[str, np.ndarray], options: dict) -> DetectionPlan:
    """Which layout the outputs have and how to read them (``layout: auto`` recognises dfl, then ssd, else yolo)."""
    o = _check_options(options)
    names = list(outputs)
    layout = o["layout"]
    if layout in ("auto", "dfl") and len(names) >= 2 or layout == "dfl":
        plan = _dfl_plan(outputs, o, explicit=layout == "dfl")
        if plan is not None:
            return plan
    if layout == "auto":
        layout = "ssd" if o["boxes_output"] or (len(names) >= 2 and any(outputs[n].shape[-1] == 4 for n in names)) else "yolo"
    if layout == "ssd":
        boxes = o["boxes_output"] or next((n for n in names if outputs[n].shape[-1] == 4), None)
        scores = o["scores_output"] or next((n for n in names if n != boxes and outputs[n].ndim == outputs[boxes].ndim), None)
        if boxes is None or scores is None or not isinstance(boxes, str) or not isinstance(scores, str):
            raise BadInputError("task detection (ssd layout) needs a boxes output [..., N, 4] and a scores output [..., N, C]; "
                                "set task_options boxes_output/scores_output")
        return DetectionPlan(layout, (boxes, scores))
    name = o["scores_output"] or names[0]
    if not isinstance(name, str):
        raise BadInputError(f"task detection ({layout} layout) reads one output: scores_output must be one name")
    return DetectionPlan(layout, (name,))


def with_image_size(task: str, options: dict, inputs) -> dict:
    """``task_options`` plus ``input_size: [H, W]`` of the model's image input, for a detection build whose layout
    may be dfl (its anchor grid is cut from the input) and whose options do not give one."""
    if task != "detection" or options.get("input_size") is not None or options.get("layout", "auto") not in ("auto", "dfl"):
        return options
    for i in inputs:
        shape, layout = tuple(i.shape), str(getattr(i, "layout", "ANY")).upper()
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
            continue
        if layout == "NHWC" or (layout != "NCHW" and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4)):
            return {**options, "input_size": [shape[1], shape[2]]}
        return {**options, "input_size": [shape[2], shape[3]]}
    return options


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
    scores = np.concatenate([_rows(outputs[s][i]) for s in plan.names[:n]]).astype(np.float64)
    if plan.sigmoid:
        scores = 1.0 / (1.0 + np.exp(-scores))
    centres, stride = points
    if len(scores) != len(centres):
        raise BadInputError(f"task detection (dfl layout): {len(scores)} anchors in the outputs, {len(centres)} in the grid")
    keep = scores.max(1) >= threshold
    dist = np.concatenate([_rows(outputs[b][i]) for b in plan.names[n:]])[keep].astype(np.float64)
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
    o = _check_options(options)
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
    o = _check_options(options)
    plan = detection_plan(reference, options)  # read the FP32 outputs' layout once; the artifact's are read alike
    dets, refs = decode_detections(outputs, options, plan), decode_detections(reference, options, plan)
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
