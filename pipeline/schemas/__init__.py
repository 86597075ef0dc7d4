"""Versioned JSON Schemas of what edgebuild reads and writes, shipped with the package:

    config.v1.schema.json     edgebuild.yaml (and the ``spec`` a manifest records)
    profile.v1.schema.json    a target profile (targets/profiles/*.yaml, --profile FILE)
    manifest.v1.schema.json   manifest.json (its ``format`` key says which version it follows)

``path(kind)`` is the file to hand to an editor or a validator; ``validate(kind, data)`` lists what does not fit
(it needs the ``jsonschema`` package: ``pip install 'edgebuild[dev]'``). A change that breaks a reader is a new
version beside the old one, never an edit of a published file.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

VERSIONS = {"config": 1, "profile": 1, "manifest": 1}  # the current format of each


def path(kind: str, version: int | None = None) -> Path:
    """The schema file of ``kind`` (config | profile | manifest), current version unless ``version``."""
    if kind not in VERSIONS:
        from edgebuild.errors import BadInputError

        raise BadInputError(f"no schema {kind!r}; there are {', '.join(VERSIONS)}")
    return Path(str(resources.files(__package__).joinpath(f"{kind}.v{version or VERSIONS[kind]}.schema.json")))


@lru_cache(maxsize=None)
def schema(kind: str, version: int | None = None) -> dict:
    return json.loads(path(kind, version).read_text(encoding="utf-8"))


def validate(kind: str, data) -> list[str]:
    """Every way ``data`` does not fit the current ``kind`` schema, one line each (empty: it fits)."""
    from edgebuild.errors import require

    jsonschema = require("jsonschema", "validating against edgebuild's JSON Schemas")
    from referencing import Registry, Resource

    registry = Registry().with_resources(
        (schema(k)["$id"], Resource.from_contents(schema(k))) for k in VERSIONS)
    validator = jsonschema.Draft202012Validator(schema(kind), registry=registry,
                                                format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))]
