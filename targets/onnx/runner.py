"""ONNX Runtime CPU runner of an ONNX model (the backend's runner, the fake-quant child's, the FP32 reference's)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.errors import ConversionError
from edgebuild.targets.base import Runner


class OrtRunner(Runner):
    def __init__(self, path: Path, threads: int, simulate: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if simulate:  # keep Q/DQ as separate ops: float math on quantized values, like TensorRT's int8 kernels
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ConversionError(f"onnxruntime cannot load {path.name}: {one_line(e)}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.threads = threads

    def threads_used(self) -> int:
        return self.threads

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o, dtype=np.float32) for o in self.session.run(self.output_names, feed)]


def one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
