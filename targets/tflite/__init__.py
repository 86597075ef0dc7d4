"""The TFLite backend (LiteRT) as a sub-package. This file is its descriptor (what the pipeline reads without
importing TensorFlow); the rest: ``backend`` (the Backend and its Runner), ``source`` (the ONNX graph the child
takes: trimmed, equalized, smoothed or AdaRounded as the settings ask), the converter child (``convert``:
onnx2tf via ``onnx2tf_run`` after the ONNX graph rewrites in ``rewrite/``, mixed precision in ``mixed``, sibling
artifacts in ``family``, XNNPACK coverage in ``xnnpack``), the model's ports (``port``), pass-through outputs
(``passthrough``), weight counts (``weights``), edgebuild's metadata in the file (``metadata``) and TensorFlow Lite
Micro's fit (``tflm``)."""
from edgebuild.targets.base import BackendInfo, register
from edgebuild.targets.settings import Precision, TFLiteSettings

INFO = register(BackendInfo(
    name="tflite", backend="edgebuild.targets.tflite.backend:TFLiteBackend",
    precisions=(Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.INT8), settings_type=TFLiteSettings,
    extra="tflite", requires=("onnx2tf", "tensorflow", "tf_keras", "onnx_graphsurgeon", "onnxruntime", "ai_edge_litert"),
    optional=("sng4onnx", "flatbuffers", "tflite_micro"),  # onnx2tf's helper, the metadata writer, TFLM (micro: true)
    runtime_modules=("ai_edge_litert.interpreter",),  # what its runner imports (pipeline/memory.py baseline)
    device_runtimes=("ai_edge_litert", "tflite_runtime", "tensorflow"),  # a board's LiteRT, preferred first
    suffixes=(".tflite",), metadata="tflite metadata 'edgebuild'",
    versions=("tensorflow", "onnx2tf", "ai-edge-litert", "tf-keras", "onnx-graphsurgeon", "onnx", "onnxruntime", "numpy"),
    isolate_runner=True, micro=True, peak_memory=(900 << 20, 18.0), cell_memory_mb=3000,
    # 7: a transformer keeps LayerNorm, Softmax, GELU, attention products, outliers float; 8: a detector's
    # post-processing tail float; 9: the video rewrites (frame pools, dilated 3-D convs, flat scatter-add); 10: percentile/entropy calibration; 11: no statistics on the float tail; 12: every range measured in LiteRT (TF logs one
    # sample), 3-D convs as per-frame 2-D convs; 13: an int8 DIV by a computed divisor kept float;
    # 14: recurrent source graphs keep TF's whole calibration; 15: a signal-processing front-end float (float_frontend);
    # 16: dynamic-range INT8 as a search candidate for recurrent graphs (activations: dynamic, smoothed inputs);
    # 17, 18: lstm_fused (FP32/FP16 LSTM as UNIDIRECTIONAL_SEQUENCE_LSTM), device_requires.reset_variables_per_sequence
    cache_version=18))
