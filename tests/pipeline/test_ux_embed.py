"""Metadata inside the artifact: ONNX metadata_props, TFLite metadata, OpenVINO rt_info — and the files still run."""
import json
import os

import numpy as np
import pytest

from edgebuild.pipeline.stages.embed import embed, fields, read

META = fields(version="0.1.0", target="t", precision="int8", source_sha256="ab" * 32,
              inputs=[{"name": "input", "shape": [1, 3], "dtype": "float32", "layout": "NC"}], outputs=["logits"],
              preprocess={"scale": 1.0}, class_names=["cat", "dog"])


@pytest.fixture()
def onnx_file(tmp_path):
    import torch

    path = tmp_path / "model.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(path), input_names=["input"],
                      output_names=["logits"], dynamo=False)
    return path


def test_onnx_metadata_props_and_the_model_still_runs(onnx_file):
    import onnxruntime as ort

    os.link(onnx_file, onnx_file.with_name("cached.onnx"))  # a hard link into the cache stays as it was
    before = onnx_file.read_bytes()
    assert embed(onnx_file, META) == "onnx metadata_props"
    got = read(onnx_file)
    assert got == META and json.loads(got["edgebuild.class_names"]) == ["cat", "dog"]
    assert onnx_file.with_name("cached.onnx").read_bytes() == before
    embed(onnx_file, {**META, "edgebuild.target": "u"})  # idempotent: replaced, not duplicated
    assert read(onnx_file)["edgebuild.target"] == "u"
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert sess.get_modelmeta().custom_metadata_map["edgebuild.precision"] == "int8"
    assert sess.run(None, {"input": np.ones((1, 3), np.float32)})[0].shape == (1, 2)


def test_openvino_rt_info(onnx_file, tmp_path):
    ov = pytest.importorskip("openvino")
    xml = tmp_path / "model_fp32.xml"
    ov.save_model(ov.convert_model(str(onnx_file)), str(xml))
    assert embed(xml, META) == "openvino rt_info"
    model = ov.Core().read_model(str(xml))
    assert model.get_rt_info(["edgebuild", "target"]).astype(str) == "t"
    assert read(xml) == META
    out = ov.Core().compile_model(model, "CPU")(np.ones((1, 3), np.float32))
    assert list(out.values())[0].shape == (1, 2)


def test_tflite_metadata_entry_and_the_model_still_runs(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from ai_edge_litert.interpreter import Interpreter

    @tf.function(input_signature=[tf.TensorSpec([1, 3], tf.float32)])
    def f(x):
        return tf.nn.relu(x) * 2.0

    path = tmp_path / "model_fp32.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert())
    assert embed(path, META).startswith("tflite metadata")
    assert read(path) == META
    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], np.array([[-1, 0, 2]], np.float32))
    interp.invoke()
    assert interp.get_tensor(interp.get_output_details()[0]["index"]).tolist() == [[0, 0, 4]]


def test_a_file_kind_without_metadata_is_left_alone(tmp_path):
    p = tmp_path / "build_engine.sh"
    p.write_text("echo")
    assert embed(p, META) is None and p.read_text() == "echo" and read(p) == {}


def test_embed_target_takes_its_fields_from_the_build(onnx_file):
    from types import SimpleNamespace

    from edgebuild.pipeline.spec import BuildSpec, InputSpec
    from edgebuild.pipeline.stages.embed import embed_target

    ctx = SimpleNamespace(job=SimpleNamespace(
        spec=BuildSpec(), evalset=SimpleNamespace(origin={"classes": ["a", "b"]}), calib=SimpleNamespace(origin={}),
        model=SimpleNamespace(content_hash="cd" * 32, inputs=(InputSpec("input", (1, 3)),),
                              outputs=(SimpleNamespace(name="logits"),))))
    art = SimpleNamespace(precision="int8", files=[onnx_file.name])
    assert embed_target(ctx, SimpleNamespace(name="onnx-cpu"), art, onnx_file.parent) == {
        "model.onnx": "onnx metadata_props"}
    got = read(onnx_file)
    assert got["edgebuild.target"] == "onnx-cpu" and json.loads(got["edgebuild.class_names"]) == ["a", "b"]
    assert json.loads(got["edgebuild.inputs"])[0]["name"] == "input" and json.loads(got["edgebuild.outputs"]) == ["logits"]
