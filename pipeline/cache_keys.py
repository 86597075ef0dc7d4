"""The stage cache's keys: what a stage's entry is keyed on (``cached``: the stage's own version in ``STAGES``, its
inputs' content hashes, its config, the backend's package versions and ``cache_version``), as one content hash
(``key``). ``pipeline/cache.py`` (the store) re-exports them; every stage builds its keys here."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of edgebuild's own sources (a fingerprint of the tree; cache keys do not use it: see ``cached``)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in ("targets", "calibration", "pipeline"):
        for f in sorted((root / folder).rglob("*")):
            if f.suffix in (".py", ".yaml") and f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key(**parts) -> str:
    """A content hash of ``parts`` (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# Each stage's own version: bump a stage's number when its code changes what it stores. Together with the versions
# of the packages its backend declares (BackendInfo.versions, and the backend's cache_version), it replaces the hash
# of edgebuild's whole source tree the keys used to carry, so editing one module no longer invalidates every entry.
# search 8: mixed precision before the variants on a backend whose variants are whole conversions (TFLite); 9: the
# activation-equalization candidate (targets/onnx/equalize.py); 10: a recipe of another kind before early mixed precision;
# 11: a passing mixed artifact with float weights tries its float layers' weights int8 (weight-only), and the variants
# after an equalized near miss are built on the equalized graph; 12: after a near miss, a variant that quantizes
# other ops comes before AdaRound, AdaRound's seconds do not count as a plain try's, and mixed precision after three
# misses waits while fewer than three tries fit. validate 6, search 16, search-choice 8, sensitivity 6: the sequence
# and detection tasks let a near-tie decision go either way (pipeline/metrics.py NEAR_TIE_RATIO), one box one pair
# search 17: the mean-of-per-sample-min-max calibration candidate, before early mixed precision on TFLite; 18: it is
# onnx-cpu's first variant too; 19: its `mixed_later` note only where mixed precision would have run
STAGES = {"convert": 1, "reference": 2, "validate": 6, "latency": 1, "memory": 1, "micro": 1, "search": 19,
          "search-choice": 8, "sensitivity": 6, "peak": 1}


def cached(stage: str, inputs: dict, config: dict | None = None, backend: str | tuple[str, ...] | None = None) -> str:
    """The stage-cache key of what ``stage`` makes from ``inputs`` (content hashes: model, data, artifacts) under
    ``config`` (settings, judging, threads, host...): keyed on the stage's own version (``STAGES``), the versions of
    the packages that ``backend`` (one name or several) declares, its ``cache_version``, and the host's Python and
    machine. Every stage builds its keys here (get and put with ``StageCache``, whose entries stay hash-checked)."""
    from edgebuild.pipeline.versions import tool_versions
    from edgebuild.targets.base import backend_info

    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} has no cache version (pipeline/cache.py STAGES)")
    names = (backend,) if isinstance(backend, str) else tuple(backend or ())
    infos = [backend_info(n) for n in names]
    packages = sorted({p for i in infos for p in i.versions})
    return key(stage=stage, stage_version=STAGES[stage], inputs=inputs, config=config or {},
               backends={i.name: i.cache_version for i in infos}, versions=tool_versions(packages))
