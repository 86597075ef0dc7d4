"""The FP32 reference a build saves beside its targets (``out/reference/``), so that running an artifact and
judging its outputs can happen apart: outputs produced anywhere (a board, a simulator, another tool) are compared
later with ``edgebuild validate out/<target> --outputs device_outputs.npz``, by the same per-output judging as
the build's, without running any runtime (as Polygraphy's ``--save-outputs`` / ``--load-outputs``).

Format (``edgebuild-reference/1``; every ``.npz`` is plain numpy, read with ``allow_pickle=False``; feeds.npz is
stored uncompressed, outputs.npz compressed)::

    reference/model_fp32.onnx   the FP32 source model
    reference/feeds.npz         the evaluation inputs: one array per model input, keyed by the input's name,
                                sample-major [samples, *input shape without its batch axis], in the source model's
                                layout and dtype; plus ``labels`` (class indices) or ``boxes`` ([samples, K, 5]) when
                                the evaluation data has them; a stateful model's ``sequences`` ([samples, 2]:
                                sequence id, step; each step's state input is the state FP32 carried into it). It is
                                the ``.npz`` data-source format: ``--eval reference/feeds.npz`` reads exactly these
                                samples.
    reference/outputs.npz       the FP32 outputs on those feeds: one array per model output, keyed by the output's
                                name, sample-major [samples, *output shape] (sample i = feed i)
    reference/reference.json    {"format", "samples", "inputs": [names], "input_shapes", "outputs": [names, in
                                 the model's order], "labels": the key of the labels in feeds.npz or null,
                                 "evaluation_content_hash": the build's evaluation data, as in validation.json,
                                 "sequences": the key of the sequences in feeds.npz or null, "state": [[output,
                                 input, output index]] fed back on a sequence's next step: outputs.npz then holds
                                 the closed-loop outputs, and a device's outputs must be too}

A device's outputs file has the same form as ``outputs.npz``: keyed by output name, sample i computed on sample i of
``feeds.npz``, float values as the model outputs them (a leading batch axis of 1 per sample may be dropped). The
device runner's own ``outputs.npz`` (``y0``, ``y1``, ... in the model's output order) is read too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet, StateLink
from edgebuild.errors import BadInputError

FORMAT = "edgebuild-reference/1"


@dataclass(frozen=True)
class SavedReference:
    """What ``load`` gives back: the evaluation set (feeds + labels) and the FP32 outputs per sample."""

    evalset: SampleSet
    outputs: list[list[np.ndarray]]  # [sample][output], as the build's reference runner returned them
    output_names: tuple[str, ...]


def _labels_key(labels: np.ndarray, inputs) -> str | None:
    """Where feeds.npz keeps the labels: ``boxes`` for detections, else ``labels`` (or another name the ``.npz``
    data source reads as labels, when an input is called ``labels``)."""
    keys = ("boxes",) if labels.ndim == 3 and labels.shape[2] == 5 else ("labels", "label", "y", "targets")
    return next((k for k in keys if k not in inputs), None)


def save(refdir: Path, reference: list[list[np.ndarray]], evalset: SampleSet, output_names) -> bool:
    """Write feeds.npz, outputs.npz and reference.json into ``refdir``. Outputs whose shape varies from sample to
    sample cannot be stacked: then nothing but the feeds is saved, and False is returned."""
    names = list(output_names)
    if len(names) != len(reference[0]) or len(set(names)) != len(names):
        names = [f"output_{j}" for j in range(len(reference[0]))]
    feeds = {k: np.ascontiguousarray(v) for k, v in evalset.inputs.items()}
    labels_key = None if evalset.labels is None else _labels_key(evalset.labels, feeds)
    if labels_key:
        feeds[labels_key] = evalset.labels
    seq_key = None
    if evalset.sequences is not None:  # (sequence id, step) per sample: `sequences: {ids: sequences}` reads it back
        seq_key = next(k for k in ("sequences", "sequence_ids", "_sequences") if k not in feeds)
        feeds[seq_key] = np.asarray(evalset.sequences)
    np.savez(refdir / "feeds.npz", **feeds)  # uncompressed: deflating 200 images took 4.6 s of a 8 s warm build
    if any(len({np.shape(s[j]) for s in reference}) != 1 for j in range(len(names))):
        return False
    np.savez_compressed(refdir / "outputs.npz", **{n: np.stack([s[j] for s in reference]) for j, n in enumerate(names)})
    record = {"format": FORMAT, "samples": len(reference), "inputs": list(evalset.inputs), "outputs": names,
              "labels": labels_key, "evaluation_content_hash": evalset.content_hash(),
              "sequences": seq_key, "state": [[t.output, t.input, t.index] for t in evalset.state],
              "input_shapes": {k: list(evalset.input_shape(k)) for k in evalset.inputs}}
    (refdir / "reference.json").write_text(json.dumps(record, indent=2))
    return True


def _read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """Missing, a directory, not a zip, pickled objects, a lying header, truncated: one line (calibration/sources)."""
    from edgebuild.calibration.npy import read_npz

    return read_npz(path, ".npz archive")


def load(refdir: Path) -> SavedReference:
    """The saved feeds and outputs of ``refdir``; a missing or inconsistent reference is a BadInputError."""
    index = refdir / "reference.json"
    if not index.is_file():
        raise BadInputError(f"{refdir}: no saved reference outputs (reference.json); the build predates them or its "
                            "outputs vary in shape per sample: rebuild, or validate by running the artifact")
    try:
        record = json.loads(index.read_text())
        names, inputs, samples = tuple(record["outputs"]), list(record["inputs"]), int(record["samples"])
        shapes = {k: tuple(v) for k, v in (record.get("input_shapes") or {}).items()}
    except (ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{index}: not an edgebuild reference record ({type(e).__name__}: {e})") from None
    if record.get("format") != FORMAT:
        raise BadInputError(f"{index}: format {record.get('format')!r}, this edgebuild reads {FORMAT}")
    outputs, feeds = _read_npz(refdir / "outputs.npz", "reference outputs"), _read_npz(refdir / "feeds.npz", "feeds")
    missing = [n for n in names if n not in outputs] + [n for n in inputs if n not in feeds]
    if missing or any(len(outputs[n]) != samples for n in names):
        raise BadInputError(f"{refdir}: the saved reference is incomplete (missing {missing or 'samples'}); rebuild")
    labels = feeds.get(record.get("labels") or "", None)
    try:
        state = tuple(StateLink(str(o), str(i), int(j)) for o, i, j in record.get("state") or ())
    except (TypeError, ValueError):
        raise BadInputError(f"{index}: its state links are not [output, input, index] triples") from None
    sequences = feeds.get(record.get("sequences") or "", None)
    evalset = SampleSet("reference feeds", {n: feeds[n] for n in inputs}, labels,
                        {"source": str(refdir / "feeds.npz")}, shapes, sequences, state)
    if evalset.content_hash() != record.get("evaluation_content_hash"):
        raise BadInputError(f"{refdir}: feeds.npz does not hold the evaluation data the reference was computed on "
                            "(content hash differs from reference.json); rebuild")
    return SavedReference(evalset, [[outputs[n][i] for n in names] for i in range(samples)], names)


def read_outputs(path: Path, saved: SavedReference) -> list[list[np.ndarray]]:
    """A device's outputs file, checked against the saved reference and put in its form ([sample][output], each
    sample in the reference's shape). Anything that does not fit is a BadInputError naming the output."""
    path = Path(path)
    arrays = _read_npz(path, "outputs")
    names = saved.output_names
    if not all(n in arrays for n in names):
        positional = [f"y{j}" for j in range(len(names))]
        if not all(k in arrays for k in positional):
            missing = [n for n in names if n not in arrays]
            raise BadInputError(f"{path}: no array for output(s) {', '.join(missing)} (the file has "
                                f"{', '.join(sorted(arrays)) or 'nothing'}; key each output by its name)")
        arrays = dict(zip(names, (arrays[k] for k in positional)))
    samples, out = len(saved.outputs), {}
    for j, n in enumerate(names):
        a, want = arrays[n], saved.outputs[0][j].shape
        if a.dtype.kind not in "biuf":
            raise BadInputError(f"{path}: output {n} holds {a.dtype} values, not numbers")
        if a.ndim == 0 or len(a) != samples:
            raise BadInputError(f"{path}: output {n} has {len(a) if a.ndim else 0} samples, the reference {samples} "
                                "(sample-major: sample i computed on feed i of reference/feeds.npz)")
        if a[0].size != int(np.prod(want)):
            raise BadInputError(f"{path}: output {n} has samples of shape {list(a.shape[1:])}, the reference "
                                f"{list(want)}")
        out[n] = a.astype(np.float32, copy=False).reshape((samples, *want))
    return [[out[n][i] for n in names] for i in range(samples)]
