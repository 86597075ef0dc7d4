"""How the detection task reads a model's outputs (pipeline/detection.py): the options (``check_options``), the
layout found from the outputs' shapes — YOLO, YOLO with objectness, SSD, or GFL/DFL distributions with their anchor
grid — as a ``DetectionPlan``, and the input size a DFL grid is cut from (``with_image_size``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgebuild.pipeline.errors import BadInputError

DETECTION_OPTIONS = {"layout": "auto", "score_threshold": 0.25, "iou_threshold": 0.45, "match_iou": 0.5,
                     "max_detections": 100, "box_format": "auto", "background_class": None, "near_tie_ratio": None,
                     "boxes_output": None, "scores_output": None,
                     # layout dfl (GFL / Distribution Focal Loss heads: PicoDet, NanoDet-Plus, GFL, raw YOLOv6/v8)
                     "strides": None, "bins": None, "input_size": None, "cell_offset": 0.5, "scores_activation": "auto"}
LAYOUTS = ("auto", "yolo", "yolo_obj", "ssd", "dfl")
DFL_MIN_BINS = 4  # auto-detection: a side's distribution has at least 4 bins (PicoDet/NanoDet 8, GFL/YOLOv8 16-17)
STRIDE_CHOICES = tuple(2 ** k for k in range(11))  # strides tried when none are given: 1 .. 1024


def check_options(options: dict) -> dict:
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
    ratio = o["near_tie_ratio"]
    if ratio is not None and not (number(ratio) and 0 < ratio <= 1):
        bad("near_tie_ratio", "a number in (0, 1] (1: exact matching)")
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


def as_rows(a: np.ndarray) -> np.ndarray:
    """One sample's output as [anchors, values] (its last axis holds the values, leading 1s and levels are flattened)."""
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


# how far outside [0, 1] float rounding takes probabilities (ONNX Runtime's Sigmoid gives 1.0000001)
PROBABILITY_SLACK = 1e-3


def in_unit_range(a: np.ndarray) -> bool:
    """Values in [0, 1] up to float rounding: probabilities (or normalized boxes), not logits."""
    return bool(a.size) and float(a.min()) >= -PROBABILITY_SLACK and float(a.max()) <= 1.0 + PROBABILITY_SLACK


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
    anchors = {n: as_rows(a[0]).shape[0] for n, a in outputs.items()}
    width = {n: as_rows(a[0]).shape[1] for n, a in outputs.items()}
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
                cand = [n for n in names if not in_unit_range(outputs[n])] if sum(in_unit_range(outputs[n]) for n in names) == 1 else cand
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
    widths = {as_rows(outputs[b][0]).shape[1] for b in boxes}
    classes = {as_rows(outputs[s][0]).shape[1] for s in scores}
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
    if not explicit and all(in_unit_range(outputs[b]) for b in boxes) and o["strides"] is None and o["bins"] is None:
        return None  # probabilities in every box output: more likely another head than DFL logits
    levels, why = _grids([as_rows(outputs[s][0]).shape[0] for s in scores], o)
    if not levels:
        if o["strides"] is not None or explicit:
            raise BadInputError(f"task detection (dfl layout): {why}")
        return None
    act = o["scores_activation"]
    sigmoid = act == "sigmoid" or (act == "auto" and not all(in_unit_range(outputs[s]) for s in scores))
    dist = np.concatenate([as_rows(outputs[b][0]) for b in boxes]).reshape(-1, 4, bins)
    softmax = not (float(dist.min()) >= 0 and np.allclose(dist.sum(-1), 1.0, atol=1e-3))
    return DetectionPlan("dfl", (*scores, *boxes), levels, bins, sigmoid, softmax, float(o["cell_offset"]))


def detection_plan(outputs: dict[str, np.ndarray], options: dict) -> DetectionPlan:
    """Which layout the outputs have and how to read them (``layout: auto`` recognises dfl, then ssd, else yolo)."""
    o = check_options(options)
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
