"""CalibrationSet: a sized, re-iterable source of input feeds with optional labels."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from edgebuild.pipeline.errors import BadInputError


@dataclass
class CalibrationSet:
    """Samples for one model, stacked per input along a leading sample axis.

    ``inputs[name][i]`` is sample ``i`` of input ``name`` *without* the batch dimension; ``feeds()``
    yields batch-1 feeds in the source model's layout and dtype, ready for any backend's runner.
    """

    name: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    origin: dict = field(default_factory=dict)  # where the samples came from (recorded in the manifest)

    def __post_init__(self):
        sizes = {len(a) for a in self.inputs.values()}
        if len(sizes) != 1:
            raise BadInputError(f"{self.name}: inputs have different sample counts {sorted(sizes)}")
        if self.labels is not None and len(self.labels) != len(self):
            raise BadInputError(f"{self.name}: {len(self.labels)} labels for {len(self)} samples")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def feed(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i : i + 1] for k, v in self.inputs.items()}

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self.feed(i)

    def __iter__(self):
        return self.feeds()

    def subset(self, idx, name: str | None = None, **origin) -> "CalibrationSet":
        idx = np.asarray(idx, dtype=np.int64)
        return CalibrationSet(
            name or self.name,
            {k: v[idx] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[idx],
            {**self.origin, **origin},
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
        h = hashlib.sha256()
        for k in sorted(self.inputs):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.inputs[k]).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "samples": len(self),
            "labels": self.has_labels,
            "inputs": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in self.inputs.items()},
            "content_hash": self.content_hash(),
            **self.origin,
        }


def split(data: CalibrationSet, eval_fraction: float, seed: int) -> tuple[CalibrationSet, CalibrationSet]:
    """Deterministic disjoint split of one source into (calibration, evaluation)."""
    n = len(data)
    if n < 4:
        raise BadInputError(f"{data.name}: {n} samples are too few to split into calibration and evaluation")
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = max(1, int(round(n * eval_fraction)))
    ev, cal = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    how = {"split": {"seed": seed, "eval_fraction": eval_fraction, "of": n}}
    return (data.subset(cal, f"{data.name}[calib]", **how), data.subset(ev, f"{data.name}[eval]", **how))


def cap(data: CalibrationSet, max_samples: int, seed: int) -> CalibrationSet:
    """At most ``max_samples`` samples, chosen deterministically (class-balanced order is not assumed)."""
    if len(data) <= max_samples:
        return data
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:max_samples])
    return data.subset(idx, sampled={"of": len(data), "kept": max_samples, "seed": seed})


def drop_overlap(calib: CalibrationSet, evalset: CalibrationSet) -> tuple[CalibrationSet, int]:
    """Remove from calibration every sample that also appears in evaluation; returns the count removed."""
    seen = set(evalset.sample_hashes())
    keep = [i for i, h in enumerate(calib.sample_hashes()) if h not in seen]
    removed = len(calib) - len(keep)
    if removed == 0:
        return calib, 0
    if not keep:
        raise BadInputError("calibration and evaluation data are the same samples; give disjoint sets or one source to split")
    return calib.subset(keep, overlap_removed=removed), removed
