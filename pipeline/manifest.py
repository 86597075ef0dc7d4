"""manifest.json, read and written in one place.

- ``write(directory, manifest)``: the build's record (``results.Manifest``) as ``directory/manifest.json``;
- ``read(out)``: an output folder's manifest.json as a dict when edgebuild wrote it (told by its content), else None;
  ``load(out)``: the same as a typed ``Manifest``;
- ``rerun_spec(path)``: ``-c out/manifest.json``, the spec of that build, ready to run again from anywhere;
- ``beside(artifact_dir)``: the manifest of the build a target folder belongs to.

The format (its keys, their order and values) is ``results.Manifest``'s and is described by
``pipeline/schemas/manifest.v1.schema.json``; nothing else in edgebuild opens manifest.json by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

from edgebuild.pipeline.results import Manifest

FILE = "manifest.json"
KEYS = ("edgebuild", "targets", "spec")  # what makes a manifest.json edgebuild's


def path(out: Path) -> Path:
    return Path(out) / FILE


def dumps(manifest: Manifest | dict) -> str:
    """manifest.json's text (``edgebuild build --json`` prints the same)."""
    data = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    return json.dumps(data, indent=2, default=str)


def write(directory: Path, manifest: Manifest | dict) -> Path:
    target = path(directory)
    target.write_text(dumps(manifest))
    return target


def read(out: Path) -> dict | None:
    """``out/manifest.json`` when edgebuild wrote it (by content), else None."""
    try:
        manifest = json.loads(path(out).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not all(k in manifest for k in KEYS):
        return None
    if not isinstance(manifest["targets"], dict) or not isinstance(manifest["spec"], dict):
        return None
    return manifest


def load(out: Path) -> Manifest | None:
    data = read(out)
    return None if data is None else Manifest.from_dict(data)


def beside(artifact_dir: Path) -> Path:
    """The manifest.json of the build whose target folder ``artifact_dir`` is."""
    return path(Path(artifact_dir).resolve().parent)


RELATIVE_SPEC_KEYS = ("model", "weights", "calib", "eval", "train", "cache_dir")


def rerun_spec(manifest_path: Path) -> dict | None:
    """``-c out/manifest.json``: the spec of that build, its relative paths resolved against the directory the
    build ran in (the manifest sits at <that directory>/<spec.out>/manifest.json), so it re-runs from anywhere;
    the output is that build's output directory unless -o says otherwise. None: not an edgebuild manifest."""
    from edgebuild.pipeline.spec import is_builtin_or_module

    manifest_path = Path(manifest_path)
    if manifest_path.name != FILE or not manifest_path.is_file():
        return None
    manifest = read(manifest_path.parent)
    if manifest is None:
        return None
    spec = dict(manifest["spec"])
    out_dir = manifest_path.resolve().parent
    base = out_dir
    out_rel = Path(str(spec.get("out") or "out"))
    if not out_rel.is_absolute() and ".." not in out_rel.parts:
        for _ in out_rel.parts:
            base = base.parent
    elif manifest.get("cwd"):  # the output is not below the build's directory: that directory, as recorded
        base = Path(manifest["cwd"])
    for key in RELATIVE_SPEC_KEYS:
        value = spec.get(key)
        if isinstance(value, str) and not is_builtin_or_module(value) and not Path(value).is_absolute() \
                and "://" not in value:  # an object-store cache (s3://...) is not a path
            spec[key] = str(base / value)
    spec["profile_files"] = [p if Path(p).is_absolute() else str(base / p) for p in spec.get("profile_files") or ()]
    spec["out"] = str(out_dir)
    return spec
