"""The versioned JSON Schemas shipped in the package (pipeline/schemas/) describe what edgebuild really reads and
writes: every shipped profile and the demo's manifest validate; the schemas list exactly the fields the code has."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from edgebuild.pipeline.schemas import VERSIONS, path, schema, validate

pytest.importorskip("jsonschema")
ROOT = Path(__file__).resolve().parents[2]


def test_every_schema_is_versioned_and_a_valid_draft_2020_12_schema():
    import jsonschema

    for kind, version in VERSIONS.items():
        s = schema(kind)
        assert path(kind).name == f"{kind}.v{version}.schema.json" and s["$id"].endswith(f":{kind}:{version}")
        jsonschema.Draft202012Validator.check_schema(s)


def test_every_shipped_profile_validates_and_a_typo_does_not():
    profiles = sorted((ROOT / "targets" / "profiles").glob("*.yaml"))
    assert len(profiles) >= 8
    for p in profiles:
        assert validate("profile", yaml.safe_load(p.read_text())) == [], p.name
    arm64 = yaml.safe_load((ROOT / "targets" / "profiles" / "arm64.yaml").read_text())
    assert validate("profile", {**arm64, "treads": 4}) and validate("profile", {**arm64, "precision": "int4"})


def test_the_schemas_name_exactly_the_fields_of_the_code():
    from edgebuild.pipeline.spec import Budgets, BuildSpec
    from edgebuild.specs import InputSpec, PreprocessSpec
    from edgebuild.targets.profiles import Budget, TargetProfile

    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    profile, config = schema("profile"), schema("config")
    assert set(profile["properties"]) == names(TargetProfile) - {"source"}
    assert set(profile["$defs"]["budgets"]["properties"]) == set(Budget.LIMITS)  # a profile's budgets: the named limits
    assert set(config["properties"]) == names(BuildSpec) | {"input"}
    assert set(config["$defs"]["budgets"]["properties"]) == set(Budgets.KEYS)
    assert set(config["$defs"]["preprocess"]["properties"]) == names(PreprocessSpec)
    assert set(config["$defs"]["input"]["properties"]) == names(InputSpec)


def test_a_config_validates_and_the_readme_kind_of_mistake_does_not():
    good = {"model": "m.onnx", "input": {"name": "images", "shape": [1, 3, 640, 640]}, "calib": "data/calib",
            "targets": ["arm64", "x86"], "budgets": {"max_accuracy_drop": 1.0}, "preprocess": {"resize": [224, 224]}}
    assert validate("config", good) == []
    assert validate("config", {**good, "target": ["arm64"]})  # unknown key
    assert validate("config", {**good, "budgets": {"max_latency_ms": -1}})


@pytest.mark.slow
def test_the_demo_manifest_validates_and_carries_its_format(tmp_path):
    from edgebuild import build

    result = build(targets=["onnx-cpu"], auto=False, cache=False, out=str(tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == VERSIONS["manifest"] and result.exit_code in (0, 1)
    assert validate("manifest", manifest) == []
    assert validate("manifest", {**manifest, "verdict": "ok"}) and validate("manifest", {**manifest, "format": 2})
