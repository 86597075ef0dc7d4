"""Feed a SampleSet to each backend's calibrator. Backend libraries are imported lazily."""
from __future__ import annotations

from edgebuild.calibration.dataset import SampleSet


def ort_reader(calib: SampleSet):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over the samples (re-windable)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = calib.feeds()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = calib.feeds()

        def __len__(self):
            return len(calib)

    return _Reader()


def nncf_dataset(calib: SampleSet, transform=None):
    """An ``nncf.Dataset`` of feeds (dicts input name -> array), optionally transformed per backend. The set itself
    is the source (sized, and each pass iterates it afresh): feeds are made one at a time, never all copied."""
    import nncf

    return nncf.Dataset(calib, transform)
