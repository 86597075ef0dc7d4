"""scripts/conformance.py reports XNNPACK's coverage of each arm64 artifact (issue 22)."""
from __future__ import annotations


def test_conformance_table_shows_xnnpack_coverage():
    """scripts/conformance.py's column: ops XNNPACK takes / all ops, in how many partitions, and what fell back."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "conformance.py"
    spec = importlib.util.spec_from_file_location("conformance_script", path)
    script = importlib.util.module_from_spec(spec)
    import sys
    sys.modules[spec.name] = script  # its dataclasses look their module up
    try:
        spec.loader.exec_module(script)
    finally:
        del sys.modules[spec.name]
    cov = {"ops": 80, "delegated": 77, "partitions": 3, "fallback": {"SOFTMAX": 1, "MIRROR_PAD": 2}}
    assert script.xnnpack_cell(cov) == "77/80 in 3 (MIRROR_PAD x2, SOFTMAX x1)"
    assert script.xnnpack_cell({"ops": 5, "delegated": 5, "partitions": 1, "fallback": {}}) == "5/5 in 1"
    assert script.xnnpack_cell(None) == "" and script.xnnpack_cell({"error": "RuntimeError"}) == ""
