"""The near-tie rule of the task metrics (pipeline/metrics.py NEAR_TIE_RATIO): a decision FP32 made on the fence may go
either way, and nothing else is forgiven — no box counted twice, no sure box, no box below the band."""
import numpy as np
import pytest

from edgebuild.pipeline import detection as D
from edgebuild.pipeline.tasks import sequence


def yolo(rows) -> dict:
    """One sample of a YOLO head without objectness ([anchors, 4 + 1 class], cxcywh) holding ``rows`` of
    ((x1, y1, x2, y2), score)."""
    a = np.zeros((1, 8, 5), np.float32)
    for i, ((x1, y1, x2, y2), s) in enumerate(rows):
        a[0, i] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, s]
    return {"y": a}


def scores(art, ref, **options) -> dict:
    return D.detection(art, ref, None, {"layout": "yolo", **options})


A, B = (0, 0, 10, 10), (40, 0, 50, 10)  # two boxes far apart


def test_a_fence_box_either_side_is_found_and_a_box_below_the_band_or_a_sure_one_is_not():
    assert scores(yolo([(A, 0.9), (B, 0.22)]), yolo([(A, 0.9), (B, 0.27)]))["f1"] == 100.0  # FP32 above, artifact below
    m = scores(yolo([(A, 0.9), (B, 0.27)]), yolo([(A, 0.9), (B, 0.22)]))  # the artifact above, FP32 below
    assert m["f1"] == 100.0 and m["precision"] == 100.0 and m["f1_exact"] < 100.0
    assert scores(yolo([(A, 0.9), (B, 0.19)]), yolo([(A, 0.9), (B, 0.27)]))["f1"] < 100.0  # below the band (0.2)
    assert scores(yolo([(A, 0.9), (B, 0.22)]), yolo([(A, 0.9), (B, 0.4)]))["f1"] < 100.0  # FP32 sure of it


def test_one_box_is_never_credited_twice():
    """FP32: R1 (0.9) and R2 (0.26, on the fence); the artifact: D (0.9), which overlaps both, and D' (0.21), R1's
    own counterpart pushed down from 0.9. R1-D is the exact pair; R2 may not take D again."""
    r1, r2, d, d_ = (9.4, 0, 24.1, 10), (4.3, 0, 14.3, 10), (5.4, 0, 18.8, 10), (14.1, 0, 22.7, 10)
    m = scores(yolo([(d, 0.9), (d_, 0.21)]), yolo([(r1, 0.9), (r2, 0.26)]))
    assert m["f1"] == m["f1_exact"] == pytest.approx(200 / 3) and m["recall"] == 50.0


def test_ratio_one_is_the_exact_matching():
    d1, d2, r1, r2 = (12.38, 0, 24.75, 10), (17.27, 0, 32.24, 10), (10.97, 0, 19.39, 10), (17.09, 0, 27.24, 10)
    art, ref = yolo([(d1, 0.9), (d2, 0.8)]), yolo([(r1, 0.9), (r2, 0.8)])
    for options in ({"near_tie_ratio": 1}, {}):
        m = scores(art, ref, **options)
        assert m["f1"] == m["f1_exact"] == 50.0 and m["precision"] == m["recall"] == 50.0


def test_above_a_half_the_band_is_on_one_minus_the_score():
    """At threshold 0.85 the band is 0.8125-0.88: a box FP32 scores 0.99 and the artifact 0.70 is lost."""
    assert D._near_tie_band({"near_tie_ratio": None, "score_threshold": 0.85}) == pytest.approx((0.8125, 0.88))
    assert scores(yolo([(A, 0.7)]), yolo([(A, 0.99)]), score_threshold=0.85)["f1"] == 0.0
    assert scores(yolo([(A, 0.83)]), yolo([(A, 0.86)]), score_threshold=0.85)["f1"] == 100.0


def test_sigmoid_scores_are_probabilities_even_when_they_do_not_sum_to_one():
    """Per-class sigmoid scores (a frame 0.30 against 0.10: three times as likely) are no near-tie; logits that
    close (0.30 against 0.10) are."""
    ref = np.full((1, 4, 3), 0.01, np.float32)
    ref[0, :, 1] = 0.3  # FP32 reads class 1 in every frame
    ref[0, 1, 2] = 0.1
    out = ref.copy()
    out[0, 1, 2] = 0.35  # the artifact flips frame 1 to class 2
    assert sequence({"y": out}, {"y": ref}, None, {})["sequence_agreement"] == 0.0
    assert sequence({"y": out + 2}, {"y": ref + 2}, None, {})["sequence_agreement"] == 100.0  # as logits: a near-tie


def test_a_positive_class_axis_is_read_within_one_sample():
    ref = np.full((2, 5, 6), -4.0, np.float32)  # [samples, classes, frames]: class_axis 0 of a sample
    ref[:, [1, 0, 2, 0, 3, 0], np.arange(6)] = 8.0
    ref[0, 4, 2] = 7.95  # sample 0, frame 2: class 4 a near-tie
    ref[1, 4, 2] = 6.0  # sample 1: class 4 seven times less likely
    out = ref.copy()
    out[:, 4, 2] = 8.5
    m = sequence({"y": out}, {"y": ref}, None, {"class_axis": 0})
    assert m["sequence_agreement"] == 50.0 and m["sequence_agreement_exact"] == 0.0
