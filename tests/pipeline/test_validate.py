"""Validation judges every output on its own, by what it is; a collapsed head never passes."""
import numpy as np
import pytest

from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.stages.selection import selection_budget
from edgebuild.pipeline.stages.validate import (Budget, Judging, coarseness_warning, compare, judge, judges_accuracy_drop,
                                                quality_loss)

BUDGET = Budget(0.5, None, None, None)


def texts(m, budget=BUDGET, task="auto"):
    return [str(f) for f in judge(m, 1, None, budget, task)]


def test_scalar_outputs_are_judged_across_samples():
    ref = [[np.array([[1.0]])], [np.array([[2.0]])], [np.array([[3.0]])]]
    bad = [[np.array([[25.0]])], [np.array([[-3.0]])], [np.array([[0.0]])]]
    m = compare(ref, bad, None)
    assert m.cosine_min < 0.9 and any("cosine" in f for f in texts(m))
    assert not judge(compare(ref, ref, None), 1, None, BUDGET)


def test_nan_outputs_fail():
    ref = [[np.array([[0.1, 0.9]])], [np.array([[0.8, 0.2]])]]
    nan = [[np.full((1, 2), np.nan)], [np.full((1, 2), np.nan)]]
    m = compare(ref, nan, np.array([1, 0]))
    assert not m.finite and m.accuracy == 0.0
    assert any("NaN" in f for f in texts(m))


def test_missing_outputs_are_an_error_not_a_pass():
    ref = [[np.ones((1, 3)), np.ones((1, 2))]]
    with pytest.raises(ValueError, match="outputs"):
        compare(ref, [[np.ones((1, 3))]], None)


def _probs(n, c, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, c))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return p.astype(np.float32)


def test_accuracy_drop_and_disagreement_without_labels():
    ref = [[np.array([[0.1, 0.9]])], [np.array([[0.8, 0.2]])], [np.array([[0.3, 0.7]])], [np.array([[0.6, 0.4]])]]
    out = [[np.array([[0.9, 0.1]])], *ref[1:]]
    m = compare(ref, out, np.array([1, 0, 1, 0]))
    assert m.accuracy_drop == pytest.approx(25.0) and m.top1_agreement == pytest.approx(75.0)
    assert "accuracy drop 25.00 pt > max 0.5 pt" in texts(m)
    unlabeled = compare(ref, out, None)
    assert "top-1 disagreement with FP32 (no labels) 25.00 pt > max 0.5 pt" in texts(unlabeled)


def test_latency_and_size_budgets():
    ref = [[np.array([[0.1, 0.9]])]]
    m = compare(ref, ref, None)
    fails = [str(f) for f in judge(m, 3_000_000, {"p50_ms": 12.0}, Budget(0.5, 10.0, 2.0, None))]
    assert fails == ["latency p50 12.000 ms > max 10.0 ms", "size 3.000 MB > max 2.0 MB"]


def _yolo_like(n=24, classes=3, anchors=300, seed=0):
    """[1, 4 + C, A]: box coordinates in pixels next to sparse class scores in [0, 1]."""
    rng = np.random.default_rng(seed)
    ref = []
    for _ in range(n):
        boxes = np.stack([rng.uniform(20, 300, anchors), rng.uniform(20, 300, anchors),
                          rng.uniform(10, 60, anchors), rng.uniform(10, 60, anchors)])
        scores = rng.uniform(0, 0.02, (classes, anchors))
        hits = rng.integers(0, anchors, 4)
        scores[rng.integers(0, classes, 4), hits] = rng.uniform(0.4, 0.95, 4)
        ref.append([np.concatenate([boxes, scores])[None].astype(np.float32)])
    return ref


def _requantize(ref, step_scores, box_noise=0.3, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for (r,) in ref:
        o = r.copy()
        o[0, :4] += rng.normal(0, box_noise, o[0, :4].shape)
        o[0, 4:] = np.round(o[0, 4:] / step_scores) * step_scores
        out.append([o])
    return out


def test_collapsed_class_scores_in_a_wide_detector_output_fail_though_whole_tensor_cosine_is_high():
    ref = _yolo_like()
    collapsed = _requantize(ref, 320 / 255)  # scores share the boxes' int8 scale: two values, {0, 1.25}
    whole = np.concatenate([r[0].ravel() for r in ref]) @ np.concatenate([o[0].ravel() for o in collapsed])
    whole /= np.linalg.norm(np.concatenate([r[0].ravel() for r in ref])) * np.linalg.norm(np.concatenate([o[0].ravel() for o in collapsed]))
    assert whole > 0.999, "the blindness this guards against"
    m = compare(ref, collapsed, None)
    fails = texts(m)
    assert fails and "channel group 4..6 on axis 1" in fails[0]
    healthy = _requantize(ref, 1 / 255)  # scores on their own scale
    assert texts(compare(ref, healthy, None)) == []


def test_detection_task_decodes_and_fails_on_collapse_with_the_metric_named():
    ref = _yolo_like()
    j = Judging(task="detection")
    m = compare(ref, _requantize(ref, 320 / 255), None, j)
    assert m.task.reference["f1"] == 100.0 and m.task.artifact["f1"] < 90
    assert any(f.startswith("f1 ") and "< min 90" in f for f in texts(m, task="detection"))
    good = compare(ref, _requantize(ref, 1 / 255), None, j)
    assert good.task.artifact["f1"] == 100.0 and texts(good, task="detection") == []


def test_ssd_layout_two_outputs():
    rng = np.random.default_rng(3)
    ref = []
    for _ in range(10):
        xy = rng.uniform(0, 0.8, (50, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0.05, 0.2, (50, 2))], 1)[None].astype(np.float32)
        scores = rng.uniform(0, 0.1, (1, 50, 4)).astype(np.float32)
        scores[0, rng.integers(0, 50, 3), rng.integers(1, 4, 3)] = 0.9
        ref.append([boxes, scores])
    j = Judging(task="detection", task_options=(("background_class", 0),))
    m = compare(ref, ref, None, j)
    assert m.task.artifact["f1"] == 100.0 and m.task.artifact["detections_per_sample"] >= 1
    shifted = [[b + 0.3, s] for b, s in ref]
    assert compare(ref, shifted, None, j).task.artifact["f1"] < 50


def test_two_head_model_labels_go_to_the_probability_output_and_the_box_head_is_guarded_against_collapse():
    n = 40
    prob = _probs(n, 2)
    labels = prob.argmax(1)
    boxes = np.random.default_rng(1).normal(0, 1, (n, 4)).astype(np.float32)
    ref = [[boxes[i:i + 1], prob[i:i + 1]] for i in range(n)]
    m = compare(ref, ref, labels, Judging(output_names=("bbox", "prob")))
    assert m.outputs["prob"].get("kind") == "class_scores" and m.outputs["bbox"].get("kind") == "vector"
    assert m.accuracy_reference == 100.0
    bad_boxes = [[-b, p] for b, p in ref]
    # the labels' accuracy decides; the box head is still guarded against collapse (negated boxes: cosine -1)
    assert any("output bbox: collapse guard" in f for f in texts(compare(ref, bad_boxes, labels, Judging(output_names=("bbox", "prob")))))


def test_ambiguous_labels_are_not_scored_and_say_so():
    n = 30
    a, b = np.random.default_rng(0).normal(size=(n, 3)), np.random.default_rng(1).normal(size=(n, 3))
    ref = [[a[i:i + 1], b[i:i + 1]] for i in range(n)]
    m = compare(ref, ref, np.zeros(n, dtype=np.int64) + np.arange(n) % 3)
    assert m.accuracy is None and "set labels_output" in m.warnings[0]


def test_labels_at_chance_on_a_regression_output_are_ignored_with_a_warning():
    n = 60
    rng = np.random.default_rng(0)
    ref = [[rng.normal(size=(1, 4)).astype(np.float32)] for _ in range(n)]
    labels = rng.integers(0, 2, n)
    m = compare(ref, ref, labels)
    assert m.accuracy is None and "near chance" in m.warnings[0]
    with pytest.raises(BadInputError, match="labels_output"):
        compare(ref, ref, labels, Judging(labels_output="nope"))


def test_embedding_is_judged_by_cosine_not_argmax():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 1, 64)).astype(np.float32)
    ref = [[e] for e in emb]
    noisy = [[e + rng.normal(0, 0.01, e.shape).astype(np.float32)] for e in emb]
    m = compare(ref, noisy, None, Judging(task="embedding"))
    assert m.outputs["output_0"].get("kind") == "vector" and m.top1_agreement is None
    assert texts(m, task="embedding") == [] and m.task.artifact["nn_agreement"] >= 90
    flipped = [[-e] for e in emb]
    assert any("cosine" in f for f in texts(compare(ref, flipped, None, Judging(task="embedding")), task="embedding"))


def test_uniform_or_zero_softmax_cannot_pass_on_agreement():
    n = 30
    prob = _probs(n, 10)
    prob[:, 0] += 1.0  # FP32 always picks class 0 ...
    prob /= prob.sum(1, keepdims=True)
    ref = [[p[None]] for p in prob]
    zeros = [[np.zeros((1, 10), np.float32)] for _ in prob]  # ... and argmax of zeros is 0 too
    m = compare(ref, zeros, None)
    assert m.top1_agreement == 100.0
    assert any("cosine similarity" in f for f in texts(m))


def test_sequence_and_segmentation_tasks():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 1, 20, 8)).astype(np.float32)
    ref = [[x] for x in logits]
    assert compare(ref, ref, None, Judging(task="sequence")).task.artifact["sequence_agreement"] == 100.0
    scrambled = [[x[:, ::-1]] for x in logits]
    m = compare(ref, scrambled, None, Judging(task="sequence"))
    assert any("sequence_agreement" in f for f in texts(m, task="sequence"))
    masks = rng.normal(size=(6, 1, 3, 16, 16)).astype(np.float32)
    ref = [[x] for x in masks]
    seg = compare(ref, ref, None, Judging(task="segmentation"))
    assert seg.task.artifact["miou"] == 100.0
    assert compare(ref, [[-x] for x in masks], None, Judging(task="segmentation")).task.artifact["miou"] < 50


def test_sequence_agreement_lets_a_near_tie_frame_go_either_way_but_not_a_decisive_one():
    """A string that differs from FP32's only where FP32 itself was torn between two classes (a captcha CTC model's
    dynamic INT8: 3 of 200 strings, each one frame with FP32's top two 0.02-0.09 apart) keeps the task; a flip of a
    frame FP32 was sure of does not, and ``near_tie_ratio: 1`` asks for exact strings."""
    from edgebuild.pipeline.tasks import sequence

    ref = np.full((4, 6, 5), -4.0, np.float32)
    ref[:, np.arange(6), [1, 0, 2, 0, 3, 0]] = 8.0  # FP32 reads "1 2 3" in every sample
    ref[0, 2, 4] = 7.95  # sample 0: at frame 2, class 4 is a near-tie (probability ratio 0.95)
    ref[1, 2, 4] = 6.0  # sample 1: class 4 is 7x less likely than FP32's pick
    out = ref.copy()
    out[0, 2, 4] = out[1, 2, 4] = 8.5  # the artifact picks class 4 at frame 2 in both
    scores = sequence({"y": out}, {"y": ref}, None, {})
    assert scores["sequence_agreement"] == 75.0 and scores["sequence_agreement_exact"] == 50.0
    probs = {k: np.exp(v) / np.exp(v).sum(-1, keepdims=True) for k, v in (("y", out), ("r", ref))}
    assert sequence({"y": probs["y"]}, {"y": probs["r"]}, None, {})["sequence_agreement"] == 75.0  # softmax outputs
    assert sequence({"y": out}, {"y": ref}, None, {"near_tie_ratio": 1})["sequence_agreement"] == 50.0
    with pytest.raises(BadInputError, match="near_tie_ratio"):
        sequence({"y": out}, {"y": ref}, None, {"near_tie_ratio": 0})
    from edgebuild.pipeline.report import _output_table

    m = compare([[r[None]] for r in ref], [[o[None]] for o in out], None, Judging(task="sequence"))
    assert m.task.artifact["sequence_agreement"] == 75.0
    assert any("differ from FP32's only at near-tie frames" in line for line in _output_table(m))


def test_a_probability_map_is_thresholded_alike_on_both_sides_even_when_rounding_passes_one():
    """ONNX Runtime's Sigmoid can give 1.0000001: the reference must still be read as probabilities (threshold 0.5),
    as the artifact's map is, or a text detector's masks that agree to 99.9 % score mIoU ~90 (seen: PP-OCRv4 FP16)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=6.0, size=(8, 1, 1, 32, 32)).astype(np.float32)
    probs = 1.0 / (1.0 + np.exp(-logits))
    probs[0, 0, 0, 0, 0] = np.float32(1.0000001)  # float rounding above one
    ref = [[x] for x in probs]
    same = compare(ref, [[np.clip(x, 0, 1)] for x in probs], None, Judging(task="segmentation"))
    assert same.task.artifact["miou"] == 100.0, same.task.artifact
    # logits (outside [0, 1]) are thresholded at 0: the same map as logits agrees with itself, negated it does not
    ref = [[x] for x in logits]
    assert compare(ref, ref, None, Judging(task="segmentation")).task.artifact["miou"] == 100.0
    assert compare(ref, [[-x] for x in logits], None, Judging(task="segmentation")).task.artifact["miou"] < 50


def test_user_evaluator_changes_the_verdict(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "import numpy as np\n"
        "def mean_value(outputs, labels, reference):\n"
        "    return {'mean_value': float(np.mean(next(iter(outputs.values()))))}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = [[np.array([[1.0, 2.0]])], [np.array([[2.0, 3.0]])]]
    out = [[np.array([[0.99, 1.98]])], [np.array([[1.97, 2.96]])]]  # cosine ~1: passes every built-in check
    j = Judging(evaluator="my_metrics:mean_value")
    m = compare(ref, out, None, j)
    assert texts(m, Budget(None, None, None, None)) == []
    assert texts(m, Budget(0.01, None, None, None)) == ["mean_value drop vs FP32 0.025 > max 0.01"]
    assert texts(m, Budget(None, None, None, None, (("mean_value_min", 2.0),))) == ["mean_value 1.975 < min 2.0"]


def test_budgets_on_any_metric_and_unknown_names():
    ref = _yolo_like(n=8)
    m = compare(ref, _requantize(ref, 1 / 255), None, Judging(task="detection"))
    tight = Budget(0.5, None, None, None, (("f1_min", 100.5),))
    assert texts(m, tight, "detection") == ["f1 100 < min 100.5"]
    with pytest.raises(BadInputError, match="no measured score"):
        judge(m, 1, None, Budget(0.5, None, None, None, (("mAP99_drop", 1.0),)), "detection")
    per_output = Budget(0.5, None, None, None, (("output_0.sqnr_db_min", 80.0),))
    assert texts(m, per_output, "detection")[0].startswith("output_0.sqnr_db")


def test_quality_loss_ranks_candidates():
    ref = [[np.array([[0.1, 0.9]])], [np.array([[0.8, 0.2]])], [np.array([[0.3, 0.7]])], [np.array([[0.6, 0.4]])]]
    worse = [[np.array([[0.9, 0.1]])], [np.array([[0.2, 0.8]])], *ref[2:]]
    bad = [[np.array([[0.9, 0.1]])], *ref[1:]]
    assert quality_loss(compare(ref, ref, None), BUDGET) <= 0
    assert 0 < quality_loss(compare(ref, bad, None), BUDGET) < quality_loss(compare(ref, worse, None), BUDGET)


def test_coarse_evaluation_and_selection_margin():
    assert "one sample is 3.33 pt" in coarseness_warning(30, BUDGET)
    assert coarseness_warning(500, BUDGET) is None
    b, note = selection_budget(Budget(1.0, None, None, None), 43)
    assert b.max_accuracy_drop == 0.0 and "43 selection samples" in note, "never negative: a candidate can still pass"
    assert selection_budget(Budget(1.0, None, None, None), 300) == (Budget(1.0, None, None, None), None)


def test_the_selection_margin_note_names_the_accuracy_budget_only_where_it_gates():
    """A sequence task gated by its strings' agreement is not made coarse by one sample of a 0.5 pt budget it never
    reads (the search's selection note said so on a CTC recogniser); class scores are."""
    ref = [[np.array([[0.1, 0.9]])], [np.array([[0.8, 0.2]])], [np.array([[0.3, 0.7]])], [np.array([[0.6, 0.4]])]]
    assert judges_accuracy_drop(compare(ref, ref, None), BUDGET)
    assert judges_accuracy_drop(compare(ref, ref, np.array([1, 0, 1, 0])), BUDGET)
    logits = [[x] for x in np.random.default_rng(0).normal(size=(12, 1, 20, 8)).astype(np.float32)]
    seq = compare(logits, logits, None, Judging(task="sequence"))
    assert not judges_accuracy_drop(seq, BUDGET, "sequence")
    assert not judges_accuracy_drop(compare(ref, ref, None), Budget(None, None, None, None))


def test_detection_with_ground_truth_boxes_reports_and_gates_map50(tmp_path):
    from edgebuild.calibration.sources import load_source
    from edgebuild.pipeline.spec import InputSpec, PreprocessSpec
    from edgebuild.pipeline.tasks import decode_detections

    ref = _yolo_like(n=16)
    dets = decode_detections({"o": np.stack([r[0] for r in ref])}, {})
    boxes = np.full((16, 8, 5), -1.0)
    for i, (b, _, c) in enumerate(dets):  # the FP32 detections as ground truth: FP32 mAP50 is 100
        boxes[i, :len(b)] = np.concatenate([c[:, None], b], 1)[:8]
    np.savez(tmp_path / "d.npz", x=np.zeros((16, 3), np.float32), boxes=boxes)
    data = load_source(str(tmp_path / "d.npz"), (InputSpec("x", (1, 3), "float32", "ANY"),), PreprocessSpec())
    assert data.labels.shape == (16, 8, 5)
    j = Judging(task="detection")
    m = compare(ref, _requantize(ref, 320 / 255), data.labels, j)
    assert m.task.reference["mAP50"] == 100.0 > m.task.artifact["mAP50"]
    assert any(f.startswith("mAP50 drop vs FP32") for f in texts(m, task="detection"))
    assert compare(ref, ref, data.labels, j).task.artifact["mAP50"] == 100.0


def _face_net_outputs(n=400, seed=3, box_noise=0.02, flip=0):
    """A face/non-face net's outputs as MTCNN's R-Net gives them: box offsets first (four small numbers near zero),
    then the softmax over face/non-face. The artifact's offsets carry quantization noise; ``flip`` samples of the
    softmax change their decision."""
    rng = np.random.default_rng(seed)
    boxes = rng.normal(0, 0.05, (n, 4)).astype(np.float32)
    logits = rng.normal(0, 3, (n, 2))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    noisy = boxes + rng.normal(0, box_noise, boxes.shape).astype(np.float32)
    flipped = probs.copy()
    flipped[:flip] = flipped[:flip, ::-1]
    ref = [[boxes[i:i + 1], probs[i:i + 1]] for i in range(n)]
    out = [[noisy[i:i + 1], flipped[i:i + 1]] for i in range(n)]
    return ref, out


def test_classification_is_judged_on_the_softmax_output_not_on_box_offsets_listed_first():
    ref, out = _face_net_outputs()
    judging = Judging(output_names=("boxes", "prob"), task="classification")
    m = compare(ref, out, None, judging)
    assert m.outputs["prob"].kind == "class_scores" and m.outputs["boxes"].kind == "vector"
    assert 100.0 - m.outputs["prob"].top1_agreement == 0.0
    # argmax over four offsets "disagrees" on many samples: it must not be what gates a classification
    assert (np.argmax(np.concatenate([r[0] for r in ref]), 1) != np.argmax(np.concatenate([o[0] for o in out]), 1)).mean() > 0.05
    assert texts(m, task="classification") == []
    # the box output is still guarded against collapse, and a real change of decisions still fails
    _, wrecked = _face_net_outputs(box_noise=1.0)
    assert any("boxes" in f and "collapse guard" in f for f in texts(compare(ref, wrecked, None, judging), task="classification"))
    _, flipped = _face_net_outputs(flip=8)
    assert any("prob" in f and "top-1 disagreement" in f for f in texts(compare(ref, flipped, None, judging), task="classification"))


def test_classification_without_a_softmax_output_still_declares_the_first_output_class_scores():
    rng = np.random.default_rng(0)
    logits, emb = rng.normal(0, 2, (50, 5)), rng.normal(0, 1, (50, 8))
    ref = [[logits[i:i + 1], emb[i:i + 1]] for i in range(50)]
    m = compare(ref, ref, None, Judging(output_names=("logits", "emb"), task="classification"))
    assert m.outputs["logits"].kind == "class_scores" and m.outputs["emb"].kind == "vector"
