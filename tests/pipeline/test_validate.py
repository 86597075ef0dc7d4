import numpy as np
import pytest

from edgebuild.pipeline.validate import Budget, compare, judge

BUDGET = Budget(0.5, None, None, None)


def test_scalar_outputs_are_judged_across_samples():
    ref = [[np.array([[1.0]])], [np.array([[2.0]])], [np.array([[3.0]])]]
    bad = [[np.array([[25.0]])], [np.array([[-3.0]])], [np.array([[0.0]])]]
    m = compare(ref, bad, None)
    assert m["cosine_min"] < 0.9 and any("cosine" in f for f in judge(m, 1, None, BUDGET))
    assert not judge(compare(ref, ref, None), 1, None, BUDGET)


def test_nan_outputs_fail():
    ref = [[np.array([[0.1, 0.9]])], [np.array([[0.8, 0.2]])]]
    nan = [[np.full((1, 2), np.nan)], [np.full((1, 2), np.nan)]]
    m = compare(ref, nan, np.array([1, 0]))
    assert not m["finite"] and m["accuracy"] == 0.0
    assert any("NaN" in f for f in judge(m, 1, None, BUDGET))


def test_missing_outputs_are_an_error_not_a_pass():
    ref = [[np.ones((1, 3)), np.ones((1, 2))]]
    with pytest.raises(ValueError, match="outputs"):
        compare(ref, [[np.ones((1, 3))]], None)


def test_accuracy_drop_and_disagreement_without_labels():
    ref = [[np.array([[0.1, 0.9]])], [np.array([[0.8, 0.2]])], [np.array([[0.3, 0.7]])], [np.array([[0.6, 0.4]])]]
    out = [[np.array([[0.9, 0.1]])], *ref[1:]]
    m = compare(ref, out, np.array([1, 0, 1, 0]))
    assert m["accuracy_drop"] == pytest.approx(25.0) and m["top1_agreement"] == pytest.approx(75.0)
    assert judge(m, 1, None, BUDGET) == ["accuracy drop 25.00 pt > max 0.5 pt"]
    unlabeled = compare(ref, out, None)
    assert judge(unlabeled, 1, None, BUDGET) == ["top-1 disagreement with FP32 (no labels) 25.00 pt > max 0.5 pt"]


def test_latency_and_size_budgets():
    ref = [[np.array([[0.1, 0.9]])]]
    m = compare(ref, ref, None)
    fails = judge(m, 3_000_000, {"p50_ms": 12.0}, Budget(0.5, 10.0, 2.0, None))
    assert fails == ["latency p50 12.000 ms > max 10.0 ms", "size 3.000 MB > max 2.0 MB"]
