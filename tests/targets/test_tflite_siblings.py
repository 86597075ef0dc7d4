"""One converter run gives the INT8 model and its FP32 baseline (sibling artifacts, targets/tflite/family.py):
the sibling is the model a separate FP32 conversion writes, and a build converts arm64 with one child."""
from __future__ import annotations

import numpy as np
import pytest

from edgebuild.targets.base import get_backend
from edgebuild.targets.profiles import catalogue

pytest.importorskip("onnx2tf")
pytest.importorskip("ai_edge_litert")


@pytest.mark.slow
def test_int8_conversion_gives_the_fp32_sibling(tmp_path, model, small_sets):
    backend, profile = get_backend("tflite"), catalogue()["arm64"]
    calib = small_sets[0]
    fp32_settings = backend.default_settings(profile, "fp32")
    arts = backend.convert_family(model, profile, "int8", calib, tmp_path / "int8", None,
                                  {"fp32": (tmp_path / "fp32", fp32_settings)})
    assert set(arts) == {"int8", "fp32"}
    sib = arts["fp32"]
    assert sib.main == "model_fp32.tflite" and sib.directory == tmp_path / "fp32" and sib.precision == "fp32"
    assert any("same onnx2tf/TensorFlow graph" in n for n in sib.notes)
    assert arts["int8"].main == "model_int8.tflite"
    # the same bytes as a conversion of FP32 on its own, and the same I/O description
    alone = backend.convert(model, profile, "fp32", calib, tmp_path / "alone")
    assert alone.path.read_bytes() == sib.path.read_bytes()
    assert alone.io == sib.io
    # and the INT8 model is the one an INT8 conversion without siblings writes
    int8_alone = backend.convert(model, profile, "int8", calib, tmp_path / "int8-alone")
    assert int8_alone.path.read_bytes() == arts["int8"].path.read_bytes()
    feed = small_sets[1].feed(0)
    with backend.runner(sib, 1) as a, backend.runner(alone, 1) as b:
        np.testing.assert_array_equal(a.run(feed)[0], b.run(feed)[0])


def test_siblings_with_another_graph_are_not_shared(tmp_path, model, small_sets):
    """A sibling whose onnx2tf graph would differ (another input layout) is left to its own conversion."""
    backend, profile = get_backend("tflite"), catalogue()["arm64"]
    other = {**backend.default_settings(profile, "fp32"), "input_layout": "source"}
    arts = backend.convert_family(model, profile, "fp16", small_sets[0], tmp_path / "fp16", None,
                                  {"fp32": (tmp_path / "fp32", other)})
    assert set(arts) == {"fp16"}


def test_calibration_goes_to_disk_and_reads_back_the_same(tmp_path):
    """The converter child swaps its calibration arrays for on-disk readers (memory): same values, same indexing."""
    from edgebuild.targets.tflite.family import _calibration_to_disk

    big = np.random.default_rng(0).random((40, 1, 3, 224, 224), dtype=np.float32)  # 24 MB: goes to disk
    small = np.arange(6, dtype=np.int64).reshape(3, 2)  # stays
    calib = {"image": big.copy(), "ids": small}
    _calibration_to_disk(calib, tmp_path)
    rows = calib["image"]
    assert not isinstance(rows, np.ndarray) and calib["ids"] is small
    assert (len(rows), rows.shape, rows.ndim, rows.dtype) == (40, big.shape, 5, big.dtype)
    np.testing.assert_array_equal(rows[7], big[7])
    np.testing.assert_array_equal(rows[:20, 0], big[:20, 0])  # what onnx2tf's sample images take


@pytest.mark.slow
def test_a_crashed_int8_conversion_still_gives_its_siblings(tmp_path, model, small_sets, monkeypatch):
    """MiniLM on arm64: the INT8 model crashed LiteRT in the converter child's load check after the FP32 sibling had
    been made, and the search converted FP32 and FP16 again (two more onnx2tf runs, about 170 s). The siblings
    made before a crash are given back with the error."""
    from edgebuild.errors import ConversionError
    from edgebuild.targets.isolated import FAULT_ENV

    backend, profile = get_backend("tflite"), catalogue()["arm64"]
    monkeypatch.setenv(FAULT_ENV, "crash:convert:tflite-int8")
    asked = {p: (tmp_path / p, backend.default_settings(profile, p)) for p in ("fp32", "fp16")}
    with pytest.raises(ConversionError, match="SIGSEGV") as e:
        backend.convert_family(model, profile, "int8", small_sets[0], tmp_path / "int8", None, asked)
    sibs = e.value.siblings
    assert {p: a.main for p, a in sibs.items()} == {"fp32": "model_fp32.tflite", "fp16": "model_fp16.tflite"}
    with backend.runner(sibs["fp16"], 1) as r:
        assert np.isfinite(r.run(small_sets[1].feed(0))[0]).all()


@pytest.mark.slow
def test_a_build_whose_int8_crashes_ships_the_fp16_sibling_without_converting_again(tmp_path, capsys, monkeypatch):
    import json

    from edgebuild.pipeline.cli import main
    from edgebuild.targets.isolated import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "crash:convert:tflite-int8")
    monkeypatch.setenv("EDGEBUILD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["--target", "arm64", "--out", str(out)]) == 0, capsys.readouterr().err
    t = json.loads((out / "manifest.json").read_text())["targets"]["arm64"]
    assert t["artifact"] == "model_fp16.tflite" and t["search"]["tries"][-1]["label"] == "FP16 (no INT8)"
    assert "SIGSEGV" in t["search"]["tries"][0]["error"]
    assert any("same onnx2tf/TensorFlow graph" in n or "restored from the stage cache" in n for n in t["notes"]), t["notes"]
