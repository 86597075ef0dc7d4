"""Issue 22: LiteRT aborts (SIGABRT) loading some quantized graphs instead of failing. Loaded in the converter child,
that killed the child before the XNNPACK repair could name the op, and the whole INT8 kind died (MiniLM: its
attention mask's SUB, logged with a scale of 1.3e36). The load check now runs in a process of its own, and when the
quantization parameters name no op, a bisection over cuts of the graph does.

The crash is made here on purpose: an int8 ADD whose output scale is 1e-12 (its rescaling multiplier is far above
1, which LiteRT's int8 ADD kernel checks with an abort while preparing); nothing ``suspects`` looks at is out of
range in it."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")

BAD_SCALE = 1e-12


def _keras():
    inp = keras.Input((8,), batch_size=1, name="x")
    h = keras.layers.Dense(8)(keras.layers.Dense(8)(inp))
    return keras.Model(inp, keras.layers.Lambda(lambda t: tf.math.add(t, tf.math.multiply(t, 0.5)), name="addmul")(h))


def _samples(n=16):
    rng = np.random.default_rng(0)
    return [rng.normal(0, 1, (1, 8)).astype(np.float32) for _ in range(n)]


def _int8(km) -> bytes:
    c = tf.lite.TFLiteConverter.from_keras_model(km)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = lambda: ([x] for x in _samples())
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return c.convert()


def _aborting(model: bytes) -> bytes:
    """``model`` with every int8 ADD's output scale set to ``BAD_SCALE`` (float ADDs untouched)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    g = m.subgraphs[0]
    for op in g.operators:
        code = m.operatorCodes[op.opcodeIndex]
        out = g.tensors[op.outputs[0]]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.ADD and \
                out.type == schema.TensorType.INT8:
            out.quantization.scale = [BAD_SCALE]
    b = flatbuffers.Builder(len(model) + 1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_an_abort_in_litert_is_an_error_line_and_the_bisection_names_the_op(tmp_path):
    from edgebuild.targets.tflite import xnnpack as xnn

    path = tmp_path / "model.tflite"
    path.write_bytes(_aborting(_int8(_keras())))
    feed, keys, perms = {"x": _samples(1)[0]}, {"x": "x"}, {"x": None}
    error = xnn.load_and_run_isolated(path, feed, keys, perms)  # in this process, LiteRT would abort pytest
    assert error and "crashed (SIGABRT)" in error, error
    assert xnn.suspects(path) == []  # nothing in the quantization parameters says so: the bisection must
    found = xnn.bisect(path, feed, keys, perms, tmp_path)
    assert found and found["op"] == "ADD" and found["outputs"] == ["StatefulPartitionedCall:01"], found
    assert "crashed (SIGABRT)" in found["why"] and not (tmp_path / "cut.tflite").exists()
    path.write_bytes(_int8(_keras()))  # the same model as converted: it loads, and no op is blamed
    assert xnn.load_and_run_isolated(path, feed, keys, perms) is None


def test_a_cut_graph_keeps_the_inputs_and_ends_at_the_ops_it_keeps():
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgebuild.targets.tflite import xnnpack as xnn

    model = _int8(_keras())
    full = Interpreter(model_content=model)
    ops = [op["op_name"] for op in full._get_ops_details()]
    cut = Interpreter(model_content=xnn.prefix(model, 2),
                      experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    assert [op["op_name"] for op in cut._get_ops_details()] == ops[:2] == ["QUANTIZE", "FULLY_CONNECTED"]
    run = cut.get_signature_runner()
    assert list(run.get_input_details()) == ["x"] and list(run.get_output_details()) == ["cut_0"]
    out = run(x=_samples(1)[0])["cut_0"]
    assert out.shape == (1, 8) and out.dtype == np.int8  # the first Dense's int8 output


def test_the_conversion_repairs_an_abort_by_keeping_the_op_float(tmp_path, monkeypatch):
    """The converter child's loop (convert._convert_checked), on a real INT8 conversion whose int8 ADD aborts LiteRT:
    the check survives the crash, the bisection names the ADD, the next conversion keeps it float, and that model
    loads and runs with XNNPACK (before: the child died with SIGABRT and the INT8 kind with it)."""
    from edgebuild.targets.tflite import convert as C

    real = C._bytes_or_mlir
    monkeypatch.setattr(C, "_bytes_or_mlir", lambda *a: _aborting(real(*a)))
    km = _keras()
    calib = {"x": np.stack(_samples())}
    job = {"precision": "int8", "allow_float_layers": True, "quantizer_used": "mlir", "inputs": [{"name": "x"}],
           "settings": {"host_kernels": "xnnpack", "io_dtype": "float32", "per_channel": True}}
    described, kept, repairs = C._convert_checked(km, job, calib, tmp_path, lambda what: None)
    assert len(repairs) == 1 and repairs[0].startswith("kept in float for XNNPACK: ADD (StatefulPartitionedCall:01)"), repairs
    assert [op["op"] for op in job["auto_float_ops"]] == ["ADD"]
    assert "ADD" in [op["op"] for op in described["float_ops"]] and kept["float_layers_kept"]
    assert described["xnnpack_coverage"]["ops"] > 0  # loaded with XNNPACK in this process: no abort left
