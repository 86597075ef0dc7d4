"""arm64 errors name the real cause, and the converter's whole output goes to the build log (issue 22, item 4).

onnx2tf prints its cause (``ERROR: ScatterElements currently supports only reduction=['none']``), a traceback, then
the same advice lines after every failure, and calls sys.exit(1): the build used to report the last of those
("try the -onwdt option"), and the converter log was in a deleted temp dir."""
from __future__ import annotations

import pytest

from edgebuild.targets.tflite.onnx2tf_run import first_real_error

ONNX2TF_LOG = """\
INFO: 17 / 19
\x1b[31mERROR:\x1b[0m ScatterElements currently supports only reduction=['none']. Pull requests are welcome. 
graph_node.name: histogram reduction: add
\x1b[31mERROR:\x1b[0m The trace log is below.
Traceback (most recent call last):
  File "onnx2tf/ops/ScatterElements.py", line 116, in make_node
SystemExit: 1

\x1b[31mERROR:\x1b[0m input_onnx_file_path: 
\x1b[31mERROR:\x1b[0m onnx_op_name: histogram
\x1b[31mERROR:\x1b[0m Read this and deal with it. https://github.com/PINTO0309/onnx2tf#parameter-replacement
\x1b[31mERROR:\x1b[0m Alternatively, if the input OP has a dynamic dimension, use the -b or -ois option to rewrite it.
\x1b[31mERROR:\x1b[0m If the input OP of ONNX before conversion is NHWC or an irregular channel arrangement, use -kt.
\x1b[31mERROR:\x1b[0m Also, for models that include NonMaxSuppression in the post-processing, try the -onwdt option.
"""


def test_first_real_error_is_the_cause_not_the_advice(tmp_path):
    log = tmp_path / "convert.log"
    log.write_text(ONNX2TF_LOG)
    found = first_real_error(log)
    assert found["error"] == "ScatterElements currently supports only reduction=['none']"
    assert found["node"] == "histogram" and "reduction: add" in found["detail"]
    log.write_text(ONNX2TF_LOG.split("ERROR:\x1b[0m ScatterElements")[0] + "ERROR:\x1b[0m The trace log is below.\n")
    assert first_real_error(log) is None  # only advice: nothing to name
    assert first_real_error(tmp_path / "missing.log") is None


def test_the_error_names_the_op_of_a_node_renamed_before_onnx2tf(tmp_path):
    """torch names nodes ``/color_hist_layer/ScatterElements``; TF refuses a leading '/', so rewrite/names.py hands
    onnx2tf ``n/color_hist_layer/ScatterElements``, the name its error gives. The message must still find the node's
    op and attributes in the source file (it said "(None)" on TransNetV2's histogram)."""
    import onnx
    from onnx import TensorProto, helper

    from edgebuild.targets.tflite.onnx2tf_run import explain

    node = helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], name="/hist/ScatterElements", axis=0,
                            reduction="add")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("d", TensorProto.FLOAT, [8]),
                                            helper.make_tensor_value_info("i", TensorProto.INT64, [4]),
                                            helper.make_tensor_value_info("u", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    log = tmp_path / "convert.log"
    log.write_text(ONNX2TF_LOG.replace("onnx_op_name: histogram", "onnx_op_name: n/hist/ScatterElements"))
    msg = explain(SystemExit(1), "onnx2tf", str(tmp_path / "m.onnx"), log)["message"]
    assert "ONNX node 'n/hist/ScatterElements' (ScatterElements, axis=0, reduction=add)" in msg, msg


@pytest.mark.slow
def test_unsupported_op_names_node_op_attribute_and_log_is_echoed(tmp_path, capfd):
    """With the rewrites off, onnx2tf's ScatterElements(reduction=add) error is the message; its output is on stderr
    (the CLI's build.log) without colour codes."""
    pytest.importorskip("onnx2tf")
    from edgebuild.pipeline.errors import ConversionError
    from tests.targets.test_tflite_conformance import calibration, convert, model_input
    from tests.targets.test_tflite_scatter import histogram_model

    mi = model_input(histogram_model(tmp_path / "hist.onnx"))
    with pytest.raises(ConversionError) as e:
        convert(mi, calibration(mi), tmp_path, precision="fp32", onnx_rewrites=False)
    msg = str(e.value)
    assert "ONNX node 'histogram' (ScatterElements, axis=2, reduction=add)" in msg, msg
    assert "ScatterElements currently supports only reduction=['none']" in msg
    assert "NonMaxSuppression" not in msg and "-onwdt" not in msg and "\n" not in msg
    assert "another target" in msg  # what the user can do
    err = capfd.readouterr().err
    assert "the converter's output (convert.log)" in err and "graph_node.name: histogram reduction: add" in err
    assert "\x1b[" not in err.split("the converter's output")[1]
