"""Issue 22: the full-integer repair of a non-deterministic quantizer. TF's MLIR quantizer leaves a different subset of
an unrolled LSTM's gate SPLITs float from run to run; the repair kept the SPLITs one run named float, the next run
left others float, and after two repairs the build ended in exit 3 ("1 op(s) still run in float (SPLIT)") about once
in six. A type left float twice now stays float everywhere: ``ops_of_types`` finds every op of it."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")


def test_every_op_of_a_type_is_found_for_the_deny_list():
    import tensorflow as tf

    from edgebuild.targets.tflite.mixed import ops_of_types

    @tf.function(input_signature=[tf.TensorSpec([1, 6, 6], tf.float32)])
    def f(x):
        a, b = tf.split(x, 2, axis=-1)
        c, d, _ = tf.split(tf.nn.relu(a) + b, 3, axis=1)
        return tf.concat([c, d], axis=1)

    model = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert()
    found = ops_of_types(model, ["SPLIT"])
    assert {r["op"] for r in found} == {"SPLIT"} and len(found) == 2 + 3, found  # both SPLITs, one entry per output
    assert len({r["tensor"] for r in found}) == 5 and ops_of_types(model, ["CONV_2D"]) == []
    np.testing.assert_equal(len(ops_of_types(model, ["SPLIT", "CONCATENATION"])), 6)


def test_a_type_left_float_twice_is_kept_float_everywhere_but_never_a_weighted_one():
    from edgebuild.targets.tflite import convert as C

    job = {"auto_float_ops": [], "allow_float_layers": True}
    first = [{"op": "SPLIT", "outputs": ["s1"]}, {"op": "FULLY_CONNECTED", "outputs": ["f1"]}]
    second = [{"op": "SPLIT", "outputs": ["s7"]}, {"op": "FULLY_CONNECTED", "outputs": ["f3"]}]
    C._remember_float(job, first)
    assert "auto_float_types" not in job  # once: only the ops it named
    C._remember_float(job, second)
    assert job["auto_float_types"] == ["SPLIT"]  # twice: the type; FULLY_CONNECTED keeps per-op repairs (weights)


def test_the_full_integer_check_accepts_any_op_of_a_type_kept_float_by_type():
    """The deny list names the ops one run of the quantizer had; the next run may leave a different op of that
    type float under another tensor name. A type kept float by type is float everywhere, so the check accepts any
    op of it; an op of another type still fails the check."""
    from edgebuild.targets.tflite.mixed import AUTO_FLOAT, ConversionFailure, check_integer

    job = {"float_ops_requested": {AUTO_FLOAT: [{"op": "SPLIT", "tensor": "s1"}]}, "auto_float_types": ["SPLIT"]}
    assert check_integer([{"op": "SPLIT", "outputs": ["s1"]}, {"op": "SPLIT", "outputs": ["s9"]}], job)
    with pytest.raises(ConversionFailure, match="SPLIT"):  # without the type: the stray SPLIT fails the check
        check_integer([{"op": "SPLIT", "outputs": ["s9"]}], {**job, "auto_float_types": []})
    with pytest.raises(ConversionFailure, match="TANH"):
        check_integer([{"op": "SPLIT", "outputs": ["s9"]}, {"op": "TANH", "outputs": ["t1"]}], job)


def test_the_last_conversion_keeps_what_it_left_float_wherever_the_quantizer_moved_it(tmp_path, monkeypatch):
    """The quantizer leaves an unrolled LSTM's gate SPLITs float, a different one each run. The third (last)
    conversion's float ops are accepted float, as one more repair would keep them: a SPLIT left float twice (by type),
    and an op left float for the first time on the last conversion (per op, weighted or not). CI ended in exit 3 twice
    on that: the SPLIT was first left float on the last conversion, after a DIV repair had used one."""
    from edgebuild.targets.tflite import convert as C
    from edgebuild.targets.tflite.mixed import AUTO_FLOAT, ConversionFailure

    def run(last_op: str, allow: bool = True):
        runs = iter([[{"op": "SPLIT", "outputs": ["a"]}], [{"op": "CONCATENATION", "outputs": ["c"]}],
                     [{"op": last_op, "outputs": ["b"]}]])
        def convert(km, job, calib, repairs):  # as selective_int8 records the deny list it converted with
            if job.get("auto_float_ops"):
                job["float_ops_requested"] = {AUTO_FLOAT: [{"op": o["op"], "tensor": t} for o in job["auto_float_ops"]
                                                           for t in o["outputs"]]}
            return b"tflite"

        monkeypatch.setattr(C, "_bytes_or_mlir", convert)
        monkeypatch.setattr(C, "describe_tflite", lambda path: {"float_ops": next(runs), "ops": []})
        monkeypatch.setattr(C, "_coverage", lambda path: None)
        job = {"precision": "int8", "allow_float_layers": allow, "settings": {"host_kernels": "builtin"}}
        return C._convert_checked(None, job, {}, tmp_path, lambda what: None), job

    (described, kept, repairs), job = run("SPLIT")
    assert job["auto_float_types"] == ["SPLIT"] and len(repairs) == 3  # SPLIT twice, with another repair between
    for first_time in ("MEAN", "FULLY_CONNECTED"):
        (described, kept, repairs), job = run(first_time)
        assert f"{first_time} b" in kept["float_layers_kept"][AUTO_FLOAT], kept
        assert job.get("auto_float_types") is None  # per op: never a whole weighted type
    with pytest.raises(ConversionFailure, match="integer-only"):  # a profile without float layers names the op
        run("MEAN", allow=False)
