"""How evaluation samples form sequences (stateful models): ``sequences:`` of edgebuild.yaml, as (id, step) per sample.

    stream        the samples are in order and form one stream
    N | {length: N}   every N contiguous samples are one sequence (the last one may be shorter)
    {ids: KEY}    the .npz holds an array KEY with one sequence id per sample (or [N, 2]: id, step); the samples of a
                  sequence are contiguous and in order

Each sequence's first step is fed the state the data stores for it (zeros, or the state a stream had there); the
steps after it are fed the model's own state output (``pipeline/stages/closed_loop.py``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.errors import BadInputError


def describe(decl: dict | None) -> str:
    if not decl or decl["kind"] == "stream":
        return "one stream (the samples in order)"
    if decl["kind"] == "length":
        return f"sequences of {decl['length']} contiguous steps"
    return f"sequence ids from the .npz array {decl['key']!r}"


def assign(data: SampleSet, decl: dict | None, source: str | None = None) -> SampleSet:
    """``data`` with (sequence id, step) per sample as ``decl`` (``BuildSpec.sequences``, normal form) says;
    ``decl`` None: one stream. ``source``: the .npz the ids are read from."""
    n = len(data)
    kind = (decl or {}).get("kind", "stream")
    if kind == "stream":
        seq = np.stack([np.zeros(n, np.int64), np.arange(n, dtype=np.int64)], 1)
    elif kind == "length":
        length = int(decl["length"])
        seq = np.stack([np.arange(n, dtype=np.int64) // length, np.arange(n, dtype=np.int64) % length], 1)
    else:
        seq = _ids(data, decl["key"], source)
    return dataclasses.replace(data, sequences=seq)


def _ids(data: SampleSet, key: str, source: str | None) -> np.ndarray:
    from edgebuild.calibration.npy import read_npz

    if not source or Path(source).suffix != ".npz":
        raise BadInputError(f"sequences: ids {key!r} are read from a .npz data source; {source or 'this data'} is not one")
    arrays = read_npz(Path(source))
    if key not in arrays:
        raise BadInputError(f"sequences: {source} has no array {key!r} (it has {', '.join(sorted(arrays))})")
    ids = np.asarray(arrays[key])
    n = len(data)
    if ids.dtype.kind not in "biu" or ids.ndim not in (1, 2) or len(ids) != n or (ids.ndim == 2 and ids.shape[1] != 2):
        raise BadInputError(f"sequences: {source}[{key!r}] must hold one whole-number sequence id per sample ({n}), "
                            f"or [{n}, 2] (id, step); got {ids.dtype} {list(ids.shape)}")
    if ids.ndim == 2:
        return ids.astype(np.int64)
    ids = ids.astype(np.int64)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    if len(set(ids[starts].tolist())) != len(starts):
        raise BadInputError(f"sequences: {source}[{key!r}]: the samples of a sequence must be contiguous (some id "
                            "appears in two places)")
    steps = np.arange(n, dtype=np.int64) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.stack([ids, steps], 1)
