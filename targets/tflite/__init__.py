"""The TFLite backend (LiteRT) as a sub-package: ``backend`` (the Backend and its Runner), the converter child
(``convert``: onnx2tf via ``onnx2tf_run``, mixed precision in ``mixed``, sibling artifacts in ``family``,
XNNPACK coverage in ``xnnpack``), pass-through outputs (``passthrough``), weight counts (``weights``) and
TensorFlow Lite Micro's fit (``tflm``)."""
from edgebuild.targets.tflite.backend import TFLiteBackend, TFLiteRunner  # noqa: F401 — registers "tflite"
