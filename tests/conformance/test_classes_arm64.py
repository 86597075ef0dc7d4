"""Issue 22, item 6: the arm64 model classes of tests/conformance/classes.py (3-D audio input named as tf2onnx names
it, stacked LSTM with h_n[-1], 5-D video CNN with a scatter-add histogram, CNN + 2-layer BiLSTM CTC), each built for
arm64 through the CLI as a user builds it: pass (0) or an honest budget failure (1), never a converter dead end (3);
the artifact loads and runs in LiteRT with XNNPACK, and the manifest records XNNPACK's coverage."""
from __future__ import annotations

import pytest

from tests.conformance.classes import make_audio, make_ctc, make_speaker, make_video_hist
from tests.conformance.test_classes import run_tflite
from tests.conformance.test_conformance import ARTIFACT_PRECISION, build

pytest.importorskip("torch")
pytest.importorskip("onnx2tf")

MAKERS = {"audio": make_audio, "speaker": make_speaker, "video_hist": make_video_hist, "ctc": make_ctc}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MAKERS))
def test_arm64_class_builds(tmp_path, capsys, name):
    model, data = MAKERS[name](tmp_path)
    out = tmp_path / "out"
    code, m, err = build(capsys, model, data, "arm64", out)
    assert code in (0, 1), err[-3000:]
    t = m["targets"]["arm64"]
    assert t["verdict"] in ("pass", "fail"), t.get("error")
    assert t["artifact"].endswith(".tflite") and ARTIFACT_PRECISION[t["artifact"]] == t["precision"]
    assert any(n.startswith("XNNPACK runs ") for n in t["notes"]), t["notes"]
    run_tflite(out / "arm64" / t["artifact"], [tuple(o["shape"]) for o in m["model"]["outputs"]])
    print(name, code, t["artifact"], t["verdict"], [n for n in t["notes"] if n.startswith("XNNPACK")])
