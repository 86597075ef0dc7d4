"""Resolve the calibration and evaluation sets of a build: disjoint, deterministic, recorded."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from edgebuild.calibration.budget import DEFAULT_SAMPLES, activation_elements, choose_samples
from edgebuild.calibration.dataset import SampleSet, cap, drop_overlap, split
from edgebuild.calibration.sources import load_source
from edgebuild.calibration import sequences as S
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import BuildSpec, InputSpec

DEMO_CALIB, DEMO_EVAL = "digits:train", "digits:test"
log = logging.getLogger("edgebuild.data")


def resolve_data(spec: BuildSpec, inputs: tuple[InputSpec, ...]) -> tuple[SampleSet, SampleSet, dict]:
    calib_src, eval_src = spec.calib, spec.eval
    if spec.is_demo and not calib_src and not eval_src:
        calib_src, eval_src = DEMO_CALIB, DEMO_EVAL
    if not calib_src and not eval_src:
        raise BadInputError("no calibration/evaluation data: give --calib and/or --eval (image folder, .npy, .npz or digits)")
    record: dict = {}
    if calib_src and eval_src and calib_src != eval_src:
        calib = load_source(calib_src, inputs, spec.preprocess)
        evalset = load_source(eval_src, inputs, spec.preprocess)
        if _sequenced(spec):
            evalset = S.assign(evalset, spec.sequences, eval_src)
        classes = [d.origin.get("classes") for d in (calib, evalset)]
        if all(classes) and classes[0] != classes[1]:
            raise BadInputError(f"calibration and evaluation folders have different class sub-folders "
                                f"({len(classes[0])} vs {len(classes[1])}); labels would not match")
        calib, removed = drop_overlap(calib, evalset)
        if removed:
            record["overlap_removed_from_calibration"] = removed
    else:
        whole = load_source(calib_src or eval_src, inputs, spec.preprocess)
        if _sequenced(spec):  # whole sequences on each side of the split
            whole = S.assign(whole, spec.sequences, calib_src or eval_src)
        calib, evalset = split(whole, spec.eval_fraction, spec.seed)
        calib = dataclasses.replace(calib, sequences=None)
        record["split"] = f"one source split {len(calib)}/{len(evalset)} (seed {spec.seed})"
    if len(evalset) == 0:
        raise BadInputError("the evaluation set is empty")
    calib = cap(calib, spec.calib_samples or DEFAULT_SAMPLES, spec.seed)  # fewer once the model's cost is known
    record.update(calibration=calib.describe(), evaluation=evalset.describe())
    names = class_names(spec, calib, evalset)
    if names:
        record["class_names"] = names
    log.debug("calibration: %d samples (%s); evaluation: %d samples (%s); labels: %s; classes: %s", len(calib),
              calib.name, len(evalset), evalset.name, evalset.has_labels, len(names) if names else "none")
    return calib, evalset, record


def _sequenced(spec: BuildSpec) -> bool:
    """The evaluation samples form sequences when the config says how, or declares a state mapping (then: one
    stream unless ``sequences:`` says otherwise); see ``calibration/sequences.py``."""
    return spec.sequences is not None or isinstance(spec.state, dict)


def budget_calibration(calib: SampleSet, onnx_path: Path, spec: BuildSpec, record: dict) -> SampleSet:
    """The calibration samples every backend and the sensitivity analysis use (``calibration/budget.py``): what
    the build asked for, fewer when the exported model's activation volume would make each calibration the slow
    part of the build. The choice goes into ``record`` (the manifest's ``data``) and the build log."""
    available = int((calib.origin.get("sampled") or {}).get("of", len(calib)))
    choice = choose_samples(available, spec.calib_samples, activation_elements(onnx_path))
    if choice.used < len(calib):
        calib = cap(calib, choice.used, spec.seed)
    record["calibration"] = calib.describe()
    record["calibration_samples"] = choice.to_dict()
    log.info("calibration: %d samples — %s", choice.used, choice.reason)
    return calib


def class_names(spec: BuildSpec, calib: SampleSet, evalset: SampleSet) -> list[str] | None:
    """What class index i means: ``class_names:`` of the config, else the image folder's class sub-folders
    (sorted, as their labels are numbered). Both given: they must agree in count."""
    folder = evalset.origin.get("classes") or calib.origin.get("classes")
    if spec.class_names:
        if folder and len(folder) != len(spec.class_names):
            raise BadInputError(f"class_names lists {len(spec.class_names)} classes; the image folder has "
                                f"{len(folder)} class sub-folders ({', '.join(folder[:5])}{', …' if len(folder) > 5 else ''})")
        return list(spec.class_names)
    return list(folder) if folder else None
