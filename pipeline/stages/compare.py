"""Running an artifact on the evaluation feeds (``collect``) and comparing its outputs with the reference's
(``compare``): what each output is (resolved once per build against the FP32 reference: which output the labels
score, which holds the class scores), per-output fidelity (``pipeline/metrics.py``) and the task's or a user
evaluator's scores (``pipeline/tasks.py``). Judging the result against budgets is ``pipeline/stages/validate.py``'s.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline import metrics as M
from edgebuild.pipeline import tasks as T
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.results import Metrics
from edgebuild.targets.base import Runner

CHANCE_MARGIN = 1.5  # reference accuracy below this many times the majority-class rate is "at chance"


@dataclass(frozen=True)
class Judging:
    """What the outputs mean: declared in the build spec, resolved once against the FP32 reference."""

    output_names: tuple[str, ...] = ()
    task: str = "auto"
    task_options: tuple[tuple[str, object], ...] = ()
    labels_output: str | None = None  # declared name; after ``resolve``: the output labels score, or ""
    evaluator: str | None = None  # pkg.mod:fn
    evaluator_base: str | None = None  # folders (os.pathsep-joined) the evaluator module is imported from (the config's)
    resolved: bool = False
    warnings: tuple[str, ...] = ()
    class_output: str = ""  # after ``resolve``, with ``task: classification``: the output that holds the class scores

    @property
    def options(self) -> dict:
        return dict(self.task_options)


def collect(runner: Runner, evalset: SampleSet) -> list[list[np.ndarray]]:
    """The runner's outputs on every sample; a stateful model's closed loop, each artifact feeding back its own state
    (``closed_loop.collect``), when the evaluation set says which output feeds which input."""
    if evalset.closed_loop:
        from edgebuild.pipeline.stages.closed_loop import collect as closed

        return closed(runner, evalset)
    return [runner.run(feed) for feed in evalset.feeds()]


def stacked(outputs: list[list[np.ndarray]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    n_out = len(outputs[0])
    names = names if len(names) == n_out else tuple(f"output_{j}" for j in range(n_out))
    return {name: np.stack([np.asarray(s[j]) for s in outputs]) for j, name in enumerate(names)}


# ---- resolving what the outputs mean (once per build, on the reference) -----------------------------------
def resolve(judging: Judging, reference: list[list[np.ndarray]], labels: np.ndarray | None) -> Judging:
    """Decide which output the labels score; warn when that is ambiguous or the labels look unrelated."""
    if judging.resolved:
        return judging
    if judging.task not in T.TASKS:
        raise BadInputError(f"task must be one of {', '.join(T.TASKS)}, got {judging.task!r}")
    ref = stacked(reference, judging.output_names)
    names = tuple(ref)
    warnings: list[str] = []
    target = ""
    if labels is not None and labels.ndim == 1:
        target, warnings = _labels_output(ref, labels, judging)
    return dataclasses.replace(judging, output_names=names, labels_output=target, resolved=True,
                               warnings=tuple(warnings), class_output=_class_output(ref, target, judging))


def _class_output(ref: dict, labelled: str, judging: Judging) -> str:
    """The output ``task: classification`` declares to be class scores: the labelled one, else the only probability
    distribution among several outputs, else the first output. A face detector's first output is often its box
    offsets beside a softmax: argmax over four offsets is no class, and its top-1 "agreement" must not gate."""
    if judging.task != "classification" or not ref:
        return ""
    if labelled:
        return labelled
    dists = [n for n, a in ref.items() if M.sample_vector(a) is not None and M.is_distribution(a)]
    return dists[0] if len(dists) == 1 else next(iter(ref))


def _labels_output(ref: dict, labels: np.ndarray, judging: Judging) -> tuple[str, list[str]]:
    fits = lambda a: M.sample_vector(a) is not None and M.sample_vector(a).shape[1] > int(labels.max())  # noqa: E731
    if judging.labels_output:
        name = judging.labels_output
        if name not in ref:
            raise BadInputError(f"labels_output {name!r} is not an output of the model ({', '.join(ref)})")
        if not fits(ref[name]):
            raise BadInputError(f"labels_output {name!r} has shape {list(ref[name].shape[1:])}: not class scores "
                                f"for labels up to {int(labels.max())}")
        return name, _chance_warning(ref[name], labels, name)
    candidates = [n for n, a in ref.items() if fits(a)]
    if len(candidates) > 1:
        dist = [n for n in candidates if M.is_distribution(ref[n])]
        candidates = dist if len(dist) == 1 else candidates
    if not candidates:
        return "", [f"labels ignored: no output is a vector of class scores for labels up to {int(labels.max())}"]
    if len(candidates) > 1:
        return "", [f"labels ignored: outputs {', '.join(candidates)} could all carry class scores; "
                    "set labels_output in edgebuild.yaml"]
    warnings = _chance_warning(ref[candidates[0]], labels, candidates[0])
    return ("" if warnings else candidates[0]), warnings


def _chance_warning(scores: np.ndarray, labels: np.ndarray, name: str) -> list[str]:
    majority = float(np.bincount(labels.astype(np.int64)).max() / len(labels) * 100)
    acc = M.accuracy(scores, labels)
    if acc < min(majority * CHANCE_MARGIN, majority + 0.5 * (100 - majority)):
        return [f"labels ignored: FP32 accuracy on output {name} is {acc:.1f} %, near chance ({majority:.1f} % "
                "for the majority class); the labels do not belong to this output (set labels_output)"]
    return []


def output_kind(name: str, ref: np.ndarray, judging: Judging) -> str:
    if name == judging.labels_output:
        return "class_scores"
    v = M.sample_vector(ref)
    if v is not None and (M.is_distribution(ref) or (judging.task == "classification" and name == judging.class_output)):
        return "class_scores"
    if v is not None:
        return "vector"
    return "scalar" if ref[0].size == 1 else "tensor"


# ---- comparing --------------------------------------------------------------------------------------------
def compare(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]], labels: np.ndarray | None,
            judging: Judging | None = None) -> Metrics:
    """Per-output fidelity (and accuracy for the output the labels belong to), plus task/evaluator scores.

    Top-level ``accuracy*``, ``top1_agreement``, ``cosine_min`` and ``max_abs_error`` summarise the outputs
    (the labelled one, else the first class-score output; the worst cosine and error of all).
    """
    if len(reference) != len(outputs):
        raise ValueError(f"{len(outputs)} artifact results for {len(reference)} reference samples")
    for out in outputs:
        if len(out) != len(reference[0]):
            raise ValueError(f"artifact has {len(out)} outputs, the reference {len(reference[0])}")
    judging = resolve(judging or Judging(), reference, labels)
    ref, out = stacked(reference, judging.output_names), stacked(outputs, judging.output_names)
    finite = all(bool(np.isfinite(a).all()) for a in out.values())
    m: dict = {"samples": len(outputs), "finite": finite, "outputs": {}}
    for name in ref:
        if ref[name].size != out[name].size:
            raise ValueError(f"artifact output {name} has {out[name].size // len(outputs)} values, "
                             f"reference {ref[name].size // len(outputs)}")
        m["outputs"][name] = _output_metrics(name, ref[name], out[name].reshape(ref[name].shape), labels, judging, finite)
    per = m["outputs"].values()
    m["cosine_min"] = min(o["cosine"] for o in per)
    m["cosine_mean"] = float(np.mean([o["cosine_mean"] for o in per]))
    m["max_abs_error"] = max(o["max_abs_error"] for o in per)
    classes = [n for n, o in m["outputs"].items() if o["kind"] == "class_scores"]
    m["classifier"] = bool(classes)
    if classes:
        main = m["outputs"][judging.labels_output or classes[0]]
        m.update({k: main[k] for k in ("top1_agreement", "accuracy", "accuracy_reference", "accuracy_drop") if k in main})
    task = _task_scores(ref, out, labels, judging) if finite else None
    if task:
        m["task"] = task
    if judging.warnings:
        m["warnings"] = list(judging.warnings)
    return Metrics.from_dict(m)  # the typed record from here on (its keys in the order measured, as JSON keeps them)


def _output_metrics(name, ref, out, labels, judging: Judging, finite: bool) -> dict:
    kind = output_kind(name, ref, judging)
    if not finite:
        o = {"kind": kind, "cosine": 0.0, "cosine_mean": 0.0, "max_abs_error": float("inf"), "sqnr_min_db": -200.0,
             "finite": False}
    else:
        o = {"kind": kind, **M.fidelity(ref, out)}
        if kind == "class_scores":
            o.pop("groups", None)  # scores of classes that never occur are not a quality of their own
            o["cosine"] = o["cosine_mean"]  # class scores keep a floor on the mean; agreement judges the rest
    if kind == "class_scores":
        o.update(M.class_agreement(ref, out) if finite else {"top1_agreement": 0.0})
        if name == judging.labels_output:
            o["accuracy_reference"] = M.accuracy(ref, labels)
            o["accuracy"] = M.accuracy(out, labels) if finite else 0.0
            o["accuracy_drop"] = o["accuracy_reference"] - o["accuracy"]
            if M.sample_vector(ref).shape[1] > 5:
                o["top5_accuracy"] = M.accuracy(out, labels, 5) if finite else 0.0
    return o


def _task_scores(ref: dict, out: dict, labels, judging: Judging) -> dict | None:
    result: dict = {}
    fn = T.BUILTIN.get(judging.task)
    if fn is not None:
        result = {"name": judging.task, "reference": fn(ref, ref, labels, judging.options),
                  "artifact": fn(out, ref, labels, judging.options)}
    if judging.evaluator:
        user = T.load_evaluator(judging.evaluator, tuple(filter(None, (judging.evaluator_base or "").split(os.pathsep))))
        scores_ref = T.call_evaluator(user, judging.evaluator, ref, labels, ref)
        scores_out = T.call_evaluator(user, judging.evaluator, out, labels, ref)
        result.setdefault("name", judging.evaluator)
        result.setdefault("reference", {}).update(scores_ref)
        result.setdefault("artifact", {}).update(scores_out)
        result["evaluator_scores"] = list(scores_ref)
    return result or None
