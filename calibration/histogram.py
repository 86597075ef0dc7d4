"""Histogram calibration of activation ranges (percentile, entropy), by onnxruntime's own search; and the mean of
per-sample min-max ranges (``mean_minmax``), NNCF's default for per-tensor activations.

The TFLite conversion measures its activations in LiteRT (targets/tflite/ranges.py) and gives them to onnxruntime's
``HistogramCollector`` search, so "percentile calibration" and "entropy calibration" mean on arm64 what they mean on
onnx-cpu (targets/onnx/static.py, through onnxruntime's ``create_calibrator``).

Entropy needs more histogram bins than the quantized grid has: with onnxruntime's defaults (128 bins, 128 quantized
bins) its KL search has exactly one candidate threshold, the whole histogram (``+-max|x|``: wider than min-max for a
ReLU output), unless a later chunk re-bins a wider range. ENTROPY_BINS gives it thresholds from a quarter of the bound
to all of it. Cost of onnxruntime's numpy KL search on this 2-core host: ~0.14 s per tensor at 512 bins, ~0.9 s at
2048 (TensorRT's count). onnx-cpu uses these histograms too (targets/onnx/static.py ``calibrate_histograms``), bounded
by the min-max ranges it already calibrated: onnxruntime's own collector re-bins at the first chunk's bin width, and
512 bins through it took the 519 tensors of PP-OCR's text classifier from 1 s to 64 s.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 512, 128
PERCENTILE_BINS = 2048  # onnxruntime's default for its percentile calibrator
METHODS = ("percentile", "entropy", "mean_minmax")
# mean_minmax: each tensor's range is the mean over the samples of each sample's min and max, not the min of the mins
# and the max of the maxes: one sample's spike no longer sets the step of every sample. It is NNCF's default estimator
# for per-tensor activations (``RangeEstimatorParametersSet.MEAN_MINMAX``), and it costs one pass over the samples, no
# histogram. PicoDet's layout detector (depthwise chains equalized, onnxruntime QDQ, 80 pages): f1 vs FP32 87.0 with
# min-max ranges, 91.4 with these; percentile 93.7 at 2.7x the calibration time
MEAN_MINMAX_LABEL = "mean of per-sample min-max ranges (NNCF's default estimator)"  # the search's candidate


class Histograms:
    """Per-tensor histograms of activation values over a fixed range each, fed batch by batch; ``ranges()`` the
    calibrated [lo, hi] each, by onnxruntime's percentile/entropy search (``mean_minmax``: the mean of the batches'
    min and max; each ``add`` is one sample).

    ``bounds``: per tensor, a bound on ``|x|`` known before the pass (the min-max range already calibrated). Fixed
    bins, not onnxruntime's ``collect``: that one re-bins at the first batch's bin width whenever a later batch holds
    a wider value, so one spike 40x the first batch's maximum turned 512 bins into ~20,000 and the KL search over
    them took minutes for one tensor."""

    def __init__(self, method: str, bounds: dict, percentile: float = 99.999):
        from onnxruntime.quantization.calibrate import HistogramCollector

        if method not in METHODS:
            raise ValueError(f"histogram calibration method {method!r}: one of {', '.join(METHODS)}")
        self.method = method
        self._bins = PERCENTILE_BINS if method == "percentile" else ENTROPY_BINS
        self._means: dict = {}  # mean_minmax: tensor -> [sum of the mins, sum of the maxes, samples]
        self._collector = None if method == "mean_minmax" else HistogramCollector(
            method=method, symmetric=False, num_bins=self._bins, num_quantized_bins=ENTROPY_QUANTIZED_BINS,
            percentile=float(percentile), scenario="same")
        self._bounds = {k: float(b) for k, b in bounds.items() if np.isfinite(b) and b > 0}
        self._counts: dict = {}
        self._lo: dict = {}
        self._hi: dict = {}

    def add(self, values: dict) -> None:
        """``values``: tensor -> this batch's values (any shape); tensors without a bound are skipped."""
        for k, v in values.items():
            t = self._bounds.get(k)
            v = np.asarray(v, np.float32).ravel()
            if t is None or not v.size:
                continue
            if self._collector is None:
                lo, hi = float(v.min()), float(v.max())
                if not np.isfinite([lo, hi]).all():  # onnxruntime reduces an empty tensor to (+inf, -inf): no sample
                    continue
                m = self._means.setdefault(k, [0.0, 0.0, 0])
                m[0], m[1], m[2] = m[0] + lo, m[1] + hi, m[2] + 1
                continue
            counts, _ = np.histogram(np.clip(v, -t, t), self._bins, range=(-t, t))
            self._counts[k] = self._counts.get(k, 0) + counts
            self._lo[k] = min(self._lo.get(k, np.inf), float(v.min()))
            self._hi[k] = max(self._hi.get(k, -np.inf), float(v.max()))

    def ranges(self) -> dict:
        """tensor -> (lo, hi) for every tensor that got values, never wider than the values seen (a symmetric
        threshold on a ReLU output keeps its lower end at the smallest value, not at ``-threshold``)."""
        if self._collector is None:
            return {k: (lo / n, hi / n) for k, (lo, hi, n) in self._means.items()}
        if not self._counts:
            return {}
        self._collector.histogram_dict = {
            k: (c, np.linspace(-self._bounds[k], self._bounds[k], self._bins + 1, dtype=np.float32),
                np.float32(self._lo[k]), np.float32(self._hi[k]), np.float32(self._bounds[k]))
            for k, c in self._counts.items()}
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints its progress
            found = self._collector.compute_collection_result()
        return {k: (max(float(v[0]), self._lo[k]), min(float(v[1]), self._hi[k])) for k, v in found.items()}
