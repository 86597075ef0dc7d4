"""TFLite backend (LiteRT): FP32, FP16, dynamic-range INT8 and full-integer INT8 ``.tflite`` models.

Conversion: the exported FP32 ONNX -> onnx2tf (a TF graph, channels-last) -> TensorFlow's TFLiteConverter,
calibrated on the build's SampleSet for INT8, then checked: an ``_int8`` model whose ops are not all
integer is a ConversionError naming the ops left in float. It runs in a child process
(targets/tflite/convert.py) that cannot reach the network, so a converter crash (the TF calibrator
segfaults on some graphs) is a ConversionError naming the phase, and onnx2tf's files and logs stay in a
temp dir.

Mixed precision (``float_layers``, ONNX node names from the accuracy search): the TFLite ops built from those
nodes stay float and everything else int8 (``model_int8_mixed.tflite``; the check allows float only there).
A layer is float from its own input on: the tensor it reads is still int8 when the op producing it is int8,
so an outlier activation is only rescued when its producer stays float too (the search then adds it).

Chosen over litert-torch 0.10 (torch.export + PT2E) by measurement on the architectures of
tests/targets/test_tflite_coverage.py: both convert all of them with the same accuracy, but this path
gives full-integer models for all (PT2E left float ops in the MobileNetV2 block, the LSTM and attention),
converts ONNX sources too (litert-torch needs the torch module), and took 1-2.5 s per conversion after
start-up against 2-8 s (15 s for the demo's INT8 calibration).

Runtime: ai_edge_litert's Interpreter (XNNPACK, ``threads`` threads) behind a Runner that takes and returns
tensors in the source model's layout and dtype: it transposes NCHW <-> NHWC and (de)quantizes int8 I/O.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgebuild.calibration.budget import at_most
from edgebuild.calibration.dataset import SampleSet
from edgebuild.calibration.histogram import MEAN_MINMAX_LABEL
from edgebuild.errors import BadInputError, ConversionError
from edgebuild.procs import tempdir
from edgebuild.targets.tflite import passthrough
from edgebuild.targets.base import Artifact, Backend, ExportedModel, Runner, TensorInfo, stem
from edgebuild.targets.isolated import quiet_native_stderr
from edgebuild.targets.profiles import TargetProfile
from edgebuild.targets.settings import Precision, Settings, TFLiteSettings
from edgebuild.targets.tflite.convert import CHANNEL_LAST
from edgebuild.targets.tflite.family import run_child
from edgebuild.targets.tflite.family import sibling_dir, sibling_results
from edgebuild.targets.tflite.fused_lstm import STATEFUL_OPS
from edgebuild.targets.tflite.mixed import AUTO_FLOAT, FRONT_FLOAT, TAIL_FLOAT, TRANSFORMER_FLOAT
from edgebuild.targets.tflite.source import recurrent, source_graph
from edgebuild.targets.tflite.notes import artifact_notes, converter_version
from edgebuild.targets.tflite.port import Port
from edgebuild.targets.tflite.tflm import write_c_array

# Settings (TFLiteSettings; profile `quant:` keys override them) for every precision ...
DEFAULTS = TFLiteSettings().for_precision(Precision.FP32)
# ... and for full-integer INT8 only (calibration_samples None: every sample the build chose, calibration/budget.py)
INT8_DEFAULTS = {k: v for k, v in TFLiteSettings().to_dict().items() if k not in DEFAULTS}
FLOAT_CHECK_SAMPLES = 8  # samples sent to float conversions (onnx2tf's shape inference, the FP32 graph check)


class TFLiteBackend(Backend):
    """The descriptor (precisions, libraries, runtimes, versions) is ``edgebuild.targets.tflite.INFO``."""

    supports_float_layers = True
    # each variant (histogram calibration, AdaRound) is a whole onnx2tf + TF conversion (20-150 s on real models), and
    # on PP-OCR's text classifier and ddddocr's CTC recogniser both histogram methods missed by more than min-max
    # (2.4 -> 3.5 / 6.0 pt; 85.5 -> 82 / 81 % strings): mixed precision first, whose fake-quant proxy says cheaply
    # whether a few float layers can pass, then the variants with the time left
    mixed_before_variants = True

    def artifact_name(self, precision: str, settings: dict | None = None) -> str:
        if precision not in self.precisions:
            raise BadInputError(f"tflite backend cannot build precision {precision!r}")
        dynamic = precision == "int8" and (settings or {}).get("activations") == "dynamic"
        return stem(precision, settings) + ("_dynamic" if dynamic else "") + ".tflite"

    def graph_candidates(self, profile: TargetProfile, settings: Settings | dict, onnx_path: Path) -> list[tuple[str, Settings]]:
        """Dynamic-range INT8 for a recurrent graph (where the profile runs float ops): static INT8 calibrates one
        range per tensor for every time step, which a recurrence's inputs and states do not keep (Resemblyzer's
        LSTM: embedding cosine 0.53 static, 0.995 dynamic with its raw mel input smoothed). Then activation
        equalization where the graph has conv -> activation -> depthwise conv chains."""
        from edgebuild.targets.onnx.equalize import equalization_candidate

        s = self.requested_settings(profile, settings)
        dynamic = [("dynamic-range INT8 (LSTM/GRU/RNN and other weights int8; activations quantized per op and time "
                    "step; imbalanced recurrent inputs smoothed)", s.replace(activations="dynamic"))] \
            if s.activations == "static" and profile.allow_float_layers and recurrent(onnx_path) else []
        return dynamic + equalization_candidate(s, onnx_path)

    def recovery_candidates(self, profile: TargetProfile, settings: Settings | dict) -> list[tuple[str, Settings]]:
        """Histogram calibration of the activation ranges (percentile, entropy: the same as onnx-cpu's, measured in
        LiteRT, targets/tflite/ranges.py) before layers in float. TF's own calibrators are min-max only; weights are
        already per-channel, and the other quantizer did not help where INT8 collapses (the outlier model: 87.7 pt
        accuracy drop with the legacy quantizer, 89.3 pt with MLIR)."""
        from edgebuild.targets.onnx_adaround import candidate_label

        s = self.requested_settings(profile, settings)
        out = []
        if s.calibrate_method == "minmax" and s.quantizer != "legacy":  # histograms need the MLIR quantizer's hook
            out += [(MEAN_MINMAX_LABEL, s.replace(calibrate_method="mean_minmax")),
                    (f"percentile calibration ({s.percentile:g})", s.replace(calibrate_method="percentile")),
                    ("entropy calibration", s.replace(calibrate_method="entropy"))]
        if s.rounding == "nearest":  # the costliest: last
            out.append((candidate_label(), s.replace(rounding="adaround")))
        return out

    def before_mixed(self, settings: Settings) -> bool:
        """Mean-min-max ranges keep their turn before early mixed precision: the conversion of a plain try plus one
        min/max pass in LiteRT, where mixed precision first spends a fake-quant proxy. PicoDet's layout detector: the
        proxy took 43 of the search's 150 s and one float layer reached f1 87.5 against 90; equalized with these ranges
        it is NNCF's recipe for per-tensor activations."""
        return getattr(settings, "calibrate_method", None) == "mean_minmax"

    def on_best_variant(self, candidate: Settings, best: Settings) -> Settings | None:
        """AdaRound refines the INT8 variant that came closest (its calibration method)."""
        if getattr(candidate, "rounding", "nearest") != "adaround" or candidate.float_layers \
                or getattr(best, "rounding", "") != "nearest":
            return None
        return best.replace(rounding="adaround")

    def extra_seconds(self, settings: Settings | dict, onnx_path: Path) -> float:
        """What a candidate costs beyond a plain INT8 try (AdaRound's layers)."""
        from edgebuild.targets.onnx_adaround import extra_seconds

        return extra_seconds(settings, onnx_path)

    def profile_settings(self, profile: TargetProfile) -> dict:
        """The profile's layout and I/O dtype (``quant:`` may still override them)."""
        return {"input_layout": "source" if profile.layout == "source" else "NHWC", "io_dtype": profile.io_dtype}

    # settings that shape the onnx2tf graph: a sibling precision shares the graph when they are equal
    GRAPH_SETTINGS = ("input_layout", "rnn_unroll", "lstm_fused", "onnx_rewrites")

    def convert(self, model: ExportedModel, profile: TargetProfile, precision: str, calib: SampleSet,
                workdir: Path, settings: Settings | dict | None = None) -> Artifact:
        return self.convert_family(model, profile, precision, calib, workdir, settings)[precision]

    def convert_family(self, model: ExportedModel, profile: TargetProfile, precision: str, calib: SampleSet,
                       workdir: Path, settings: Settings | dict | None = None,
                       siblings: dict[str, tuple[Path, Settings | dict]] | None = None) -> dict[str, Artifact]:
        """One converter child: the ``precision`` model, plus float ``siblings`` (FP32, FP16, dynamic) converted
        from the same onnx2tf graph when their graph settings are the same (targets/tflite/family.py)."""
        self.check_available(profile.name)
        s = self.requested_settings(profile, settings).for_precision(precision)  # the record: a new dict
        if precision == "int8" and s["float_layers"] and not profile.allow_float_layers:
            raise BadInputError(f"{profile.name} runs integer-only: float_layers {s['float_layers']} cannot stay in float")
        if precision == "int8" and s["calibrate_method"] != "minmax" and s["quantizer"] == "legacy":
            raise BadInputError(f"{profile.name}: calibrate_method {s['calibrate_method']} needs the MLIR quantizer "
                                "(quantizer: auto or mlir), not legacy")
        dynamic = precision == "int8" and s["activations"] == "dynamic"  # the child converts it as "dynamic"
        if dynamic and not profile.allow_float_layers:
            raise BadInputError(f"{profile.name} runs integer-only: dynamic-range INT8 keeps float activations")
        if dynamic and s["float_layers"]:  # every weight is int8 there: a float layer would be a name, not a fact
            raise ConversionError(f"{profile.name}: dynamic-range INT8 keeps no layer in float")
        asked = {p: (d, self.requested_settings(profile, ss).for_precision(p)) for p, (d, ss) in (siblings or {}).items()}
        unrolled = precision == "int8" and recurrent(model.onnx_path)  # INT8 unrolls, float keeps the loop
        adaround = precision == "int8" and s["rounding"] == "adaround"  # other weights: a graph of its own
        equalize = precision == "int8" and s["equalize"]  # ... as is an equalized one (targets/onnx/equalize.py)
        shared = {p: (d, ss) for p, (d, ss) in asked.items()
                  if p != precision and p != "int8" and all(ss.get(k) == s.get(k) for k in self.GRAPH_SETTINGS)
                  and not (unrolled and ss.get("rnn_unroll", True)) and not adaround and not equalize and not dynamic}
        inputs = [_input_plan(t, s["input_layout"]) for t in model.inputs]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="edgebuild-tflite-", dir=tempdir()) as tmp:  # the build's scratch
            job_dir = Path(tmp)
            calib = at_most(calib, s.get("calibration_samples")) if precision == "int8" else calib
            n = len(calib) if precision == "int8" else min(len(calib), FLOAT_CHECK_SAMPLES)
            np.savez(job_dir / "calib.npz", **_stacked_feeds(calib, model.inputs, n))
            through = passthrough.find(model.onnx_path)  # outputs that are an input: onnx2tf drops them
            onnx_in, rewrites = source_graph(model.onnx_path, through, s, precision == "int8", calib, job_dir)
            job = {"onnx": str(onnx_in), "precision": "dynamic" if dynamic else precision, "settings": s, "inputs": inputs,
                   "outputs": [{"name": o.name, "shape": list(o.shape)} for o in model.outputs if o.name not in through],
                   "allow_float_layers": precision == "int8" and profile.allow_float_layers,
                   "siblings": {p: {"settings": ss} for p, (_, ss) in shared.items()}}
            (job_dir / "job.json").write_text(json.dumps(job, default=str))
            try:
                result = run_child(job_dir, f"{profile.name}: TFLite {precision}", float(s["timeout_s"]))
            except ConversionError as e:  # the float siblings made before it failed (or crashed) are still good
                e.siblings = self._siblings(model, profile, precision, inputs, shared, job_dir, time.perf_counter() - t0)
                raise
            seconds = time.perf_counter() - t0
            arts = {precision: self._artifact(model, profile, precision, s, inputs, result, job_dir, workdir, seconds, n)}
            arts[precision].notes += rewrites
            return arts | self._siblings(model, profile, precision, inputs, shared, job_dir, seconds)

    def _siblings(self, model: ExportedModel, profile: TargetProfile, precision: str, inputs: list[dict], shared: dict,
                  job_dir: Path, seconds: float) -> dict[str, Artifact]:
        arts = {}
        for p, sib in sibling_results(job_dir).items():
            if p in shared and sib.get("ok") and "keras_inputs" in sib:
                d, ss = shared[p]
                art = self._artifact(model, profile, p, ss, inputs, sib, sibling_dir(job_dir, p), d, seconds, 0)
                art.notes.insert(1, f"converted from the same onnx2tf/TensorFlow graph as the {precision} model "
                                    "(one converter run for both)")
                arts[p] = art
        return arts

    def _artifact(self, model: ExportedModel, profile: TargetProfile, precision: str, s: dict, inputs: list[dict],
                  result: dict, job_dir: Path, workdir: Path, seconds: float, n: int) -> Artifact:
        """Move the child's ``model.tflite`` into ``workdir`` and describe it."""
        auto_float = (result.get("float_layers_kept") or {}).pop(AUTO_FLOAT, None)
        transformer = (result.get("float_layers_kept") or {}).pop(TRANSFORMER_FLOAT, None)
        tail = (result.get("float_layers_kept") or {}).pop(TAIL_FLOAT, None)
        front = (result.get("float_layers_kept") or {}).pop(FRONT_FLOAT, None)
        mixed = s.get("float_layers") or bool(auto_float) or bool(transformer) or bool(tail) or bool(front)
        out = workdir / self.artifact_name(precision, {**s, "float_layers": mixed})
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(job_dir / "model.tflite"), out)
        if "input_perms" in result:  # the layout onnx2tf gave each input (onnx2tf_run.adopt_input_layouts)
            inputs = [{**plan, "perm": perm} for plan, perm in zip(inputs, result["input_perms"])]
        io = _artifact_io(model, inputs, result, profile.name, passthrough.find(model.onnx_path))
        files = [out.name] + (write_c_array(out) if s["c_array"] else [])
        calibrated = precision == "int8" and s.get("activations") != "dynamic"
        stateful = any(op.split()[0] in STATEFUL_OPS for op in result["ops"])  # reset between sequences (fused_lstm.py)
        used = {**s, "converter": converter_version(), "calibration_samples_used": n if calibrated else 0,
                "device_requires": {"min_runtime_version": result.get("min_runtime_version"), "builtin_ops": result["ops"],
                                    "reset_variables_per_sequence": stateful}}
        used["onnx_rewrites"] = result.get("rewrites") or []  # graph rewrites before onnx2tf (targets/tflite/rewrite/)
        used["xnnpack_checked"] = bool(result.get("xnnpack_checked"))  # loaded and ran once with XNNPACK
        # XNNPACK's share in LiteRT: {"ops", "delegated", "partitions", "fallback": {op: count}} (xnnpack.coverage)
        used["xnnpack_coverage"] = result.get("xnnpack_coverage")
        used["fp32_graph_check"] = result.get("fp32_graph_check")  # FP32 TF graph vs ONNX on one sample
        if precision == "int8" and s["activations"] == "dynamic":
            used["quantizer_used"] = "dynamic range (TFLiteConverter, weights only: no representative data)"
        elif precision == "int8":
            used["quantizer_used"] = result["quantizer_used"]
            # activation ranges TF's calibrator logged too wide (buffer sharing), narrowed (targets/tflite/ranges.py)
            used["ranges_narrowed"] = len(result.get("ranges_repaired") or [])
            if auto_float:
                used["float_ops_kept"] = auto_float  # "TFLITE_OP output-tensor": no int8 kernel or XNNPACK repair
                used["repairs"] = result.get("repairs") or []
            if transformer:  # "TFLITE_OP output-tensor" of the LayerNorm, Softmax and GELU (transformer_float)
                used["transformer_float_ops"] = transformer
            if tail:  # "TFLITE_OP output-tensor" of a detector's post-processing tail (float_tail, tail.py)
                used["tail_float_ops"] = tail
            if front:  # ... and of a signal-processing front-end (float_frontend, tail.py)
                used["frontend_float_ops"] = front
            if s["float_layers"]:
                used["float_layers_kept"] = result["float_layers_kept"]  # ONNX node -> "TFLITE_OP output-tensor"
        else:
            used["io_dtype"] = "float32"
        notes = artifact_notes(precision, io, result, used, seconds)
        return Artifact(profile.name, self.name, precision, workdir, out.name, files, used, io, notes)

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        return TFLiteRunner(artifact.path, artifact.io, threads, artifact.settings.get("host_kernels", "xnnpack"))

    def embed_metadata(self, path: Path, meta: dict[str, str]) -> str | None:
        if path.suffix.lower() != ".tflite":
            return None
        from edgebuild.targets.tflite.metadata import embed

        embed(path, meta)
        return self.info.metadata

    def read_metadata(self, path: Path) -> dict[str, str]:
        from edgebuild.targets.tflite.metadata import read

        return read(path) if path.suffix.lower() == ".tflite" else {}

    def weight_counts(self, path: Path) -> list | None:
        from edgebuild.targets.tflite.weights import weight_counts

        return weight_counts(path) if path.suffix.lower() == ".tflite" else None

    def micro(self):
        """TensorFlow Lite Micro on the host (targets/tflite/tflm.py): arena, flash, agreement with LiteRT."""
        from edgebuild.targets.tflite import tflm

        return tflm


class TFLiteRunner(Runner):
    """A .tflite on LiteRT, fed and read in the source model's layout and dtype.

    ``time_ms`` times ``invoke()`` alone with the inputs already set (as LiteRT's benchmark_model does), so
    the numpy (de)quantization and transposes done here for the source layout are not counted.
    """

    def __init__(self, path: Path, io: dict, threads: int, kernels: str = "xnnpack"):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                    "reference": OpResolverType.BUILTIN_REF}[kernels]
        try:
            with quiet_native_stderr():  # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate" per model
                self.interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                               experimental_op_resolver_type=resolver)
                self.interpreter.allocate_tensors()
            signature = self.interpreter.get_signature_runner()
            ins, outs = signature.get_input_details(), signature.get_output_details()
            self.inputs = [Port(spec, ins[spec["signature_key"]]) for spec in io["inputs"]]
            self.outputs = [spec if "from_input" in spec else Port(spec, outs[spec["signature_key"]])
                            for spec in io["outputs"]]
            # a fused sequence op keeps its state in variable tensors between invocations (fused_lstm.py): each run
            # starts from the zero state, as the source model does, and as the artifact's note asks of a device app
            self.stateful = any(op["op_name"] in STATEFUL_OPS for op in self.interpreter._get_ops_details())
        except (ValueError, RuntimeError, KeyError) as e:
            raise ConversionError(f"LiteRT cannot load {Path(path).name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e

    def _set(self, feed: dict[str, np.ndarray]) -> None:
        for port in self.inputs:
            self.interpreter.set_tensor(port.index, port.to_tensor(feed[port.name]))

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.stateful:
            self.interpreter.reset_all_variables()
        self._set(feed)
        self.interpreter.invoke()
        return [passthrough.value(port, feed) if isinstance(port, dict) else
                port.from_tensor(self.interpreter.get_tensor(port.index)) for port in self.outputs]

    def time_ms(self, feed: dict[str, np.ndarray], warmup: int, runs: int, budget_s: float) -> list[float]:
        self._set(feed)
        for _ in range(warmup):
            self.interpreter.invoke()
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < runs and (len(times) < 20 or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            self.interpreter.invoke()
            times.append((time.perf_counter() - t0) * 1e3)
        return times


def _stacked_feeds(calib: SampleSet, inputs, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` feeds, per input stacked on a new leading axis: ``[n, *ONNX input shape]``.

    ``SampleSet.feed(i)`` makes a feed the way every runner gets it (exact shape and dtype of the ONNX
    input, whatever its batch axis or rank), so the converter child never reshapes samples itself. Each feed is
    copied into one array allocated up front (no list of n feeds beside the stack: 300 MobileNetV2 images are
    180 MB)."""
    out: dict[str, np.ndarray] = {}
    for i in range(n):
        feed = calib.feed(i)
        for t in inputs:
            a = np.asarray(feed[t.name])
            want = tuple(int(d) for d in t.shape)
            if a.shape != want and -1 not in want:
                raise BadInputError(f"calibration feed for input {t.name} has shape {list(a.shape)}, the model expects {list(want)}")
            if t.name not in out:
                out[t.name] = np.empty((n, *a.shape), dtype=t.dtype)
            out[t.name][i] = a
    return out


def _input_plan(t: TensorInfo, layout: str) -> dict:
    """How one source input enters the TFLite model: 4-D NCHW becomes NHWC unless the profile keeps it."""
    channels_first = len(t.shape) == 4 and t.layout in ("NCHW", "ANY")  # ANY 4-D: the ONNX convention, NCHW
    perm = list(CHANNEL_LAST[4]) if channels_first and layout == "NHWC" else None
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "layout": t.layout, "perm": perm,
            "keep_source_layout": channels_first and perm is None}


def _artifact_io(model: ExportedModel, inputs: list[dict], result: dict, target: str, through: dict[str, str]) -> dict:
    def port(key: str, details: dict, name: str, layout: str, perm, source: TensorInfo) -> dict:
        return {"name": name, "signature_key": key, "shape": details["shape"], "dtype": details["dtype"],
                "layout": layout, "scale": details["scale"], "zero_point": details["zero_point"], "perm": perm,
                "source_shape": list(source.shape), "source_dtype": source.dtype, "source_layout": source.layout}

    keys_in, keys_out = result["keras_inputs"], result["keras_outputs"]
    missing = [k for k in keys_in if k not in result["inputs"]] + [k for k in keys_out if k not in result["outputs"]]
    computed = [o for o in model.outputs if o.name not in through]
    if missing or len(keys_in) != len(inputs) or len(keys_out) != len(computed):
        raise ConversionError(f"{target}: the TFLite signature ({list(result['inputs'])} -> {list(result['outputs'])}) "
                              f"does not match the model's inputs/outputs {[i['name'] for i in inputs]}")
    io_in = []
    for plan, key, src in zip(inputs, keys_in, model.inputs):
        expected = list(np.array(plan["shape"])[plan["perm"]]) if plan["perm"] else plan["shape"]
        got = result["inputs"][key]["shape"]
        if [int(v) for v in expected] != got and not (expected == [] and got == [1]):  # onnx2tf gives a 0-d input shape [1]
            raise ConversionError(f"{target}: TFLite input {key} has shape {result['inputs'][key]['shape']}, expected {expected}")
        io_in.append(port(key, result["inputs"][key], src.name, _layout(plan["perm"], src.layout), plan["perm"], src))
    ports = {src.name: port(key, result["outputs"][key], src.name, _layout(perm, src.layout, True), perm, src)
             for key, perm, src in zip(keys_out, result["output_perms"], computed)}
    io_out = [ports[o.name] if o.name in ports else passthrough.spec(o.name, through[o.name], o.shape, o.dtype)
              for o in model.outputs]  # the source's order; a pass-through output is the input it names
    return {"inputs": io_in, "outputs": io_out}


CHANNEL_LAST_NAMES = {3: "NWC", 4: "NHWC", 5: "NDHWC"}


def _layout(perm, source: str, inverse: bool = False) -> str:
    """The device layout of a tensor: the source's, channels-last (NWC, NHWC, NDHWC) or the permutation itself
    (``inverse``: an output's perm maps the device tensor back to the source)."""
    if not perm:
        return source
    forward = [int(v) for v in np.argsort(perm)] if inverse else list(perm)
    if tuple(forward) == CHANNEL_LAST.get(len(forward)):
        return CHANNEL_LAST_NAMES[len(forward)]
    return "permuted " + "".join(str(v) for v in forward)
