"""OpenVINO backend: IR (``.xml`` + ``.bin``) for the OpenVINO CPU plugin, in FP32, FP16 or INT8.

The IR is converted from the pipeline's FP32 ONNX with ``openvino.convert_model``, not from the torch
module. Measured: both routes give the same operations (demo: 30; MobileNetV2: 261, same compiled graph),
but from ONNX conversion takes 0.02 s (demo) / 0.1 s (MobileNetV2) against 1.8 s / 20 s of tracing torch,
keeps the input/output names (torch gives ``x`` and an unnamed output) and the static batch-1 shape, works
for ONNX sources too, and starts from the graph every backend gets, already checked against torch.

* FP32: ``save_model(compress_to_fp16=False)``.  FP16: the same graph with FP16-compressed weights
  (``compress_to_fp16=True``; the CPU plugin decompresses them and computes at its default precision).
* INT8: ``nncf.quantize`` (post-training quantization) fed by the SampleSet: FakeQuantize on
  activations and int8 per-channel weights, then ``save_model(compress_to_fp16=False)`` so that layers
  kept out of quantization (``ignored_scope``) stay FP32.

Neither OpenVINO nor NNCF may send usage telemetry (by default ``import openvino`` and every
``convert_model`` send events to Google Analytics from forked processes unless the user ran
``opt_in_out --opt_out``): ``import_without_telemetry`` switches it off before either is imported.
"""
from __future__ import annotations

import importlib
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.errors import BadInputError, ConversionError, EdgeBuildError, MissingToolError
from edgebuild.procs import tempdir
from edgebuild.targets.base import Artifact, Backend, BackendInfo, ExportedModel, Runner, register, replace_file, stem
from edgebuild.targets.onnx.equalize import equalization_candidate
from edgebuild.targets.openvino_nncf import import_without_telemetry, onnx_outputs, quantize
from edgebuild.targets.profiles import TargetProfile
from edgebuild.targets.settings import OpenVinoSettings, Precision, Settings

PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)
# nncf.quantize options (OpenVinoSettings), overridden per profile (targets/profiles/*.yaml `quant:`) and by the
# accuracy search. preset performance: symmetric int8 activations and weights, the CPU plugin's fastest kernels;
# model_type transformer: NNCF's attention scheme (keeps sensitive ops in float); overflow_fix: 7-bit weights where
# AVX2/AVX-512 int8 kernels (no VNNI) can saturate; subset_size None: every calibration sample the build chose
# (calibration/budget.py); ignored_scope: layers kept in float (ONNX or OpenVINO terms).
INT8_DEFAULTS = OpenVinoSettings().to_dict()
META_PREFIX = "edgebuild."  # the keys of edgebuild's metadata (pipeline/stages/embed.py fields)
APPLIED = "applied"  # record key: what the conversion resolved (OpenVinoSettings ignores it when fed back)


INFO = register(BackendInfo(
    name="openvino", backend=f"{__name__}:OpenVinoBackend", precisions=PRECISIONS, settings_type=OpenVinoSettings,
    extra="openvino", requires=("openvino",), optional=("nncf",),  # nncf for INT8 (checked when INT8 is built)
    device_runtimes=("openvino",), suffixes=(".xml",), metadata="openvino rt_info",
    versions=("openvino", "nncf", "onnx", "numpy"),
    cache_version=3,  # 2: an LSTM named as a float layer is found behind its Reshape; the float operations' weights int8;
    # 3: a shared weight constant int8 for all its readers
    # OpenVINO is native code: the runtime runs in a spawned process so that a crash fails the target, not
    # the build. Measured on the demo (2-core host): 0.4-0.6 s more to open a runner, evaluation of 797
    # samples unchanged within noise (0.35 s), latency unchanged (it is timed inside that process).
    isolate_runner=True, peak_memory=(300 << 20, 8.0), cell_memory_mb=1500))


class OpenVinoBackend(Backend):
    supports_float_layers = True

    def artifact_name(self, precision: str, settings: dict | None = None) -> str:
        if precision not in PRECISIONS:
            raise BadInputError(f"the openvino backend builds {', '.join(PRECISIONS)}, not {precision}")
        return stem(precision, {"float_layers": _float_requested(settings or {})}) + ".xml"

    def graph_candidates(self, profile: TargetProfile, settings: Settings | dict, onnx_path: Path) -> list[tuple[str, Settings]]:
        """Activation equalization where the graph has conv -> activation -> depthwise conv chains."""
        return equalization_candidate(self.requested_settings(profile, settings), onnx_path)

    def recovery_candidates(self, profile: TargetProfile, settings: Settings | dict) -> list[tuple[str, Settings]]:
        """NNCF variants, free ones first: 7-bit weights everywhere (int8 saturation on CPUs without VNNI)
        and full bias correction cost no speed; asymmetric activations do (MobileNetV2 on an AVX2 host:
        INT8 1.44x faster than FP32 with the performance preset, 1.11x with mixed)."""
        s, out = self.requested_settings(profile, settings), []
        from edgebuild.targets.isa import resolve

        fix, isa = resolve("overflow_fix", s.overflow_fix)
        seven_bit = [] if fix == "enable" else [("7-bit weights in every layer (overflow_fix=enable)",
                                                 s.replace(overflow_fix="enable"))]
        if not (isa or {}).get("vnni"):  # without VNNI 7-bit weights avoid int8 saturation: free, likeliest first
            out += seven_bit
        if s.fast_bias_correction:
            out.append(("full bias correction", s.replace(fast_bias_correction=False)))
        if s.preset != "mixed":
            # a CTC recogniser: 99 % of strings equal to FP32 with preset mixed where performance missed (cosine 0.9857)
            out.append(("asymmetric activations (preset=mixed)", s.replace(preset="mixed")))
            if s.fast_bias_correction:
                out.append(("preset=mixed with full bias correction", s.replace(preset="mixed", fast_bias_correction=False)))
        if s.model_type != "transformer":
            # NNCF's transformer scheme (SmoothQuant, sensitive ops kept float) also helps graphs with attention-like
            # MatMuls that the pattern did not find (SVTR necks, conformer blocks)
            out.append(("NNCF model_type=transformer (SmoothQuant)", s.replace(model_type="transformer")))
        if s.activation_ranges == "default":
            # ranges that clip each sample's 1e-4 tails: a text-orientation classifier's held-out INT8 went from 1.4 pt
            # below FP32 to 1.6 above; a detector's box head collapses with them (f1 27): after the free variants
            out.append(("activation ranges from 1e-4 quantiles (NNCF mean_quantile)",
                        s.replace(activation_ranges="mean_quantile")))
        if (isa or {}).get("vnni"):  # with VNNI nothing saturates: 7-bit weights only cost precision (ocr-cls: 3.4 pt
            out += seven_bit  # disagreement with full-range weights, 7.5 with 7-bit), so they come last
        return out

    def convert(self, model: ExportedModel, profile: TargetProfile, precision: str, calib: SampleSet,
                workdir: Path, settings: Settings | dict | None = None) -> Artifact:
        self.check_available(profile.name)
        settings = self.requested_settings(profile, settings).for_precision(precision)  # the record: a new dict
        xml = workdir / self.artifact_name(precision, settings)
        if precision == "int8":
            if importlib.util.find_spec("nncf") is None:
                raise MissingToolError(profile.name, "nncf")
            if settings["model_type"] == "auto":  # resolved in the record; what was asked stays "auto"
                from edgebuild.targets.regions import is_transformer

                settings["model_type"] = "transformer" if is_transformer(model.onnx_path) else None
            if calib is None or len(calib) == 0:
                raise BadInputError(f"{profile.name}: INT8 needs calibration samples (--calib)")
        from edgebuild.targets.isolated import run_with_samples

        # OpenVINO and NNCF are native code: converted in a child process (a crash fails this target, not the build)
        job = {"onnx": str(model.onnx_path), "xml": str(xml), "precision": precision, "settings": settings,
               "target": profile.name}
        settings, applied, notes = run_with_samples(_convert_job, job, calib if precision == "int8" else None,
                                                    what=f"{profile.name}: OpenVINO {precision} conversion failed",
                                                    name="convert:openvino")
        applied.update(compile_config=compile_config(precision))
        io_ = {"inputs": [t.to_dict() for t in model.inputs], "outputs": [t.to_dict() for t in model.outputs]}
        files = [xml.name, xml.with_suffix(".bin").name]
        return Artifact(profile.name, self.name, precision, workdir, xml.name, files, {**settings, APPLIED: applied},
                        io_, notes)

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        return OpenVinoRunner(artifact.path, artifact.precision, threads)

    def embed_metadata(self, path: Path, meta: dict[str, str]) -> str | None:
        """``<rt_info><edgebuild>`` in the IR's XML (the .bin is untouched)."""
        if path.suffix.lower() != ".xml" or not path.with_suffix(".bin").is_file():
            return None
        import xml.etree.ElementTree as ET

        tree = ET.parse(path)
        net = tree.getroot()
        rt = net.find("rt_info")
        if rt is None:
            rt = ET.SubElement(net, "rt_info")
        old = rt.find("edgebuild")
        if old is not None:
            rt.remove(old)
        node = ET.SubElement(rt, "edgebuild")
        for k, v in meta.items():
            ET.SubElement(node, k[len(META_PREFIX):] if k.startswith(META_PREFIX) else k, value=v)
        replace_file(path, ET.tostring(net, encoding="utf-8", xml_declaration=True))
        return self.info.metadata

    def weight_counts(self, path: Path) -> list | None:
        from edgebuild.targets.openvino_weights import weight_counts

        return weight_counts(path) if path.suffix.lower() == ".xml" else None

    def read_metadata(self, path: Path) -> dict[str, str]:
        if path.suffix.lower() != ".xml":
            return {}
        import xml.etree.ElementTree as ET

        node = ET.parse(path).getroot().find("rt_info/edgebuild")
        return {} if node is None else {META_PREFIX + c.tag: c.get("value", "") for c in node}


def _convert_job(job: dict) -> tuple[dict, dict, list[str]]:
    """In the converter child (targets/isolated.py): ONNX -> IR, NNCF for INT8, saved. Returns the settings, what
    was applied and the notes."""
    from edgebuild.targets.isolated import samples_from_disk, set_phase

    precision, settings, target = job["precision"], job["settings"], job["target"]
    ov = import_without_telemetry("openvino")
    notes: list[str] = []
    scratch = tempfile.TemporaryDirectory(prefix="edgebuild-openvino-", dir=tempdir())
    try:
        source = job["onnx"]
        if precision == "int8" and settings.get("equalize"):  # per-channel rescale first (targets/onnx/equalize.py)
            from edgebuild.targets.onnx.equalize import equalized_source

            set_phase("activation equalization")
            equalized, note = equalized_source(source, samples_from_disk(job["samples"]), Path(scratch.name))
            source, notes = str(equalized), [note]
        set_phase("openvino.convert_model")
        ov_model = ov.convert_model(source)
        if precision == "int8":
            converted = {op.get_friendly_name() for op in ov_model.get_ops()}
            set_phase("nncf.quantize")
            ov_model, applied, quantized = quantize(ov_model, samples_from_disk(job["samples"]), settings, target,
                                                     onnx_outputs(source), source)
            notes += quantized
            if settings.get("weight_only", False):  # the float operations' weights int8 where it costs nothing
                from edgebuild.targets.openvino_weight_only import int8_weights

                set_phase("weight-only INT8 of the float operations")
                notes += int8_weights(ov, ov_model, samples_from_disk(job["samples"]), compile_config("fp32"), source,
                                      settings.get("weight_only_loss_db", 1.0))
            stable_names(ov_model, converted)
        else:
            settings, applied = {"compress_to_fp16": precision == "fp16"}, {}
        set_phase("openvino.save_model")
        # INT8: float constants stay FP32, so layers kept out of quantization really are FP32
        ov.save_model(ov_model, job["xml"], compress_to_fp16=precision == "fp16")
        if precision == "int8" and settings.get("weight_only", False):
            from edgebuild.targets.openvino_weight_only import mark_decompression

            mark_decompression(Path(job["xml"]))
    except EdgeBuildError:
        raise
    except Exception as e:  # OpenVINO and NNCF raise many types; they are conversion failures of this target
        raise ConversionError(f"{target}: OpenVINO {precision} conversion failed: {_one_line(e)}") from e
    finally:
        scratch.cleanup()
    applied["converter"] = f"openvino.convert_model(ONNX) {ov.get_version().split('-')[0]}"
    return settings, applied, notes


def stable_names(ov_model, kept: set[str]) -> None:
    """Name the operations NNCF added under generated names (``Constant_37534``: a counter global to the converting
    process, whose value varies from run to run) ``<type>_<k>`` in graph order, so that one conversion always writes
    the same .xml (issue 24: a batch cell and the same build alone). Names in ``kept`` (the converted model's) stay."""
    used = {op.get_friendly_name() for op in ov_model.get_ops()}
    k = 0
    for op in ov_model.get_ordered_ops():
        name, kind = op.get_friendly_name(), op.get_type_name()
        if name in kept or not (name.startswith(kind + "_") and name[len(kind) + 1:].isdigit()):
            continue
        k += 1
        while f"{kind}_{k}" in used:
            k += 1
        used.discard(name)
        op.set_friendly_name(f"{kind}_{k}")
        used.add(f"{kind}_{k}")


def compile_config(precision: str, threads: int | None = None) -> dict:
    """CPU plugin properties for the runner (and for the device: they are written into metadata.json).

    Every artifact pins the inference precision to f32: on CPUs with AVX512-BF16 or AMX the plugin's default is
    bf16 (an 8-bit mantissa) for every float op — the FP32 baseline would not be FP32, an FP16 IR would compute in
    bf16 (why OpenVINO FP16 scored cosine 0.9891/0.9731 on two OCR models where ONNX Runtime and TFLite FP16 scored
    >= 0.9987), and an INT8 IR's float layers and glue would add bf16 rounding to the int8 error. The FP16 IR keeps
    FP16 weights (half the size); bf16 execution is a precision of its own, not what a file named _fp16 promises.
    """
    config: dict = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVinoRunner(Runner):
    """OpenVINO runtime on the CPU device: one compiled model, one infer request, latency hint."""

    def __init__(self, path: Path, precision: str, threads: int, perf_count: bool = False):
        ov = import_without_telemetry("openvino")
        config = compile_config(precision, threads) | ({"PERF_COUNT": True} if perf_count else {})
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as e:
            raise ConversionError(f"OpenVINO cannot load {path.name}: {_one_line(e)}") from e
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)

    def close(self) -> None:
        """Release the compiled model now, then repair the thread's alternate signal stack: the CPU plugin leaves it
        pointing at freed memory when compiled models go in the order they were made (``procs.safe_signal_stack``:
        the next SIGTERM or Ctrl-C of an in-process caller would be a SIGSEGV)."""
        from edgebuild.procs import safe_signal_stack

        self.request = self.compiled = self.outputs = None
        safe_signal_stack()

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in feed.items()})  # 0-d stays 0-d
        return [np.array(result[o], dtype=np.float32) for o in self.outputs]

    def threads_used(self) -> int | None:
        try:
            return int(self.property("INFERENCE_NUM_THREADS"))
        except Exception:  # a plugin without the property: unknown, not a failure
            return None

    def property(self, name: str):
        """A property of the compiled model, e.g. INFERENCE_NUM_THREADS (what the plugin really uses)."""
        return self.compiled.get_property(name)

    def layer_times(self, feed: dict[str, np.ndarray], runs: int = 20) -> list[dict]:
        """Mean time per (operation type, kernel) over ``runs`` inferences, slowest first (needs perf_count).

        The kernel name says the precision a layer really ran in (``jit_avx2_1x1_I8`` vs ``brgconv_avx2_1x1_f32``).
        """
        totals: dict[tuple[str, str], list[float]] = {}
        for _ in range(runs):
            self.run(feed)
            for p in self.request.profiling_info:
                if p.status == p.Status.EXECUTED:
                    t = totals.setdefault((p.node_type, p.exec_type), [0.0, 0])
                    t[0] += p.real_time.total_seconds() * 1e6 / runs
                    t[1] += 1
        rows = [{"type": k[0], "kernel": k[1], "us": v[0], "count": v[1] // runs} for k, v in totals.items()]
        return sorted(rows, key=lambda r: -r["us"])


# ---- INT8 ---------------------------------------------------------------------------------------------


def _int8_settings(s: dict, target: str) -> dict:
    """The INT8 settings ``s`` (a profile's, or an artifact's record fed back) checked and normalized, as a dict."""
    return OpenVinoSettings.from_profile(s, target).to_dict()


def _float_requested(s: Settings | dict) -> bool:
    s = s.to_dict() if isinstance(s, Settings) else s
    scope = s.get("ignored_scope") or {}
    return bool(s.get("float_layers")) or any(scope.get(k) for k in ("names", "types", "patterns"))


def _one_line(e: Exception) -> str:
    """OpenVINO errors start with where in its C++ sources a check failed; keep what the user can act on."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_SOURCE_LOCATION)] or lines
    return f"{type(e).__name__}: {' '.join(useful)}"[:300]


_SOURCE_LOCATION = ("Check '", "Exception from src/", "FrontEnd API failed with", "[ GENERAL_ERROR ]")
