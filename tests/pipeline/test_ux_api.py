"""The Python API the README shows: `from edgebuild import build, BuildSpec`, objects as model and data, --version."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _readme_python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's Python API section has one runnable example"
    return blocks[0]


def test_readme_python_api_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_readme_python_example())
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, verdict = out.stdout.strip().splitlines()[-2:]
    import edgebuild

    assert first.split() == [edgebuild.__version__, "0", "model_int8_qdq.onnx"]
    assert verdict in ("pass", "fail")
    assert (tmp_path / "out-api" / "manifest.json").is_file() and (tmp_path / "out-spec" / "manifest.json").is_file()


def test_import_edgebuild_is_lean_and_exports_the_api():
    probe = ("import sys, edgebuild; heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorflow', 'openvino') "
             "if m in sys.modules]; from edgebuild import build, BuildSpec, BuildResult, EdgeBuildError, __version__; "
             "print(__version__, heavy, callable(build), BuildSpec.__name__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    version, rest = out.stdout.split(" ", 1)
    assert re.fullmatch(r"\d+\.\d+.*", version) and rest.strip() == "[] True BuildSpec"


def test_version_flag():
    from edgebuild import __version__
    from edgebuild.pipeline.cli import main

    out = subprocess.run([sys.executable, "-c", "from edgebuild.pipeline.cli import main; raise SystemExit(main(['--version']))"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"edgebuild {__version__}"
    assert callable(main)


def test_build_refuses_spec_and_options_together_and_unknown_objects():
    from edgebuild import BuildSpec, EdgeBuildError, build

    with pytest.raises(EdgeBuildError, match="not both"):
        build(BuildSpec(), model="m.onnx")
    with pytest.raises(EdgeBuildError, match="model must be"):
        build(model=object(), calib="digits")
    with pytest.raises(EdgeBuildError, match="calib must be"):
        build(model="m.onnx", calib=object())
