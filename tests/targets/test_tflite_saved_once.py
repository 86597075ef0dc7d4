"""The converter child saves onnx2tf's Keras model as a SavedModel once (targets/tflite/convert.py
``keras_saved_once``): every precision converted from it is byte for byte the model TF's converter writes when
it saves the Keras model itself on each convert()."""
from __future__ import annotations

import pytest

pytest.importorskip("onnx2tf")
pytest.importorskip("ai_edge_litert")


@pytest.mark.slow
def test_one_savedmodel_gives_the_same_bytes_as_a_save_per_conversion(tmp_path, demo_onnx, small_sets, monkeypatch):
    from tensorflow.lite.python import lite
    from tensorflow.python.saved_model import save as tf_save
    from tf_keras.src.engine import base_layer

    from edgebuild.targets.tflite import backend as tflite, convert as tc
    from edgebuild.targets.base import TensorInfo

    calib = small_sets[0].stacked_feeds(20)
    settings = {**tflite.DEFAULTS, **tflite.INT8_DEFAULTS}
    job = {"onnx": str(demo_onnx), "settings": settings, "quantizer_used": "mlir",
           "inputs": [tflite._input_plan(TensorInfo("input", (1, 1, 8, 8), "float32", "NCHW"), "NHWC")]}
    km, _ = tc.to_keras(str(demo_onnx), job, calib, tmp_path)
    precisions = ("fp32", "fp16", "int8")
    try:
        plain = {p: tc._tflite_bytes(km, p, settings, calib, job) for p in precisions}
        saves, real_save = [], tf_save.save
        monkeypatch.setattr(tf_save, "save", lambda *a, **k: saves.append(a[1]) or real_save(*a, **k))
        metadata_property = base_layer.Layer.__dict__["_tracking_metadata"]
        with tc.keras_saved_once(km, tmp_path / "saved"):
            once = {p: tc._tflite_bytes(km, p, settings, calib, job) for p in precisions}
            once["int8 again"] = tc._tflite_bytes(km, "int8", settings, calib, job)
    finally:
        tc._release_tf()
    assert len(saves) == 1 and str(saves[0]).startswith(str(tmp_path / "saved"))  # one save for four conversions
    for p in precisions:
        assert once[p] == plain[p], f"{p}: the bytes differ from a conversion that saves the Keras model itself"
    assert once["int8 again"] == plain["int8"]
    # and TF and tf_keras are as they were
    assert lite._save is tf_save
    assert base_layer.Layer.__dict__["_tracking_metadata"] is metadata_property
    assert len(list((tmp_path / "saved").iterdir())) == 1
