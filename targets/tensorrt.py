"""TensorRT backend: explicit-quantization ONNX (symmetric S8S8 QDQ) + a trtexec script for the device.

The engine is device-specific, so it is built on the device by ``build_engine.sh``; when the ``tensorrt``
Python package and a CUDA GPU are present on the build machine, the engine is built here as well.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from edgebuild.calibration.dataset import SampleSet
from edgebuild.targets.base import Artifact, BackendInfo, ExportedModel, register
from edgebuild.targets.onnx import OnnxBackend
from edgebuild.targets.profiles import TargetProfile
from edgebuild.targets.settings import Precision, TensorRTSettings

# int8: QDQ decides; fp16 for the rest
TRTEXEC_FLAGS = {Precision.INT8: "--int8 --fp16", Precision.FP16: "--fp16", Precision.FP32: ""}


INFO = register(BackendInfo(
    name="tensorrt", backend=f"{__name__}:TensorRTBackend",
    precisions=tuple(TRTEXEC_FLAGS),  # explicit-quantization INT8, FP16, FP32 engines; no weight-only INT8
    settings_type=TensorRTSettings,  # the onnx backend's QDQ options
    extra="onnx", requires=("onnx", "onnxruntime"), suffixes=(".onnx",), metadata="onnx metadata_props",
    versions=("onnx", "onnxruntime", "numpy", "tensorrt"), cache_version=3))  # follows the onnx backend's quantization (its cache_version 4)


class TensorRTBackend(OnnxBackend):
    simulate_quantization = True

    def convert(self, model: ExportedModel, profile: TargetProfile, precision: str, calib: SampleSet,
                workdir: Path, settings: dict | None = None) -> Artifact:
        art = super().convert(model, profile, precision, calib, workdir, settings)
        script = workdir / "build_engine.sh"
        script.write_text(_script(art.main, precision))
        script.chmod(0o755)
        art.files.append(script.name)
        art.notes.append(_maybe_build_engine(workdir / art.main, precision, workdir, art))
        return art


def _script(onnx_name: str, precision: str) -> str:
    engine = Path(onnx_name).stem + ".engine"
    return f"""#!/usr/bin/env bash
# Build the TensorRT engine on the target device (engines are specific to the GPU and TensorRT version).
# Run from this directory on the device: ./build_engine.sh [extra trtexec flags]
set -euo pipefail
TRTEXEC=${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}
"$TRTEXEC" --onnx={shlex.quote(onnx_name)} --saveEngine={shlex.quote(engine)} {TRTEXEC_FLAGS[precision]} "$@"
"""


def _maybe_build_engine(onnx_path: Path, precision: str, workdir: Path, art: Artifact) -> str:
    try:
        import tensorrt as trt
    except ImportError:
        return "engine not built here (no tensorrt Python package); run build_engine.sh on the device"
    try:
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            return f"engine not built here: TensorRT could not parse the ONNX ({errors[:200]})"
        config = builder.create_builder_config()
        if precision in (Precision.INT8, Precision.FP16):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            return "engine not built here: TensorRT build returned nothing (no GPU?)"
        name = onnx_path.stem + ".engine"
        (workdir / name).write_bytes(bytes(engine))
        art.files.append(name)
        return f"engine built here with TensorRT {trt.__version__} for this machine's GPU: {name}"
    except Exception as e:  # no GPU / driver on the build machine
        return f"engine not built here ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
