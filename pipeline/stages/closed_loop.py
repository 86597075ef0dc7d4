"""Closed-loop judging of stateful models (a VAD's LSTM state, a GRU's h, a decoder's cache).

A stateful model takes its recurrent state as an input and returns the next one as an output. Judged one step at a
time with the FP32 model's state fed in, an artifact's error looks like one step's error; in use, each artifact
feeds back its *own* state, and the error compounds along the stream. So the FP32 reference and every candidate
are run the same way: over each evaluation sequence, step after step, the state output of one step is the state
input of the next (the first step of a sequence takes the state the data stores for it). The judged outputs are
those closed-loop outputs, of every backend alike (``collect`` runs any ``Runner``).

The state mapping is ``state: {output: input}`` in edgebuild.yaml; without one, an input and an output whose names
pair up (state/stateN, h0/hn, c0/cn, past_*/present_*, h_in/h_out, ...) and whose shape and type agree are taken, and
the build log says so (``state: none`` turns it off). How the samples form sequences: ``calibration/sequences.py``.
After the FP32 run, each step's state input is stored as the state FP32 itself carried into it (``carried``): a
part of the evaluation set cut anywhere then starts from FP32's own state there, and its FP32 outputs are exactly
those of the whole run, so the search's selection and held-out parts (whole sequences, ``split``) reuse them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re

import numpy as np

from edgebuild.calibration import sequences as S
from edgebuild.calibration.dataset import SampleSet, StateLink, whole_runs
from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.pipeline.spec import STATE_OFF

log = logging.getLogger("edgebuild.closed_loop")
SPLIT_PIECES = 4  # a sequence longer than 1/4 of the evaluation set is cut into pieces this long for the search's split


# ---- which output feeds which input -----------------------------------------------------------------------
# an input is taken for a state only when its name says so: an image-to-image model's `image` -> `image_out` (or an
# autoencoder's `in` -> `out`) has the same shape on both sides and is no recurrence
STATE_NAME = re.compile(r"state|hidden|cell|past|cache|memory|^mem|^(h|c|hx|cx|s)(_?\d+|_in|_prev|_previous)?$"
                        r"|[._](h|c)(_?\d+)?$")


def partners(name: str) -> set[str]:
    """The output names (lower case) that would carry input ``name`` to the next step (none when the name does not
    look like a state: ``STATE_NAME``)."""
    n = name.lower()
    if not STATE_NAME.search(n):
        return set()
    out = {n + s for s in ("n", "_n", "out", "_out", "_new", "_next", "_t1")} | {"new_" + n, "next_" + n}
    if n.endswith("0"):
        out |= {n[:-1] + s for s in ("n", "_n", "1")}
    for a, b in (("_in", "_out"), ("_prev", ""), ("_previous", "")):
        if n.endswith(a):
            out.add(n[: len(n) - len(a)] + b)
    for a, b in (("in_", "out_"), ("prev_", ""), ("previous_", ""), ("prev_", "next_"), ("past_key_values", "present"),
                 ("past", "present")):
        if n.startswith(a):
            out.add(b + n[len(a):])
    return out - {n}


def propose(input_names, output_names) -> dict[str, str]:
    """{output: input} of the inputs exactly one output's name pairs with (``partners``), each output used once."""
    found: dict[str, str] = {}
    for i in input_names:
        match = [o for o in output_names if o.lower() in partners(i)]
        if len(match) == 1 and match[0] not in found:
            found[match[0]] = i
    return found


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if int(d) != 1)


def resolve(declared, model, evalset: SampleSet, sequences: dict | None, record: dict) -> tuple[SampleSet, dict | None]:
    """The evaluation set with its state links (and sequences) when the model is stateful, and what was decided for
    the manifest. ``declared``: ``BuildSpec.state``; a declaration naming no output/input of the model, or a state
    whose shape or type does not fit its input, is a BadInputError. ``record``: the build's data record (a random
    split of one source leaves no order to run a stream in)."""
    if declared == STATE_OFF:
        return evalset, None
    inputs = {t.name: t for t in model.inputs}
    outputs = [t.name for t in model.outputs]
    if isinstance(declared, dict):
        for out, inp in declared.items():
            if out not in outputs:
                raise BadInputError(f"state: {out!r} is not an output of the model (outputs: {', '.join(outputs)})")
            if inp not in inputs:
                raise BadInputError(f"state: {out} feeds {inp!r}, which is not an input of the model "
                                    f"(inputs: {', '.join(inputs)})")
        mapping, how = dict(declared), "declared (state: in edgebuild.yaml)"
    else:
        mapping, how = propose(list(inputs), outputs), "inferred from the input and output names"
        if not mapping:
            return evalset, None
    shapes = _probe(model, evalset)
    links, dropped = [], []
    for out, inp in mapping.items():
        got, want = shapes[outputs.index(out)], tuple(evalset.input_shape(inp))
        got_kind, want_kind = np.dtype(got[1]).kind, evalset.inputs[inp].dtype.kind
        fits = int(np.prod(got[0])) == int(np.prod(want)) and _squeezed(got[0]) == _squeezed(want) \
            and (got_kind == want_kind or {got_kind, want_kind} <= {"f"} or {got_kind, want_kind} <= {"i", "u"})
        if not fits:
            why = f"output {out} is {np.dtype(got[1]).name} {list(got[0])}, input {inp} is " \
                  f"{evalset.inputs[inp].dtype.name} {list(want)}"
            if isinstance(declared, dict):
                raise BadInputError(f"state: {out} cannot feed {inp}: {why}")
            dropped.append(why)
            continue
        links.append(StateLink(out, inp, outputs.index(out)))
    if dropped:
        log.info("state: not inferred where shapes or types differ (%s)", "; ".join(dropped))
    if not links:
        return evalset, None
    notes = []
    if evalset.sequences is None:
        if "split" in record and isinstance(record.get("split"), str):
            log.warning("state %s %s, but the evaluation samples were drawn at random from one source: they are not "
                        "in stream order, so each step is judged with the data's state; declare sequences: in "
                        "edgebuild.yaml to split by whole sequences and judge closed loop",
                        _mapping_text(links), how)
            return evalset, {"state": {s.output: s.input for s in links}, "how": how, "closed_loop": False,
                             "why_not": "evaluation samples drawn at random from one source (declare sequences:)"}
        evalset = S.assign(evalset, sequences)
        notes.append("sequences: " + S.describe(sequences) + ("" if sequences else " (default; declare sequences:)"))
    elif sequences:
        notes.append("sequences: " + S.describe(sequences))
    evalset = dataclasses.replace(evalset, state=tuple(links))
    runs = evalset.runs()
    result = {"state": {s.output: s.input for s in links}, "how": how, "closed_loop": True,
              "sequences": len(runs), "steps": len(evalset), "longest": max(b - a for a, b in runs),
              "first_step": "the state the data stores for it", "notes": notes}
    log.info("stateful model: state %s %s; judged closed loop over %d sequence(s), %d steps (%s)%s",
             _mapping_text(links), how, len(runs), len(evalset), "; ".join(notes) or S.describe(sequences),
             "" if isinstance(declared, dict) else "; set state: in edgebuild.yaml to change it, state: none to judge "
                                                   "each step with the data's state")
    return evalset, result


def _mapping_text(links) -> str:
    return ", ".join(f"{s.output} -> {s.input}" for s in links)


def _probe(model, evalset: SampleSet) -> list[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each output of the FP32 model on the first sample (symbolic output shapes say nothing)."""
    from edgebuild.targets.base import reference_runner

    runner = reference_runner(model.onnx_path, 1)
    try:
        return [(tuple(np.shape(o)), np.asarray(o).dtype) for o in runner.run(evalset.feed(0))]
    finally:
        runner.close()


# ---- running ----------------------------------------------------------------------------------------------
def collect(runner, evalset: SampleSet) -> list[list[np.ndarray]]:
    """The runner's outputs over each run of ``evalset``, every step after a run's first fed the state outputs of
    the step before (``SampleSet.state``)."""
    outputs: list[list[np.ndarray]] = []
    for start, stop in evalset.runs():
        previous = None
        for i in range(start, stop):
            feed = evalset.feed(i)
            if previous is not None:
                for link in evalset.state:
                    feed[link.input] = _as_input(previous[link.index], feed[link.input], link)
            previous = runner.run(feed)
            outputs.append(previous)
    return outputs


def _as_input(value, like: np.ndarray, link: StateLink) -> np.ndarray:
    value = np.asarray(value)
    if value.size != like.size:
        raise ConversionError(f"state output {link.output} gives {value.size} values ({list(value.shape)}); input "
                              f"{link.input} takes {like.size} ({list(like.shape)})")
    return np.ascontiguousarray(value.reshape(like.shape).astype(like.dtype, copy=False))


def carried(evalset: SampleSet, reference: list[list[np.ndarray]]) -> SampleSet:
    """``evalset`` with each step's stored state input replaced by the state FP32 carried into it (a run's first
    step keeps the data's): FP32 run closed loop on any part of it gives the same outputs as on the whole."""
    if not evalset.closed_loop:
        return evalset
    fed = {link.input for link in evalset.state}
    inputs = {k: np.array(v) if k in fed else v for k, v in evalset.inputs.items()}
    for start, stop in evalset.runs():
        for i in range(start + 1, stop):
            for link in evalset.state:
                inputs[link.input][i] = np.asarray(reference[i - 1][link.index]).reshape(inputs[link.input][i].shape)
    return dataclasses.replace(evalset, inputs=inputs)


# ---- splitting by whole sequences ---------------------------------------------------------------------------
def split(evalset: SampleSet, n_select: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection, held-out) sample indices by whole sequences; a sequence longer than a ``SPLIT_PIECES``-th of the
    set is first cut into contiguous pieces that long (each piece starts from FP32's own state there)."""
    piece = max(1, math.ceil(len(evalset) / SPLIT_PIECES))
    return whole_runs(evalset, n_select, seed, max_steps=piece)


def describe_split(evalset: SampleSet, idx) -> str:
    part = evalset.subset(idx)
    runs = part.runs()
    return f"{len(runs)} whole sequence(s) or contiguous pieces of {min(b - a for a, b in runs)}-" \
           f"{max(b - a for a, b in runs)} steps"
