"""Resolve the calibration and evaluation sets of a build: disjoint, deterministic, recorded."""
from __future__ import annotations

from edgebuild.calibration.dataset import CalibrationSet, cap, drop_overlap, split
from edgebuild.calibration.sources import load_source
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import BuildSpec, InputSpec

DEMO_CALIB, DEMO_EVAL = "digits:train", "digits:test"


def resolve_data(spec: BuildSpec, inputs: tuple[InputSpec, ...]) -> tuple[CalibrationSet, CalibrationSet, dict]:
    calib_src, eval_src = spec.calib, spec.eval
    if spec.is_demo and not calib_src and not eval_src:
        calib_src, eval_src = DEMO_CALIB, DEMO_EVAL
    if not calib_src and not eval_src:
        raise BadInputError("no calibration/evaluation data: give --calib and/or --eval (image folder, .npy, .npz or digits)")
    record: dict = {}
    if calib_src and eval_src and calib_src != eval_src:
        calib = load_source(calib_src, inputs, spec.preprocess)
        evalset = load_source(eval_src, inputs, spec.preprocess)
        classes = [d.origin.get("classes") for d in (calib, evalset)]
        if all(classes) and classes[0] != classes[1]:
            raise BadInputError(f"calibration and evaluation folders have different class sub-folders "
                                f"({len(classes[0])} vs {len(classes[1])}); labels would not match")
        calib, removed = drop_overlap(calib, evalset)
        if removed:
            record["overlap_removed_from_calibration"] = removed
    else:
        whole = load_source(calib_src or eval_src, inputs, spec.preprocess)
        calib, evalset = split(whole, spec.eval_fraction, spec.seed)
        record["split"] = f"one source split {len(calib)}/{len(evalset)} (seed {spec.seed})"
    if len(evalset) == 0:
        raise BadInputError("the evaluation set is empty")
    calib = cap(calib, spec.calib_samples, spec.seed)
    record.update(calibration=calib.describe(), evaluation=evalset.describe())
    return calib, evalset, record
