"""Weight-only INT8, the part every backend shares (targets/onnx/weight_only.py, targets/openvino_weight_only.py):
a weight's int8 form (symmetric, per channel), whether the int8 weights cost the artifact anything measurable
(``Check``), which weights to take (``choose``), and the note that says what was done."""
from __future__ import annotations

import numpy as np

# the name mark of a weight stored int8 by weight-only INT8 (its layer computes in float): the INT8 share counts such
# weights apart from those that run in int8 (pipeline/stages/weights.py), by this mark on the int8 constant's name
MARK = "weight_only_int8"
MIN_SQNR_DB = 35.0  # the int8-weight artifact against the float-weight one, per float output over the samples
MAX_LOSS_DB = 1.0  # or: at most this much of the artifact's output SQNR against the FP32 model lost (the default
# of the setting ``weight_only_loss_db``; the accuracy search may try more, judged by the gate)
FEW = 8  # with at most this many float weights, each is judged on its own when all together cost too much
CHECK_SAMPLES = 16
MIN_ELEMENTS = 256  # a smaller weight is not worth a DequantizeLinear
KEEP = (1.0, 0.75, 0.5, 0.25)  # the shares of the float weights tried, those with the smallest rounding error first


def quantized(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along ``axis``: (q, scale)."""
    other = tuple(d for d in range(w.ndim) if d != axis)
    peak = np.max(np.abs(w), axis=other) if other else np.abs(w)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def rounding_error(w: np.ndarray, axis: int) -> float:
    """The weight's relative int8 rounding error (norm of the error / norm of the weight): ``choose`` leaves the
    weights with the largest float first."""
    q, scale = quantized(w, axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    return float(np.linalg.norm(q * scale.reshape(shape) - w) / max(float(np.linalg.norm(w)), 1e-30))


class Check:
    """Whether int8 weights cost nothing measurable: every float output of the artifact with them keeps
    ``MIN_SQNR_DB`` against the artifact without them, or loses at most ``MAX_LOSS_DB`` of the artifact's SQNR
    against the FP32 model (a float first LSTM of a speaker encoder: its recurrent weights in int8 cost 1.5 dB, its
    input weights 14 dB)."""

    def __init__(self, artifact: list, fp32: list | None, max_loss_db: float = MAX_LOSS_DB):
        self.artifact, self.fp32, self.max_loss_db = artifact, fp32, max_loss_db
        self.base = sqnr(fp32, artifact) if fp32 is not None else None

    def judge(self, got: list) -> dict:
        vs_artifact = sqnr(self.artifact, got)
        vs_fp32 = sqnr(self.fp32, got) if self.fp32 is not None else None
        ok = vs_artifact >= MIN_SQNR_DB or (vs_fp32 is not None and vs_fp32 >= self.base - self.max_loss_db)
        return {"ok": bool(ok), "vs_artifact": vs_artifact, "vs_fp32": vs_fp32, "artifact_vs_fp32": self.base}


def choose(found: list, judge) -> list:
    """The weights to store int8: all of them when ``judge`` passes them; else, with at most FEW weights, those that
    pass one at a time (dropping the costliest until the set passes); else the shares KEEP of them with the smallest
    rounding error (``found`` is sorted by it)."""
    if judge(found)["ok"]:
        return found
    if len(found) > FEW:
        for keep in KEEP[1:]:
            chosen = found[:max(1, round(keep * len(found)))]
            if judge(chosen)["ok"]:
                return chosen
        return []
    alone = [(judge([w]), w) for w in found]
    passing = [w for v, w in sorted(alone, key=lambda x: -(x[0]["vs_artifact"] if x[0]["vs_fp32"] is None
                                                            else x[0]["vs_fp32"])) if v["ok"]]
    while len(passing) > 1 and not judge(passing)["ok"]:
        passing.pop()
    return passing


def weight_only_note(taken: int, found: int, elements: int, v: dict) -> str:
    cost = (f"output SQNR against FP32 {v['vs_fp32']:.1f} dB, {v['artifact_vs_fp32']:.1f} dB with float weights"
            if v["vs_fp32"] is not None else f"output SQNR {v['vs_artifact']:.1f} dB against float weights")
    return (f"weight-only INT8: {taken} weight(s) of the float layers ({elements} elements) stored int8 per output "
            f"channel, their activations float ({cost}" + (f"; {found - taken} weight(s) kept float, they cost more)"
                                                          if found > taken else ")"))


def sqnr(reference: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """The lowest, over the float outputs, of signal energy / error energy summed over the samples, in dB."""
    worst = np.inf
    for k in range(len(reference[0]) if reference else 0):
        if not np.issubdtype(np.asarray(reference[0][k]).dtype, np.floating):
            continue
        signal = sum(float(np.sum(np.square(r[k].astype(np.float64)))) for r in reference)
        noise = sum(float(np.sum(np.square(g[k].astype(np.float64) - r[k]))) for r, g in zip(reference, got))
        if noise > 0:
            worst = min(worst, 10 * np.log10(max(signal, 1e-30) / noise))
    return float(worst)
