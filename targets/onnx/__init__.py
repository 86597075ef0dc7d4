"""ONNX backend: FP32, FP16 (float32 I/O), dynamic INT8 and static INT8 (QDQ) via onnxruntime.quantization.

The backend descriptor and class are here; the recipes and the graph preparation are modules of this package:
``prepare`` (pre-processing, constant folding, state path), ``static`` (QDQ), ``dynamic`` (quantize_dynamic),
``quantize`` (the converter child), ``fake_quant`` (sensitivity/proxy), ``runner`` (ONNX Runtime CPU)."""
from __future__ import annotations

import shutil
from pathlib import Path

from edgebuild.calibration.dataset import SampleSet
from edgebuild.calibration.histogram import MEAN_MINMAX_LABEL
from edgebuild.errors import ConversionError
from edgebuild.targets.base import Artifact, Backend, BackendInfo, ExportedModel, Runner, register, replace_file, stem
from edgebuild.targets.onnx.dynamic import DYNAMIC_OPS, DYNAMIC_SHARE, dynamic_share
from edgebuild.targets.onnx.equalize import equalization_candidate
from edgebuild.targets.onnx.fake_quant import FakeQuant
from edgebuild.targets.onnx.prepare import fold_constant_weights, preprocess, state_path
from edgebuild.targets.onnx.quantize import quantize_isolated
from edgebuild.targets.onnx.runner import OrtRunner, one_line
from edgebuild.targets.onnx.static import (
    WEIGHTED_OPS, histogram_samples, quantize_qdq, quantize_static, resolve_op_types)
from edgebuild.targets.profiles import TargetProfile
from edgebuild.targets.regions import is_transformer
from edgebuild.targets.settings import OnnxSettings, Precision, Settings

# the package's public names, importable from ``edgebuild.targets.onnx`` as when it was one module
__all__ = ["INFO", "INT8_DEFAULTS", "OnnxBackend", "OrtRunner", "FakeQuant", "OnnxSettings", "WEIGHTED_OPS",
           "DYNAMIC_OPS", "DYNAMIC_SHARE", "dynamic_share", "fold_constant_weights", "preprocess", "state_path",
           "histogram_samples", "quantize_qdq", "quantize_static", "resolve_op_types", "is_transformer",
           "embed_onnx_metadata", "read_onnx_metadata"]


# onnxruntime's defaults (OnnxSettings), overridden per profile (targets/profiles/*.yaml `quant:`) and by the
# accuracy search; op_types "auto": static.py resolve_op_types
INT8_DEFAULTS = OnnxSettings().to_dict()


INFO = register(BackendInfo(
    name="onnx", backend=f"{__name__}:OnnxBackend", precisions=tuple(Precision), settings_type=OnnxSettings,
    # 2: constant weights folded before quantizing, recurrent state path float, dynamic INT8; 3: the fake-quant
    # quantizes LSTMs (the sensitivity ranks them); 4: percentile/entropy over fixed-bin histograms bounded by min-max;
    # 5: the float layers' weights int8 (weight-only, targets/onnx/weight_only.py); 6: HardSigmoid/HardSwish gates in
    # int8 (targets/onnx/hard_gates.py), what onnxruntime runs in int8 and in float in the notes (coverage.py)
    cache_version=6,
    extra="onnx", requires=("onnx", "onnxruntime"), device_runtimes=("onnxruntime",), suffixes=(".onnx",),
    metadata="onnx metadata_props", versions=("onnx", "onnxruntime", "numpy"),
    peak_memory=(245 << 20, 5.0), cell_memory_mb=1000))


class OnnxBackend(Backend):
    simulate_quantization = False  # run QDQ graphs unfused on the host (see tensorrt backend)
    supports_float_layers = True

    def artifact_name(self, precision: str, settings: dict | None = None) -> str:
        if precision == "int8" and (settings or {}).get("activations") == "dynamic":
            return stem(precision, settings) + "_dynamic.onnx"  # MatMulInteger/DynamicQuantizeLSTM, not QDQ
        return stem(precision, settings) + ("_qdq.onnx" if precision == "int8" else ".onnx")

    def graph_candidates(self, profile: TargetProfile, settings: Settings | dict, onnx_path: Path) -> list[tuple[str, Settings]]:
        """INT8 candidates of another kind than the profile's, chosen from the graph: dynamic INT8 when MatMul/Gemm,
        LSTM and embedding tables hold most of the weights (transformers, recurrent models); static QDQ with the
        recurrent state path float when the model carries its state in and out; static QDQ of the graph with its
        conv -> activation -> depthwise conv chains equalized (any profile: it keeps every op int8). Likeliest first."""
        s = self.requested_settings(profile, settings)
        if s.activations == "dynamic":
            return []
        equalized = equalization_candidate(s, onnx_path)
        if self.simulate_quantization or not profile.allow_float_layers:
            return equalized  # TensorRT builds from QDQ only; an integer-only profile runs no float op between int8 layers
        share = dynamic_share(onnx_path)
        dynamic = [(f"dynamic INT8 (MatMul/Gemm, LSTM and embedding weights int8 = {share:.0%} of the weights; "
                    "activations quantized per call)", s.replace(activations="dynamic"))] if share >= DYNAMIC_SHARE else []
        return dynamic + equalized

    def recovery_candidates(self, profile: TargetProfile, settings: Settings | dict) -> list[tuple[str, Settings]]:
        s = self.requested_settings(profile, settings)
        # NNCF's default ranges first: a plain try's cost (one pass, no histogram: calibration/histogram.py) that keeps
        # every op int8. PicoDet's layout detector, equalized, on a 2-core AVX-512 VNNI host: f1 91.4 and 1.7-1.8x
        # FP32's speed, where weighted layers only passed at 90.1 and ran 0.9-1.1x (its float HardSwish between Q/DQ)
        out = [(MEAN_MINMAX_LABEL, s.replace(calibrate_method="mean_minmax"))] if s.calibrate_method == "minmax" else []
        out += [] if s.op_types == "weighted" else [
            # elementwise ops (HardSwish's Add/Clip/Mul, SE gates, residual Adds) in float between int8 layers:
            # PP-OCRv4's DB detector, worst cosine of 8 pages 0.93 with every op quantized, 0.975 this way
            ("weighted layers only (Conv/Gemm/MatMul; elementwise ops in float)", s.replace(op_types="weighted"))]
        out += [("percentile calibration (99.999)", s.replace(calibrate_method="percentile")),
                ("entropy calibration", s.replace(calibrate_method="entropy")),
                ("per-tensor weights" if s.per_channel else "per-channel weights", s.replace(per_channel=not s.per_channel))]
        if not s.symmetric_activations:  # x86 without VNNI: 7-bit weights or unsigned weights
            from edgebuild.targets.isa import resolve

            reduced = resolve("reduce_range", s.reduce_range)[0]
            out.append(("full-range weights (no reduce_range)", s.replace(reduce_range=False)) if reduced else
                       ("7-bit weights (reduce_range)", s.replace(reduce_range=True)))
            out.append(("U8U8 (unsigned weights)", s.replace(weight_type="uint8", symmetric_weights=False)))
        if s.weight_type == "int8" and s.symmetric_weights and s.rounding == "nearest":  # the costliest: last
            from edgebuild.targets.onnx_adaround import candidate_label

            out.append((candidate_label(), s.replace(rounding="adaround")))
        return out

    def on_best_variant(self, candidate: Settings, best: Settings) -> Settings | None:
        """AdaRound refines the static INT8 variant that came closest (its calibration, granularity, op types)."""
        if getattr(candidate, "rounding", "nearest") != "adaround" or candidate.float_layers or best.rounding != "nearest" \
                or best.activations != "static" or best.weight_type != "int8" or not best.symmetric_weights:
            return None
        return best.replace(rounding="adaround")

    def extra_seconds(self, settings: Settings | dict, onnx_path: Path) -> float:
        """What a candidate costs beyond a plain INT8 try (the search skips it when that does not fit)."""
        from edgebuild.targets.onnx_adaround import extra_seconds

        return extra_seconds(settings, onnx_path)

    def convert(self, model: ExportedModel, profile: TargetProfile, precision: str, calib: SampleSet,
                workdir: Path, settings: dict | None = None) -> Artifact:
        self.check_available(profile.name)
        settings = self.requested_settings(profile, settings).for_precision(precision)  # the record: a new dict
        if precision == "int8":
            from edgebuild.targets.isa import resolve

            settings["reduce_range"], isa = resolve("reduce_range", settings["reduce_range"])
            if isa:
                settings["isa"] = isa
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / self.artifact_name(precision, settings)
        notes: list[str] = []
        try:
            if precision == "fp32":
                shutil.copyfile(model.onnx_path, out)
            elif precision == "fp16":
                _to_fp16(model.onnx_path, out)
            elif precision in ("dynamic", "int8"):  # onnxruntime's native quantization: in a converter child
                notes = quantize_isolated(model.onnx_path, out, calib, settings, workdir, precision, profile.name,
                                          self.calibration_store, runtime_counts=not self.simulate_quantization)
            else:
                raise ConversionError(f"{profile.name}: onnx backend cannot build precision {precision}")
        except ConversionError:
            raise
        except Exception as e:  # onnxruntime raises many types; they are conversion failures of this target
            raise ConversionError(f"{profile.name}: ONNX {precision} conversion failed: {one_line(e)}") from e
        io = {"inputs": [t.to_dict() for t in model.inputs], "outputs": [t.to_dict() for t in model.outputs]}
        return Artifact(profile.name, self.name, precision, workdir, out.name, [out.name], settings, io, notes)

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        return OrtRunner(artifact.path, threads, simulate=self.simulate_quantization and artifact.precision == "int8")

    def source_runner(self, onnx_path: Path, threads: int) -> Runner:
        return OrtRunner(Path(onnx_path), threads)

    def fake_quant(self, onnx_path: Path, calib: SampleSet, workdir: Path, equalize: bool = False) -> "FakeQuant":
        if equalize:  # as a base with ``equalize`` quantizes the graph (targets/onnx/equalize.py; node names kept)
            from edgebuild.targets.onnx.equalize import equalized_source

            onnx_path, _ = equalized_source(onnx_path, calib, workdir)
        return FakeQuant(onnx_path, calib, workdir)

    def embed_metadata(self, path: Path, meta: dict[str, str]) -> str | None:
        if path.suffix.lower() != ".onnx":
            return None
        embed_onnx_metadata(path, meta)
        return self.info.metadata

    def read_metadata(self, path: Path) -> dict[str, str]:
        return read_onnx_metadata(path) if path.suffix.lower() == ".onnx" else {}

    def weight_counts(self, path: Path) -> list | None:
        return None  # ONNX files are read by pipeline/stages/weights.py itself (the pipeline's interchange format)


def _to_fp16(src: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(out))


META_PREFIX = "edgebuild."  # the keys of edgebuild's metadata (pipeline/stages/embed.py fields)


def embed_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    """``meta`` into the model's ``metadata_props`` (external tensors stay where they are), as a new file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    replace_file(path, model.SerializeToString())


def read_onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props if p.key.startswith(META_PREFIX)}
