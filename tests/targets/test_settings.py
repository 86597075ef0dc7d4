"""Backend settings as frozen types (targets/settings.py) and the Precision enum.

Every registered backend declares a ``Settings`` type: it round-trips to a dict, a profile's ``quant:`` block is
parsed into it when the profile is loaded (a typo or a bad value is exit 2 before any model work), requested
settings never change, and the accuracy search's variants are new objects.
"""
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from edgebuild.errors import BadInputError
from edgebuild.specs import PRECISIONS
from edgebuild.targets.base import get_backend
from edgebuild.targets.profiles import PROFILE_DIR, catalogue, known_backends, load_profile
from edgebuild.targets.settings import Precision, Settings

BACKENDS = known_backends()
REPO = Path(__file__).resolve().parents[2]


def _types():
    return {name: get_backend(name).settings_type for name in BACKENDS}


def _a_changed_value(s: Settings, name: str):
    """Another valid value for field ``name`` (a flag flipped, a name list filled, another choice)."""
    value = getattr(s, name)
    if isinstance(value, bool):
        return not value
    if isinstance(value, tuple) and name != "ignored_scope":
        return ("/some/Conv",)
    return None


def test_every_backend_declares_a_frozen_settings_type():
    assert set(BACKENDS) >= {"onnx", "openvino", "tflite", "tensorrt"}
    for name, cls in _types().items():
        assert issubclass(cls, Settings) and cls is not Settings, name
        assert cls.__dataclass_params__.frozen, name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cls(), cls.known()[0], None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_settings_round_trip_to_dict_and_json(backend):
    cls = get_backend(backend).settings_type
    default = cls()
    assert cls.from_profile(default.to_dict()) == default
    assert cls.from_profile(json.loads(json.dumps(default.to_dict()))) == default
    changes = {k: v for k in cls.known() if (v := _a_changed_value(default, k)) is not None}
    assert changes, f"{backend}: no field to vary"
    changed = default.replace(**changes)
    assert changed != default and cls.from_profile(json.loads(json.dumps(changed.to_dict()))) == changed
    assert not isinstance(changed, Mapping)  # issue 21: typed through the search and the backends, never a dict view
    with pytest.raises(TypeError):
        {**changed}
    assert set(changed.to_dict()) == set(cls.known())  # a record asks for its plain dict


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_values_are_bad_input_also_through_replace(backend):
    cls = get_backend(backend).settings_type
    flag = next(k for k in cls.known() if isinstance(getattr(cls(), k), bool))
    with pytest.raises(BadInputError, match=f"quant.{flag} must be true or false"):
        cls.from_profile({flag: "maybe"}, "profile p")
    with pytest.raises(BadInputError, match=f"quant.{flag}"):
        cls().replace(**{flag: "maybe"})


def _typo(key: str) -> str:
    return key[:-1] if len(key) > 4 else key + "x"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_typo_in_a_profiles_settings_is_exit_2_before_any_model_work(backend, tmp_path, capsys, monkeypatch):
    """Through the CLI with --profile: the profile is parsed when it is loaded; loading or exporting the model
    would fail the test (they are replaced by functions that raise)."""
    from edgebuild.pipeline.cli import main
    from edgebuild.pipeline.stages import export, load as sources

    def no_model_work(*a, **k):
        raise AssertionError("model work started before the profile's settings were checked")

    monkeypatch.setattr(sources, "load_model", no_model_work)
    monkeypatch.setattr(export, "export_onnx", no_model_work)
    key = get_backend(backend).settings_type.known()[0]
    prof = tmp_path / "my.yaml"
    prof.write_text(f"name: typo\nbackend: {backend}\ndescription: d\nquant:\n  {_typo(key)}: 1\n")
    code = main(["--target", "typo", "--profile", str(prof), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    assert f"unknown {backend} quant setting(s) {_typo(key)} (did you mean {key}?)" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted(PROFILE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_loads_into_its_backends_settings(path):
    profile = load_profile(path)
    backend = get_backend(profile.backend)
    asked = backend.requested_settings(profile)
    assert type(asked) is backend.settings_type
    assert set(profile.quant) <= set(asked.known())
    for key, value in profile.quant.items():  # what the YAML says is what is asked (normalized)
        assert asked.to_dict()[key] == (dict(value) if isinstance(value, dict) else value) or key == "ignored_scope"
    for precision in profile.precisions:
        assert backend.default_settings(profile, precision) == asked.for_precision(precision)


def test_requested_settings_never_change_and_variants_are_new_objects():
    for profile in catalogue().values():
        backend = get_backend(profile.backend)
        asked = backend.requested_settings(profile)
        record = backend.default_settings(profile, "int8")
        record["float_layers"] = ["/written/back"]  # a record is a new dict: changing it changes nothing asked
        assert backend.requested_settings(profile) == asked
        for label, variant in backend.recovery_candidates(profile, asked):
            assert isinstance(variant, type(asked)) and variant != asked, (profile.name, label)
        assert backend.requested_settings(profile) == asked


def test_profile_settings_are_overridden_by_quant_and_changes_are_checked():
    tflite = get_backend("tflite")
    mcu = catalogue()["cortex-m"]
    assert tflite.requested_settings(mcu).io_dtype == "int8"  # from the profile's io_dtype
    assert "io_dtype" not in tflite.default_settings(mcu, "fp32")  # INT8-only settings: not in a float record
    assert tflite.requested_settings(mcu, {"host_kernels": "builtin"}).host_kernels == "builtin"
    with pytest.raises(BadInputError, match="profile cortex-m: unknown tflite quant setting"):
        tflite.requested_settings(mcu, {"host_kernel": "builtin"})


def test_openvino_reads_an_artifacts_record_back():
    ov = get_backend("openvino")
    x86 = catalogue()["x86"]
    record = {**ov.default_settings(x86, "int8"), "model_type": None, "applied": {"algorithm": "x"}}
    assert ov.requested_settings(x86, record).model_type is None


def test_precision_is_a_str_enum_and_replaces_the_lists():
    assert PRECISIONS == Precision.values() == ("int8", "fp16", "fp32", "dynamic")
    assert Precision.INT8 == "int8" and {"int8": 1}[Precision.INT8] == 1 and f"{Precision.FP16}" == "fp16"
    assert json.dumps([Precision.DYNAMIC]) == '["dynamic"]'
    for name in BACKENDS:
        assert set(get_backend(name).precisions) <= set(Precision), name
    from edgebuild.pipeline.cli import cli

    choices = next(p for p in cli.params if p.name == "precision").type.choices
    assert tuple(choices) == Precision.values()


def test_no_module_spells_out_a_precision_list():
    """A literal with three or more precision names is a hard-coded list: use Precision (or a backend's precisions)."""
    name = r'"(?:int8|fp16|fp32|dynamic)"'
    literal = re.compile(rf"[\(\[]\s*{name}(?:\s*,\s*{name}){{2,}}")
    found = [f"{p.relative_to(REPO)}:{i}" for folder in ("pipeline", "targets", "calibration")
             for p in (REPO / folder).rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line.split("#")[0])]
    assert not found, found


@pytest.mark.parametrize("backend", BACKENDS)
def test_settings_are_checked_when_the_profile_is_loaded(backend, tmp_path):
    key = get_backend(backend).settings_type.known()[0]
    prof = tmp_path / "p.yaml"
    prof.write_text(f"name: p\nbackend: {backend}\ndescription: d\nquant: {{{_typo(key)}: 1}}\n")
    with pytest.raises(BadInputError, match=rf"profile p: unknown {backend} quant setting\(s\) {_typo(key)} "):
        load_profile(prof)
