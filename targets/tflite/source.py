"""The ONNX graph the TFLite converter child takes: the build's model with its pass-through outputs trimmed, then
rewritten as the INT8 settings ask (activation equalization, recurrent input smoothing for dynamic range, AdaRound
weights), each exact in float or on TF's own int8 weight grid. Runs in the parent (targets/tflite/backend.py)."""
from __future__ import annotations

from pathlib import Path

from edgebuild.calibration.dataset import SampleSet
from edgebuild.targets.tflite import passthrough


def recurrent(onnx_path) -> bool:
    """Has the ONNX graph an LSTM/GRU/RNN (onnx2tf unrolls them for full-integer INT8 only: the float graph differs)?"""
    import onnx

    from edgebuild.targets.tflite.convert import RNN_OPS

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 — unreadable here means the converter names it; share nothing
        return True
    return any(n.op_type in RNN_OPS for n in graph.node)


def source_graph(onnx_path: Path, through: dict, s: dict, int8: bool, calib: SampleSet,
                 job_dir: Path) -> tuple[Path, list[str]]:
    """(the ONNX file onnx2tf converts, the notes of the rewrites made to it) for a conversion with settings ``s``;
    ``through``: the pass-through outputs (``passthrough.find``), trimmed from the copy onnx2tf gets."""
    onnx_in = passthrough.trimmed_copy(onnx_path, through, job_dir / "model.onnx") if through \
        else Path(onnx_path).resolve()
    notes: list[str] = []
    if int8 and s["equalize"]:
        from edgebuild.targets.onnx.equalize import equalized_source

        onnx_in, note = equalized_source(onnx_in, calib, job_dir)
        notes.append(note)
    if int8 and s["activations"] == "dynamic":
        from edgebuild.targets.onnx.smooth_recurrent import smoothed_source

        onnx_in, note = smoothed_source(onnx_in, calib, job_dir)
        notes.append(note)
    if int8 and s["rounding"] == "adaround":
        notes.append(_adaround(onnx_in, calib, s, job_dir))
        onnx_in = job_dir / "adaround.onnx"
    return onnx_in, notes


def _adaround(onnx_in: Path, calib: SampleSet, s: dict, job_dir: Path) -> str:
    """``job_dir/adaround.onnx``: ``onnx_in`` with its Conv/Gemm/MatMul weights rounded by AdaRound onto the grid TF's
    quantizer derives from them (symmetric int8 +-127, per output channel or per tensor: the same as onnxruntime's,
    so each learned integer is the one the .tflite stores); onnx2tf converts that. Returns the note."""
    from edgebuild.targets.onnx_adaround import TIME_LIMIT, adaround, describe

    record = adaround(onnx_in, job_dir / "adaround.onnx", calib, job_dir, per_channel=bool(s["per_channel"]),
                      reduce_range=False, time_limit=TIME_LIMIT)
    return describe(record) + " (before onnx2tf, onto TF's int8 weight grid)"
