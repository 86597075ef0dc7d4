"""SampleSet: a sized, re-iterable source of input feeds with optional labels.

The feed contract (every backend, the validator and the exporter rely on it): ``feed(i)`` is a dict
``input name -> np.ndarray`` in the model's input order, each array with *exactly* the model input's full
shape and dtype, batch 1 — a 0-d input stays 0-d, a recurrent state ``[layers, 1, hidden]`` stays so.

Storage: ``inputs[name]`` stacks the samples along a new leading axis, each sample being the model input
*without its batch axis* (``[N, C, H, W]`` for an input ``[1, C, H, W]``, ``[N, 2, 128]`` for a state
``[2, 1, 128]``, ``[N]`` for a 0-d scalar). The batch axis of an input is its first axis of size 1 (the ONNX
loader fixes a symbolic dimension to 1 wherever it is); a 0-d input, or one without an axis of size 1,
has none. ``shapes`` holds the full model input shapes; a set without them (raw data, ``digits``) treats
axis 0 as the batch.

Sequences (stateful models): ``sequences`` gives each sample its (sequence id, step); ``state`` says which model
output is fed back into which input on the next step. Contiguous samples of one sequence with consecutive steps form
a *run* (``runs()``): a closed-loop evaluation feeds each run's first step as stored and every later step the state
the model itself produced (``pipeline/stages/closed_loop.py``). A subset keeps each sample's (id, step), so a subset
that drops a step starts a new run there, from the state stored for that step.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import numpy as np

from edgebuild.errors import BadInputError


def batch_axis(shape: tuple[int, ...]) -> int | None:
    """The batch axis of a model input of ``shape``: its first axis of size 1; None for 0-d inputs and
    inputs with no axis of size 1 (those are fed whole, one value for the batch)."""
    return next((a for a, d in enumerate(shape) if d == 1), None)


def sample_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One sample of an input of ``shape`` as stored in a SampleSet: the shape without its batch axis."""
    axis = batch_axis(shape)
    return tuple(shape) if axis is None else tuple(shape[:axis]) + tuple(shape[axis + 1:])


@dataclass(frozen=True)
class StateLink:
    """A recurrent state of a stateful model: output ``output`` (position ``index`` among the model's outputs) is
    the value of input ``input`` on the next step of a sequence."""

    output: str
    input: str
    index: int


def _read_only(a):
    if not isinstance(a, np.ndarray):
        return a
    view = a.view()
    view.flags.writeable = False
    return view


@dataclass
class SampleSet:
    """Samples for one model, stacked per input along a leading sample axis (see the module docstring).

    ``feed(i)`` / ``feeds()`` give batch-1 feeds in the model's exact input shapes and dtypes;
    ``batch(idx)`` gives several samples at once along each input's batch axis (for torch evaluation).
    """

    name: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    origin: dict = field(default_factory=dict)  # where the samples came from (recorded in the manifest)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # full model input shapes, by input
    sequences: np.ndarray | None = None  # [N, 2] int64: (sequence id, step) of each sample; None: independent samples
    state: tuple[StateLink, ...] = ()  # outputs fed back into inputs on a sequence's next step (closed loop)

    def __post_init__(self):
        if not self.inputs:
            raise BadInputError(f"{self.name}: no input arrays")
        for k, v in self.inputs.items():
            if np.ndim(v) == 0:
                raise BadInputError(f"{self.name}: input {k} has no sample axis (a single value); "
                                    "stack the samples along a leading axis")
        sizes = {len(a) for a in self.inputs.values()}
        if len(sizes) != 1:
            raise BadInputError(f"{self.name}: inputs have different sample counts {sorted(sizes)}")
        if self.labels is not None and len(self.labels) != len(self):
            raise BadInputError(f"{self.name}: {len(self.labels)} labels for {len(self)} samples")
        self.shapes = {k: tuple(int(d) for d in s) for k, s in self.shapes.items()}
        for k, s in self.shapes.items():
            if k in self.inputs and self.inputs[k].shape[1:] != sample_shape(s):
                raise BadInputError(f"{self.name}: samples of {k} have shape {list(self.inputs[k].shape[1:])}, "
                                    f"input shape {list(s)} needs {list(sample_shape(s))}")
        # a SampleSet never changes once made (its hashes are computed once): it holds read-only views, the
        # caller's own arrays stay writable
        self.inputs = {k: _read_only(v) for k, v in self.inputs.items()}
        self.labels = None if self.labels is None else _read_only(self.labels)
        if self.sequences is not None:
            seq = np.asarray(self.sequences, dtype=np.int64)
            if seq.shape != (len(self), 2):
                raise BadInputError(f"{self.name}: sequences must give (id, step) for each of the {len(self)} samples, "
                                    f"got shape {list(seq.shape)}")
            self.sequences = _read_only(seq)
        self.state = tuple(self.state)
        for link in self.state:
            if link.input not in self.inputs:
                raise BadInputError(f"{self.name}: state input {link.input!r} is not among the inputs "
                                    f"({', '.join(self.inputs)})")

    @property
    def closed_loop(self) -> bool:
        """True when a model output feeds an input on the next step (``state``)."""
        return bool(self.state)

    def runs(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of each run of consecutive steps of one sequence, in sample order (independent
        samples: one run each)."""
        n = len(self)
        if self.sequences is None:
            return [(i, i + 1) for i in range(n)]
        s = np.asarray(self.sequences)
        new = np.ones(n, dtype=bool)
        new[1:] = (s[1:, 0] != s[:-1, 0]) | (s[1:, 1] != s[:-1, 1] + 1)
        starts = np.flatnonzero(new)
        return [(int(a), int(b)) for a, b in zip(starts, [*starts[1:], n])]

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def input_shape(self, name: str) -> tuple[int, ...]:
        """The full model input shape of ``name`` (batch 1)."""
        return self.shapes[name] if name in self.shapes else (1, *self.inputs[name].shape[1:])

    def feed(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as one batch-1 feed: every array in the model input's exact shape and dtype."""
        return {k: np.ascontiguousarray(v[i]).reshape(self.input_shape(k)) for k, v in self.inputs.items()}

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self.feed(i)

    def __iter__(self):
        return self.feeds()

    def batch(self, idx) -> dict[str, np.ndarray]:
        """Samples ``idx`` as one feed of batch ``len(idx)``: stacked along each input's batch axis.

        An input without a batch axis (0-d, or no axis of size 1) is one value for the whole batch, so its
        samples must agree; otherwise batch them one by one (``feed``)."""
        idx = np.asarray(idx, dtype=np.int64)
        out = {}
        for k, v in self.inputs.items():
            axis = batch_axis(self.input_shape(k))
            part = v[idx]
            if axis is None:
                if len(part) and not np.all(part == part[:1]):
                    raise BadInputError(f"{self.name}: input {k} has no batch axis and its samples differ; "
                                        "run them one by one")
                out[k] = np.array(part[0]).reshape(self.input_shape(k)) if len(part) else part
            else:
                out[k] = np.ascontiguousarray(np.moveaxis(part, 0, axis))
        return out

    def stacked_feeds(self, n: int | None = None) -> dict[str, np.ndarray]:
        """The first ``n`` feeds stacked along a new leading axis: ``[n, *input shape]`` per input, so that
        ``stacked[name][i]`` is exactly ``feed(i)[name]`` (for handing samples to a child process)."""
        n = len(self) if n is None else min(n, len(self))
        return {k: np.ascontiguousarray(v[:n]).reshape((n, *self.input_shape(k))) for k, v in self.inputs.items()}

    def subset(self, idx, name: str | None = None, **origin) -> "SampleSet":
        idx = np.asarray(idx, dtype=np.int64)
        return SampleSet(
            name or self.name,
            {k: _take(v, idx) for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[idx],
            {**self.origin, **origin},
            dict(self.shapes),
            None if self.sequences is None else np.asarray(self.sequences)[idx],
            self.state,
        )

    def sample_hashes(self) -> list[str]:
        """One content hash per sample, to prove calibration and evaluation do not overlap."""
        out = []
        for i in range(len(self)):
            h = hashlib.sha1()
            for k in sorted(self.inputs):
                h.update(np.ascontiguousarray(self.inputs[k][i]).tobytes())
            out.append(h.hexdigest())
        return out

    def content_hash(self) -> str:
        """A hash of every input array and the labels, computed once (hashing 200 images takes ~0.2 s)."""
        return self._content_hash

    @cached_property
    def _content_hash(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.inputs):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.inputs[k]).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        if self.sequences is not None:  # only then: the hashes of independent samples stay what they were
            h.update(b"sequences" + np.ascontiguousarray(self.sequences).tobytes())
        if self.state:
            h.update(repr([(s.output, s.input, s.index) for s in self.state]).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "samples": len(self),
            "labels": self.has_labels,
            "inputs": {k: {"shape": list(self.input_shape(k)), "dtype": str(v.dtype)} for k, v in self.inputs.items()},
            "content_hash": self.content_hash(),
            **({"sequences": {"runs": len(self.runs()), "steps": len(self)}} if self.sequences is not None else {}),
            **({"state": {s.output: s.input for s in self.state}} if self.state else {}),
            **self.origin,
        }


def split(data: SampleSet, eval_fraction: float, seed: int) -> tuple[SampleSet, SampleSet]:
    """Deterministic disjoint split of one source into (calibration, evaluation)."""
    n = len(data)
    if n < 4:
        raise BadInputError(f"{data.name}: {n} samples are too few to split into calibration and evaluation")
    n_eval = max(1, int(round(n * eval_fraction)))
    how = {"split": {"seed": seed, "eval_fraction": eval_fraction, "of": n}}
    if data.sequences is not None:  # whole sequences on each side (one longer than a quarter of all: cut in quarters)
        ev, cal = whole_runs(data, n_eval, seed, max_steps=-(-n // 4))
        if len(ev) == 0 or len(cal) == 0:
            raise BadInputError(f"{data.name}: {len(data.runs())} sequence(s) cannot be split into calibration and "
                                "evaluation; give --calib and --eval separately, or more sequences")
        how["split"]["by"] = "whole sequences"
        return (data.subset(cal, f"{data.name}[calib]", **how), data.subset(ev, f"{data.name}[eval]", **how))
    perm = np.random.default_rng(seed).permutation(n)
    ev, cal = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    return (data.subset(cal, f"{data.name}[calib]", **how), data.subset(ev, f"{data.name}[eval]", **how))


def whole_runs(data: SampleSet, n_wanted: int, seed: int, max_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``data`` into (chosen, rest) sample indices, each sorted, by whole runs (``SampleSet.runs``) in a
    seeded random order, until at least ``n_wanted`` samples are chosen. ``max_steps``: runs longer than that are
    first cut into contiguous pieces of at most ``max_steps`` steps (a piece then starts from the state stored for
    its first step)."""
    pieces = []
    for a, b in data.runs():
        step = max_steps or (b - a)
        pieces += [(s, min(s + step, b)) for s in range(a, b, step)]
    chosen, total = [], 0
    for k in np.random.default_rng(seed).permutation(len(pieces)):
        if total >= n_wanted:
            break
        chosen.append(pieces[k])
        total += pieces[k][1] - pieces[k][0]
    mask = np.zeros(len(data), dtype=bool)
    for a, b in chosen:
        mask[a:b] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def cap(data: SampleSet, max_samples: int, seed: int) -> SampleSet:
    """At most ``max_samples`` samples, chosen deterministically (class-balanced order is not assumed): a random
    subset, never the first ones (an image folder is in class order). How many is decided in
    ``calibration/budget.py``; ``sampled.of`` stays the data's own count when a capped set is capped again."""
    if len(data) <= max_samples:
        return data
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:max_samples])
    of = (data.origin.get("sampled") or {}).get("of", len(data))
    return data.subset(idx, sampled={"of": of, "kept": max_samples, "seed": seed})


def drop_overlap(calib: SampleSet, evalset: SampleSet) -> tuple[SampleSet, int]:
    """Remove from calibration every sample that also appears in evaluation; returns the count removed."""
    seen = set(evalset.sample_hashes())
    keep = [i for i, h in enumerate(calib.sample_hashes()) if h not in seen]
    removed = len(calib) - len(keep)
    if removed == 0:
        return calib, 0
    if not keep:
        raise BadInputError("calibration and evaluation data are the same samples; give disjoint sets or one source to split")
    return calib.subset(keep, overlap_removed=removed), removed


SUBSET_CHUNK = 64  # samples copied at once from a disk-backed array


def _take(v: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of ``v``. A disk-backed array's subset (a large image folder split into calibration and
    evaluation) stays on disk, copied a chunk at a time into an unlinked temporary file, never whole in memory."""
    if not isinstance(v, np.memmap) or len(idx) == 0:
        return v[idx]
    import tempfile

    from edgebuild.procs import tempdir

    with tempfile.TemporaryFile(prefix="edgebuild-subset-", dir=tempdir()) as f:  # unlinked; lives as long as the mapping
        out = np.memmap(f, dtype=v.dtype, mode="w+", shape=(len(idx), *v.shape[1:]))
    for start in range(0, len(idx), SUBSET_CHUNK):
        out[start:start + SUBSET_CHUNK] = v[idx[start:start + SUBSET_CHUNK]]
    return out
