"""`edgebuild --help` and `edgebuild targets` must stay instant: no heavy backend imported."""
import subprocess
import sys

HEAVY = ("torch", "tensorflow", "openvino", "nncf", "onnx2tf", "onnxruntime", "onnx", "ai_edge_litert", "sklearn", "pyarrow")

PROBE = """
import sys
from edgebuild.pipeline.cli import main
code = main({argv!r})
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
raise SystemExit(code)
"""


def _run(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_imports_no_heavy_backend():
    out = _run(["--help"])
    assert "Exit codes" in out and "--target" in out
    assert out.strip().endswith("HEAVY:")


def test_targets_imports_no_heavy_backend():
    out = _run(["targets"])
    assert "onnx-cpu" in out
    assert out.strip().endswith("HEAVY:")
