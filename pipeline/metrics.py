"""Per-output fidelity metrics: every output judged on its own, with a measure that suits what it is.

Outputs are stacked over the evaluation samples (``[N, *shape]``). What an output *is* (its ``kind``) is
decided from the data and the build's declarations, never from its position:

- ``class_scores``: a vector of C > 1 scores per sample that carries the labels, or that the task declares,
  or that is plainly a probability distribution (non-negative, sums to 1) — judged by top-1/top-5 agreement
  and accuracy with labels, plus a cosine floor so a uniform or all-zero output cannot pass on agreement;
- ``vector`` / ``tensor`` / ``scalar``: everything else — judged by cosine similarity per sample and, for the
  whole evaluation set, per *channel group*.

Channel groups catch the collapse a whole-tensor measure hides: a YOLO-style output ``[4 + C, anchors]``
holds box coordinates in pixels (hundreds) next to class scores in [0, 1]; their whole-tensor cosine is
dominated by the boxes, so scores quantized to two values still give 0.999. Here the output is split along
the axis whose slices differ most in magnitude, slices of the same order of magnitude form a group, and
each group gets its own cosine and SQNR over the set.
"""
from __future__ import annotations

import numpy as np

from edgebuild.similarity import cosine, per_sample_cosine  # the one definition (a leaf: targets/ use it too)

# A decision within this probability ratio of going the other way is a near-tie for the FP32 model itself: the
# artifact may take either side. A CTC frame: the artifact's class at least this likely, in FP32, as FP32's pick (an
# 8210-class captcha model's dynamic INT8 changed 3 of 200 strings, each at one frame whose FP32 top two were 0.02-0.09
# apart in log-probability; 1st percentile of its frames' margins: 0.47). A detection: its score within this ratio of
# the threshold on both sides (PicoDet's layout detector: 19 % of its FP32 boxes score 0.25-0.30 at threshold 0.25).
# ``task_options.near_tie_ratio``: 1 asks for exact agreement.
NEAR_TIE_RATIO = 0.8
GROUP_GAP = 20.0  # slices whose magnitudes differ by more than this factor belong to different groups
MAX_GROUPS = 6
DEAD = 1e-12  # a slice whose range is below this fraction of the output's range carries nothing to judge
SOFTMAX_TOL = 1e-3
NEAR_ZERO = 0.1  # samples whose norm is below this fraction of the median have no direction to judge
NEGLIGIBLE_SCORE = 0.05  # a group of [0, 1] scores that never reaches this is below any decision threshold
NO_ENERGY = 1e-4  # a channel group whose magnitude is below this fraction of the output's has no energy: never judged


def sqnr_db(r: np.ndarray, o: np.ndarray) -> float:
    r, o = r.astype(np.float64).ravel(), o.astype(np.float64).ravel()
    noise = float(((r - o) ** 2).sum())
    signal = float((r ** 2).sum())
    if noise == 0.0:
        return 200.0
    return float(10 * np.log10(signal / noise)) if signal else -200.0


def sqnr_floor_db(min_cosine: float) -> float:
    """The SQNR at which an error orthogonal to the signal gives cosine ``min_cosine`` (0.99 -> 16.9 dB)."""
    c = min(max(min_cosine, 1e-6), 1 - 1e-9)
    return float(10 * np.log10(c * c / (1 - c * c)))


def sample_vector(a: np.ndarray) -> np.ndarray | None:
    """``[N, C]`` when each sample of ``a`` is one vector of C > 1 values (e.g. [N, 1, C]), else None."""
    sq = [d for d in a.shape[1:] if d != 1]
    return a.reshape(len(a), sq[0]) if len(sq) == 1 and sq[0] > 1 else None


def is_distribution(a: np.ndarray) -> bool:
    """Every sample a probability distribution (softmax output)."""
    v = sample_vector(a)
    return v is not None and bool(np.all(v >= -SOFTMAX_TOL)) and bool(np.allclose(v.sum(1), 1.0, atol=SOFTMAX_TOL * v.shape[1]))


def channel_groups(ref: np.ndarray) -> tuple[int | None, list[np.ndarray]]:
    """(axis of the per-sample shape, index groups) splitting ``ref`` into slices of similar magnitude.

    The axis is the one whose slices' magnitudes (max |value| over the set) spread over the most orders of
    magnitude; slices are sorted by magnitude and cut where consecutive ones differ by more than ``GROUP_GAP``. One group (None, [])
    when nothing differs that much.
    """
    best = (0.0, None, None)
    for axis in range(1, ref.ndim):
        if ref.shape[axis] < 2:
            continue
        moved = np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1).astype(np.float64)
        ranges = np.abs(moved).max(1)  # the magnitude an int8 scale must cover (zero is always in range)
        live = ranges > DEAD * max(float(ranges.max()), 1e-30)
        if live.sum() < 2:
            continue
        logs = np.log10(ranges[live])
        spread = float(logs.max() - logs.min())
        if spread > best[0]:
            best = (spread, axis, ranges)
    spread, axis, ranges = best
    if axis is None or spread < np.log10(GROUP_GAP):
        return None, []
    order = np.argsort(ranges)
    floor = DEAD * float(ranges.max())
    order = order[ranges[order] > floor]
    gaps = np.log10(ranges[order][1:]) - np.log10(ranges[order][:-1])
    cuts = sorted(i + 1 for i in np.argsort(gaps)[::-1][: MAX_GROUPS - 1] if gaps[i] > np.log10(GROUP_GAP))
    return axis - 1, [np.sort(g) for g in np.split(order, cuts)]


def describe_group(idx: np.ndarray) -> str:
    if len(idx) > 1 and np.all(np.diff(idx) == 1):
        return f"{idx[0]}..{idx[-1]}"
    shown = ",".join(str(i) for i in idx[:6])
    return shown + ("…" if len(idx) > 6 else "")


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict:
    """Cosine (worst of per sample, over the set, and per channel group), SQNR, errors, for one output."""
    m: dict = {"max_abs_error": float(np.abs(ref.astype(np.float64) - out).max(initial=0.0))}
    scale = float(np.abs(ref).max(initial=0.0)) or 1.0
    m["max_rel_error"] = m["max_abs_error"] / scale
    whole = cosine(ref, out)
    per_sample = per_sample_cosine(ref, out) if ref[0].size > 1 else np.array([whole])
    m["cosine_mean"] = float(per_sample.mean())
    m["sqnr_db"] = sqnr_db(ref, out)
    m["cosine_set"] = whole
    m["cosine_energy"] = energy_weighted_cosine(ref, out, per_sample)
    worst = min(float(_directional(ref, per_sample).min()), whole)
    worst_sqnr = m["sqnr_db"]
    axis, groups = channel_groups(ref)
    if groups:
        m["groups"] = []
        for g in groups:
            r, o = np.take(ref, g, axis=axis + 1), np.take(out, g, axis=axis + 1)
            c = cosine(r, o)
            # scores that never come near a threshold are not judged: their int8 rounding decides nothing; nor are
            # channels with no energy (an embedding dimension of ~2e-8 next to values of ~0.1: its SQNR is noise)
            judged = not (r.min() >= 0 and r.max() < NEGLIGIBLE_SCORE) and \
                float(np.abs(r).max(initial=0.0)) >= NO_ENERGY * scale
            if judged:
                worst, worst_sqnr = min(worst, c), min(worst_sqnr, sqnr_db(r, o))
            m["groups"].append({"axis": axis, "slices": describe_group(g), "count": int(len(g)),
                                "range": float(r.max() - r.min()), "cosine": c, "sqnr_db": sqnr_db(r, o),
                                "judged": judged})
    m["cosine"] = worst
    m["sqnr_min_db"] = worst_sqnr  # cosine forgives a scaled output (scores x1.3); the error's energy does not
    if np.all((ref >= 0) & (ref <= 1)) and ref.size:  # scores/probabilities: do thresholded decisions agree?
        rp, op = ref >= 0.5, out >= 0.5
        either = int((rp | op).sum())
        m["decision_agreement"] = 100.0 * int((rp & op).sum()) / either if either else 100.0
    return m


def energy_weighted_cosine(ref: np.ndarray, out: np.ndarray, per_sample: np.ndarray | None = None) -> float:
    """Mean per-sample cosine, each sample weighted by its energy (squared norm): a near-silent frame or a
    near-zero regression target counts for as little as it weighs, a collapse of the loud ones is not averaged away."""
    if per_sample is None:
        per_sample = per_sample_cosine(ref, out) if ref[0].size > 1 else np.array([cosine(ref, out)])
    if len(per_sample) != len(ref):
        return float(per_sample.mean())
    energy = (ref.reshape(len(ref), -1).astype(np.float64) ** 2).sum(1)
    total = float(energy.sum())
    return float((energy * per_sample).sum() / total) if total > 0 else float(per_sample.mean())


def _directional(ref: np.ndarray, per_sample: np.ndarray) -> np.ndarray:
    """Per-sample cosines of the samples whose vector has a direction worth judging.

    A near-zero vector (a box regression of a centred face: offsets of 0.01) has no meaningful direction:
    an error of 0.005 turns its cosine to 0.7. Samples below ``NEAR_ZERO`` of the median norm are judged by
    the set-wide cosine and SQNR instead.
    """
    if len(per_sample) < 2:
        return per_sample
    norms = np.linalg.norm(ref.reshape(len(ref), -1).astype(np.float64), axis=1)
    keep = norms >= NEAR_ZERO * float(np.median(norms))
    return per_sample[keep] if keep.any() else per_sample


def class_agreement(ref: np.ndarray, out: np.ndarray) -> dict:
    r, o = sample_vector(ref), sample_vector(out)
    m = {"top1_agreement": float((r.argmax(1) == o.argmax(1)).mean() * 100)}
    if r.shape[1] > 5:
        top5 = np.argsort(-o, axis=1)[:, :5]
        m["top5_agreement"] = float(np.mean([a in t for a, t in zip(r.argmax(1), top5)]) * 100)
    return m


def accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    v = sample_vector(scores)
    if k == 1:
        return float((v.argmax(1) == labels).mean() * 100)
    topk = np.argsort(-v, axis=1)[:, :k]
    return float(np.mean([lab in t for lab, t in zip(labels, topk)]) * 100)
