"""Metadata inside the artifact: what a device program needs to use the file without manifest.json.

A post-packaging step (the converters stay as they are), done by each artifact's backend (``Backend.embed_metadata``,
the format named by its descriptor's ``metadata``): ONNX ``metadata_props``, a TFLite ``metadata`` entry named
``edgebuild`` (a JSON buffer), OpenVINO ``<rt_info><edgebuild>`` in the IR's XML (the .bin is untouched), ExecuTorch
``.pte``: a constant method ``edgebuild_metadata``. Every file is rewritten to a new file and
renamed over the old one, so a hard link into the stage cache is never changed; the sha256 of what lands in
the output is computed after this step. Nothing here reaches the network.

Keys (all strings; lists and mappings as JSON): ``edgebuild.version``, ``edgebuild.target``,
``edgebuild.precision``, ``edgebuild.source_model_sha256``, ``edgebuild.inputs`` (name, shape, dtype, layout),
``edgebuild.outputs`` (names), ``edgebuild.class_names`` (when known), ``edgebuild.preprocess``.
"""
from __future__ import annotations

import json
from pathlib import Path

PREFIX = "edgebuild."


def fields(*, version: str, target: str, precision: str, source_sha256: str, inputs: list[dict],
           outputs: list[str], preprocess: dict, class_names: list[str] | None = None) -> dict[str, str]:
    """The metadata as flat string pairs (what ONNX metadata_props and rt_info hold)."""
    out = {"version": version, "target": target, "precision": precision, "source_model_sha256": source_sha256,
           "inputs": json.dumps(inputs), "outputs": json.dumps(outputs), "preprocess": json.dumps(preprocess)}
    if class_names:
        out["class_names"] = json.dumps(list(class_names))
    return {PREFIX + k: str(v) for k, v in out.items()}


def _backend(path: Path, backend: str | None):
    """The backend that owns ``path``'s format: the artifact's own, else the one whose descriptor declares the
    file's suffix (None: no backend writes such files)."""
    from edgebuild.targets.base import all_infos, get_backend

    if backend is None:
        suffix = path.suffix.lower()
        backend = next((i.name for i in all_infos() if suffix in i.suffixes), None)
    return get_backend(backend) if backend else None


def embed(path: Path, meta: dict[str, str], backend: str | None = None) -> str | None:
    """Write ``meta`` into the artifact at ``path`` (its backend's ``embed_metadata``); returns the format it went
    into, or None when the file kind carries no metadata (then manifest.json/metadata.json remain the only record)."""
    b = _backend(path, backend)
    return b.embed_metadata(path, meta) if b is not None else None


def read(path: Path, backend: str | None = None) -> dict[str, str]:
    """The edgebuild metadata an artifact carries ({} when none); ``backend``: the artifact's (else found by the
    file's suffix)."""
    b = _backend(path, backend)
    return b.read_metadata(path) if b is not None else {}


def embed_target(ctx, profile, art, outdir: Path) -> dict[str, str]:
    """Embed the build's metadata into every file of a packaged target that can carry it (called where the
    target is described, before the files' sha256 are taken); returns {file: where it went}."""
    from dataclasses import asdict

    from edgebuild.pipeline.stages.data import class_names
    from edgebuild.pipeline.versions import tool_versions

    classes = class_names(ctx.job.spec, ctx.job.calib, ctx.job.evalset)
    meta = fields(version=tool_versions(("edgebuild",))["edgebuild"] or "unknown", target=profile.name,
                  precision=art.precision, source_sha256=ctx.job.model.content_hash,
                  inputs=[asdict(i) for i in ctx.job.model.inputs], outputs=[o.name for o in ctx.job.model.outputs],
                  preprocess=asdict(ctx.job.spec.preprocess), class_names=classes)
    done = {}
    for name in sorted(art.files):
        where = embed(outdir / name, meta, getattr(art, "backend", None))  # its backend's Backend.embed_metadata
        if where:
            done[name] = where
    return done
