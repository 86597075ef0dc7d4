"""One backend descriptor (targets/base.py BackendInfo): a backend added as one module in targets/ is known to every
part of the pipeline that needs it (the registry, profiles, missing-library errors, the manifest's tools, the stage
cache, --device, metadata embedding) without any other file changing."""
from __future__ import annotations

import sys
import textwrap

import pytest

from edgebuild.errors import BadInputError, MissingToolError
from edgebuild.targets import base

PLUGGED = '''
from pathlib import Path

from edgebuild.targets.base import Artifact, Backend, BackendInfo, register

INFO = register(BackendInfo(
    name="plugged", backend=f"{__name__}:Plugged", precisions=("fp32",), extra="plugged",
    requires=("plugged_converter_lib",), device_runtimes=("plugged_rt",), suffixes=(".plg",),
    metadata="plugged sidecar", versions=("numpy",), cache_version=7))


class Plugged(Backend):
    def artifact_name(self, precision, settings=None):
        return "model_fp32.plg"

    def embed_metadata(self, path: Path, meta):
        if path.suffix != ".plg":
            return None
        path.with_suffix(".meta").write_text(repr(sorted(meta.items())))
        return self.info.metadata
'''


@pytest.fixture
def plugged(tmp_path, monkeypatch):
    """A backend module dropped into targets/ (here: a folder added to the package's path)."""
    import edgebuild.targets as package

    (tmp_path / "plugged.py").write_text(textwrap.dedent(PLUGGED))
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    yield tmp_path
    base._INFOS.pop("plugged", None)
    base._CLASSES.pop("plugged", None)
    sys.modules.pop("edgebuild.targets.plugged", None)


def test_a_backend_module_is_known_everywhere_without_editing_another_file(plugged, tmp_path):
    from edgebuild.pipeline import device, versions
    from edgebuild.pipeline.cache import cached
    from edgebuild.pipeline.stages import embed
    from edgebuild.targets.profiles import load_profile

    assert "plugged" in base.known_backends()  # found by importing targets/'s modules, not by reading source text
    b = base.get_backend("plugged")
    assert (b.name, b.precisions, b.requires) == ("plugged", ("fp32",), ("plugged_converter_lib",))
    with pytest.raises(MissingToolError, match=r"target t needs plugged-converter-lib.*edgebuild\[plugged\]"):
        b.check_available("t")
    assert "edgebuild[plugged]" in str(MissingToolError("", "plugged_converter_lib"))  # found missing anywhere

    yaml = tmp_path / "plugged-board.yaml"
    yaml.write_text("name: plugged-board\nbackend: plugged\ndescription: a board\nprecision: fp32\n"
                    "precisions: [fp32]\n")
    assert load_profile(yaml).backend == "plugged"
    assert "numpy" in versions.all_tools()
    assert device.device_runtimes()["plugged"] == ("plugged_rt",)
    k = cached("convert", {"model": "m"}, {}, backend="plugged")
    assert k != cached("convert", {"model": "m"}, {}, backend="onnx")

    art = tmp_path / "model_fp32.plg"
    art.write_bytes(b"model")
    assert embed.embed(art, {"edgebuild.target": "plugged-board"}) == "plugged sidecar"  # by its declared suffix
    assert "plugged-board" in art.with_suffix(".meta").read_text()


def test_a_profile_for_an_unknown_backend_and_a_bad_descriptor_are_refused(tmp_path):
    from edgebuild.targets.profiles import load_profile

    yaml = tmp_path / "p.yaml"
    yaml.write_text("name: p\nbackend: nosuchbackend\ndescription: x\nprecision: fp32\nprecisions: [fp32]\n")
    with pytest.raises(BadInputError, match="unknown backend 'nosuchbackend'"):
        load_profile(yaml)
    with pytest.raises(ValueError, match="module:Class"):
        base.BackendInfo(name="x", backend="no-colon", precisions=("fp32",))


def test_every_shipped_backend_declares_its_extra_libraries_and_versions():
    for info in base.all_infos():
        assert info.extra and info.requires and info.versions and info.suffixes and info.metadata, info.name
        assert set(info.precisions) <= {"int8", "fp16", "fp32", "dynamic"}, info.name
    assert base.backend_info("tflite").micro and not base.backend_info("onnx").micro
