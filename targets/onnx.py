"""ONNX backend: FP32, FP16 (float32 I/O), dynamic INT8 and static INT8 (QDQ) via onnxruntime.quantization."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.errors import ConversionError
from edgebuild.targets.base import Artifact, Backend, BackendInfo, ExportedModel, Runner, register, replace_file, stem
from edgebuild.targets.profiles import TargetProfile
from edgebuild.targets.regions import is_transformer  # noqa: F401 — graph analysis shared with openvino (was here)
from edgebuild.targets.settings import OnnxSettings, Precision, Settings

# onnxruntime's defaults (OnnxSettings), overridden per profile (targets/profiles/*.yaml `quant:`) and by the
# accuracy search; op_types "auto": see below
INT8_DEFAULTS = OnnxSettings().to_dict()
# ONNX Runtime's recipe for transformers: Q/DQ on the matrix products only; LayerNorm, Softmax, GELU (Erf),
# residual Adds, the attention-mask arithmetic and the embedding Gather stay in float. Measured on a 3-layer
# MiniLM sentence encoder (random tokens): worst cosine of the embedding 0.61 with every op quantized, 0.92 with this.
# The embedding table (Gather of a constant) too: MiniLM-L3's word embeddings are 69 % of its weights; int8 there cost
# nothing measurable (pooled-embedding cosine 0.9389 with, 0.9389 without) and made the file all-INT8 (31 % -> 100 %).
WEIGHTED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"]
# onnxruntime's dynamic INT8 (quantize_dynamic; ORT's CPU recipe for BERT-class and LSTM models, as Optimum's and
# Olive's CPU configs): the ops with a fast integer kernel and a weight: MatMul with a constant B (MatMulInteger, fused
# to DynamicQuantizeMatMul at load), an embedding table (Gather of a constant: int8 table, DequantizeLinear after it)
# and LSTM (DynamicQuantizeLSTM). A Gemm with a constant B is rewritten as MatMul + Add first; Conv stays float
# (ConvInteger has no fast kernel). MiniLM-L3 (3 x 384): pooled-embedding cosine mean 0.9947 / worst 0.9915,
# 2.2x faster than FP32; static QDQ on the same ops: mean 0.947.
DYNAMIC_OPS = ("MatMul", "Gather", "LSTM")
# the dynamic candidate is offered when these ops hold at least this share of the graph's weights: the share an
# artifact needs to be named _int8 (pipeline/stages/weights.py INT8_NAME_SHARE). Below it the candidate would leave the
# convolutions float (a CNN whose dense head holds 59 % of the weights: dynamic INT8 is no INT8 model of it)
DYNAMIC_SHARE = 0.9


CALIB_CHUNK = 16  # calibration samples whose tensors are held at once
# percentile/entropy calibration histograms every activation value of every sample: PP-OCRv4's detector (327 tensors
# of up to 320x320) took 40 s per try on an idle host and 140 s on a loaded one at 120 samples, most of a search's
# time. They read at most this many activation values (at least MIN_HISTOGRAM_SAMPLES samples): a 99.999th
# percentile of tens of millions of values per tensor is as good as of hundreds of millions
HISTOGRAM_ELEMENTS = 600_000_000
MIN_HISTOGRAM_SAMPLES = 32


INFO = register(BackendInfo(
    name="onnx", backend=f"{__name__}:OnnxBackend", precisions=tuple(Precision), settings_type=OnnxSettings,
    cache_version=2,  # 2: constant weights folded before quantizing, recurrent state path float, dynamic INT8
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
        recurrent state path float when the model carries its state in and out. Likeliest first."""
        s = self.requested_settings(profile, settings)
        if self.simulate_quantization or s.activations == "dynamic" or not profile.allow_float_layers:
            return []  # TensorRT builds from QDQ only; an integer-only profile runs no float op between int8 layers
        out = []
        share = dynamic_share(onnx_path)
        if share >= DYNAMIC_SHARE:
            out.append((f"dynamic INT8 (MatMul/Gemm, LSTM and embedding weights int8 = {share:.0%} of the weights; "
                        "activations quantized per call)", s.replace(activations="dynamic")))
        return out

    def recovery_candidates(self, profile: TargetProfile, settings: Settings | dict) -> list[tuple[str, Settings]]:
        s = self.requested_settings(profile, settings)
        out = [] if s.op_types == "weighted" else [
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
        if (settings.get("rounding") if isinstance(settings, dict) else getattr(settings, "rounding", "")) != "adaround":
            return 0.0
        from edgebuild.targets.onnx_adaround import expected_seconds

        return expected_seconds(onnx_path)

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
                notes = _quantize_isolated(model.onnx_path, out, calib, settings, workdir, precision, profile.name)
            else:
                raise ConversionError(f"{profile.name}: onnx backend cannot build precision {precision}")
        except ConversionError:
            raise
        except Exception as e:  # onnxruntime raises many types; they are conversion failures of this target
            raise ConversionError(f"{profile.name}: ONNX {precision} conversion failed: {_one_line(e)}") from e
        io = {"inputs": [t.to_dict() for t in model.inputs], "outputs": [t.to_dict() for t in model.outputs]}
        return Artifact(profile.name, self.name, precision, workdir, out.name, [out.name], settings, io, notes)

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        return OrtRunner(artifact.path, threads, simulate=self.simulate_quantization and artifact.precision == "int8")

    def source_runner(self, onnx_path: Path, threads: int) -> Runner:
        return OrtRunner(Path(onnx_path), threads)

    def fake_quant(self, onnx_path: Path, calib: SampleSet, workdir: Path) -> "FakeQuant":
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
            raise ConversionError(f"onnxruntime cannot load {path.name}: {_one_line(e)}") from e
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.threads = threads

    def threads_used(self) -> int:
        return self.threads

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o, dtype=np.float32) for o in self.session.run(self.output_names, feed)]


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _to_fp16(src: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(out))


def _preprocessed(src: Path, workdir: Path, keep_names: bool = False) -> Path:
    """onnxruntime's quantization pre-processing (shape inference + graph optimization).

    With ``keep_names`` the optimization (which fuses and renames nodes, e.g. MatMul+Add) is skipped, so
    node names given by the user or the accuracy search still name the FP32 graph's nodes.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgebuild.targets.onnx_islands import quantizer_safe

    pre = workdir / "_preprocessed.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, skip_optimization=keep_names)
    _fold_constant_weights(pre)
    quantizer_safe(pre)  # names onnxruntime's quantizer would define twice (a shared bias's copies; targets/onnx_islands.py)
    return pre


FOLD_MAX_ELEMENTS = 1 << 24  # a folded tensor larger than this stays computed (a ConstantOfShape of a huge shape)


def _fold_constant_weights(path: Path) -> int:
    """Weights computed from constants (Constant nodes, Unsqueeze/Slice/Concat of them: PyTorch's LSTM export reaches
    the LSTM's W and R that way) become initializers, so the quantizers see them as weights: onnxruntime quantizes
    initializers only, and a Silero VAD's LSTM stayed float. Only nodes whose every input is constant are folded (the
    ONNX reference evaluator), never a node with a subgraph; the other nodes and their names are unchanged."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    graph = model.graph
    by_name = {i.name: i for i in graph.initializer}
    known = set(by_name)
    values: dict = {}
    keep, folded, alias = [], 0, {}
    outputs = {o.name for o in graph.output} | _subgraph_reads(graph)
    for n in graph.node:
        if n.op_type == "Identity" and n.input and n.input[0] in known and n.output[0] not in outputs:
            alias[n.output[0]] = n.input[0]  # a weight shared by two layers (an exporter's dedup) stays one tensor
            folded += 1
            continue
        has_graph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
        inputs = [t for t in n.input if t]
        if has_graph or n.domain not in ("", "ai.onnx") or not n.output or any(o in outputs for o in n.output) or \
                (n.op_type != "Constant" and (not inputs or not all(t in known or t in values for t in inputs))):
            keep.append(n)
            continue
        try:
            feeds = {t: values[t] if t in values else numpy_helper.to_array(by_name[t]) for t in inputs}
            outs = ReferenceEvaluator(_single_node_model(model, n, feeds)).run(None, feeds)
        except Exception:  # noqa: BLE001 — an op the reference evaluator does not run stays as it is
            keep.append(n)
            continue
        if any(np.asarray(o).size > FOLD_MAX_ELEMENTS for o in outs):
            keep.append(n)
            continue
        for name, v in zip(n.output, outs):
            values[name] = np.asarray(v)
        folded += 1
    if not folded:
        return 0
    for n in keep:
        for i, t in enumerate(n.input):
            if t in alias:
                n.input[i] = alias[t]
    used = {t for n in keep for t in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in values.items() if k in used)
    onnx.save(model, str(path))
    return folded


def _subgraph_reads(graph) -> set[str]:
    """Names the subgraphs of ``graph``'s nodes (If/Loop bodies) read."""
    out: set[str] = set()
    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out |= {t for m in sub.node for t in m.input} | _subgraph_reads(sub)
    return out


def _single_node_model(model, node, feeds: dict):
    from onnx import helper

    inputs = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.asarray(v).shape)
              for t, v in feeds.items()]
    outputs = [helper.make_tensor_value_info(o, 0, None) for o in node.output]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _calibrate_in_chunks(model: Path, calib: SampleSet, method, extra: dict, ranges: Path, workdir: Path) -> None:
    """Activation ranges over every calibration sample, CALIB_CHUNK samples at a time, into ``ranges`` (JSON).

    onnxruntime's calibrators keep each sample's tensors until ranges or histograms are computed: the histogram
    ones (percentile, entropy) keep whole activations, which took an OCR recogniser past 22 GB at 120 samples.
    Their ``collect_data`` merges into what earlier calls collected, so feeding chunks bounds the memory: MinMax
    ranges are identical, histograms are re-binned as their range grows (scales within a few %). (Not ``CalibMaxIntermediateOutputs``: in onnxruntime 1.32 it clears collected outputs
    without merging them, silently calibrating on the last few samples only.)
    """
    import numpy as np
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from edgebuild.calibration.adapters import ort_reader

    augmented = workdir / "_augmented.onnx"
    calibrator = create_calibrator(model, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                   augmented_model_path=str(augmented), calibrate_method=method, extra_options=extra)
    try:
        for start in range(0, len(calib), CALIB_CHUNK):
            calibrator.collect_data(ort_reader(calib.subset(np.arange(start, min(start + CALIB_CHUNK, len(calib))))))
        save_tensors_data(calibrator.compute_data(), ranges)
    finally:
        del calibrator
        augmented.unlink(missing_ok=True)
        for leftover in workdir.glob("_augmented.onnx*"):
            leftover.unlink()


def histogram_samples(model: Path, calib: SampleSet) -> SampleSet:
    """The calibration samples a histogram method reads: all, or a random part whose activation values stay within
    HISTOGRAM_ELEMENTS (never fewer than MIN_HISTOGRAM_SAMPLES)."""
    from edgebuild.calibration.budget import activation_elements, at_most

    per = activation_elements(model)
    if not per:
        return calib
    limit = max(MIN_HISTOGRAM_SAMPLES, HISTOGRAM_ELEMENTS // per)
    return at_most(calib, limit) if limit < len(calib) else calib


def _check_quantized(path: Path, target: str) -> None:
    """An ``_int8`` file must hold int8 layers: onnxruntime quantizes nothing inside If/Loop subgraphs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if not any(n.op_type in ("DequantizeLinear", "DynamicQuantizeLSTM", "MatMulInteger") for n in graph.node):
        subgraphs = sorted({n.op_type for n in graph.node if any(a.type == onnx.AttributeProto.GRAPH for a in n.attribute)})
        where = f" (its layers sit inside {', '.join(subgraphs)} subgraphs, which onnxruntime does not quantize)" if subgraphs else ""
        raise ConversionError(f"{target}: INT8 quantization left every layer in float{where}")


def _quantize_isolated(src: Path, out: Path, calib: SampleSet, settings: dict, workdir: Path, precision: str,
                       target: str) -> list[str]:
    """Dynamic or static INT8 quantization in a converter child (targets/isolated.py): a crash or a hang of
    onnxruntime's native code fails this target, not the build. Returns the conversion's notes."""
    from edgebuild.targets.isolated import run_with_samples

    job = {"src": str(src), "out": str(out), "settings": settings, "workdir": str(workdir), "precision": precision,
           "target": target}
    static = precision == "int8" and settings.get("activations") != "dynamic"
    return run_with_samples(_quantize_job, job, calib if static else None,
                            what=f"{target}: ONNX {precision} conversion failed", name="convert:onnx")


def _quantize_job(job: dict) -> list[str]:
    """In the converter child: the quantization proper."""
    from edgebuild.targets.isolated import samples_from_disk, set_phase

    src, out, workdir = Path(job["src"]), Path(job["out"]), Path(job["workdir"])
    set_phase(f"onnxruntime {job['precision']} quantization")
    if job["precision"] == "dynamic":
        _quantize_dynamic(src, out, workdir)
        return []
    if job["settings"].get("activations") == "dynamic":
        notes = _quantize_int8_dynamic(src, out, job["settings"], workdir)
        _check_quantized(out, job["target"])
        return notes
    notes = _quantize_static(src, out, samples_from_disk(job["samples"]), job["settings"], workdir)
    if job["settings"].get("quantize_recurrent", True):
        notes += _quantize_recurrent(out, job["settings"], workdir)
    _check_quantized(out, job["target"])
    return notes


def _quantize_recurrent(path: Path, s: dict, workdir: Path) -> list[str]:
    """LSTM layers (which static QDQ leaves in float) with int8 weights: onnxruntime's DynamicQuantizeLSTM (weights
    int8 per tensor, activations quantized at run time). A 3-layer LSTM of 128: 3.7x smaller, output cosine
    0.9999995. GRU/RNN have no such kernel in onnxruntime and stay float (the INT8 weight share says so)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = {*s.get("nodes_to_exclude", ()), *s.get("float_layers", ())}
    lstms = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
             if n.op_type == "LSTM" and n.name not in excluded]
    if not lstms:
        return []
    tmp = workdir / "_recurrent.onnx"
    quantize_dynamic(str(path), str(tmp), op_types_to_quantize=["LSTM"], nodes_to_quantize=lstms,
                     weight_type=QuantType.QInt8)
    tmp.replace(path)
    return [f"{len(lstms)} LSTM layer(s) with int8 weights (onnxruntime DynamicQuantizeLSTM; static QDQ leaves "
            "recurrent layers float)"]


def _weights_by_op(graph) -> list[tuple[str, int, object]]:
    """(op type, weight elements, node) for each layer of ``graph`` with a constant weight: Conv/ConvTranspose, MatMul
    and Gemm (a constant B; a Gemm with transA counts as a non-MatMul layer), LSTM/GRU/RNN (W and R), and an
    embedding Gather (a constant table)."""
    sizes = {i.name: int(np.prod(i.dims)) if len(i.dims) else 1 for i in graph.initializer if i.data_type == 1}
    for n in graph.node:  # Constant weights, and what Unsqueeze/Reshape/Transpose... make of them (not yet folded)
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" and n.attribute[0].t.data_type == 1:
            sizes[n.output[0]] = int(np.prod(n.attribute[0].t.dims)) if len(n.attribute[0].t.dims) else 1
        elif n.op_type in ("Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Cast") and n.input \
                and n.input[0] in sizes:
            sizes[n.output[0]] = sizes[n.input[0]]
    weight_inputs = {"Conv": (1,), "ConvTranspose": (1,), "MatMul": (1,), "Gemm": (1,), "LSTM": (1, 2),
                     "GRU": (1, 2), "RNN": (1, 2), "Gather": (0,)}
    out = []
    for n in graph.node:
        size = sum(sizes.get(n.input[i], 0) for i in weight_inputs.get(n.op_type, ()) if i < len(n.input))
        if size >= 16:
            op = n.op_type
            if op == "Gemm" and any(a.name == "transA" and a.i for a in n.attribute):
                op = "Gemm(transA)"
            out.append((op, size, n))
    return out


def dynamic_share(onnx_path: Path) -> float:
    """The share of the graph's weights in the layers dynamic INT8 quantizes (DYNAMIC_OPS and constant-B Gemm)."""
    import onnx

    found = _weights_by_op(onnx.load(str(onnx_path), load_external_data=False).graph)
    total = sum(n for _, n, _ in found)
    return sum(n for op, n, _ in found if op in (*DYNAMIC_OPS, "Gemm")) / total if total else 0.0


def _gemm_as_matmul(graph) -> int:
    """Each Gemm with a constant B (and no transA) as MatMul (+ Add of beta*C): onnxruntime's dynamic quantization
    has no Gemm kernel. The MatMul keeps the Gemm's name (float layers are named by the FP32 graph's nodes)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    done = 0
    for idx, n in reversed(list(enumerate(graph.node))):
        if n.op_type != "Gemm" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if a.get("transA", 0):
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) * float(a.get("alpha", 1.0))
        if a.get("transB", 0):
            w = w.T
        wname = f"{n.input[1]}_as_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), wname))
        y = n.output[0]
        new = [helper.make_node("MatMul", [n.input[0], wname], [y if len(n.input) < 3 or not n.input[2] else y + "_mm"],
                                name=n.name or f"gemm_{idx}")]
        if len(n.input) > 2 and n.input[2]:
            c = n.input[2]
            beta = float(a.get("beta", 1.0))
            if beta != 1.0 and c in inits:
                cname = f"{c}_beta"
                graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[c]) * np.float32(beta), cname))
                c = cname
            elif beta != 1.0:
                continue
            new.append(helper.make_node("Add", [y + "_mm", c], [y], name=f"{new[0].name}_bias"))
        del graph.node[idx]
        for k, m in enumerate(new):
            graph.node.insert(idx + k, m)
        done += 1
    return done


RECURRENT = ("LSTM", "GRU", "RNN")


def state_path(onnx_path: Path | str) -> list[str]:
    """The nodes carrying a recurrent layer's state between the model's interface and the layer: from a graph input to
    an LSTM/GRU/RNN's initial_h/initial_c, and from its Y_h/Y_c to a graph output (a stateful model that takes its
    state in and gives it back, as a streaming VAD does). Empty when the model has no such path. Q/DQ there rounds
    the state to 8 bits on every call and the error compounds over a stream (Silero VAD: state output cosine 0.82)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    found: dict[str, object] = {}

    def walk(start: str, step, stop) -> list | None:
        seen, todo, path, reached = set(), [start], [], False
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in stop:
                reached = True
            for n in step(t):
                if n.op_type in RECURRENT or n.op_type in ("Conv", "MatMul", "Gemm") or len(path) > 64:
                    continue
                path.append(n)
                todo += list(n.input) if step is back else list(n.output)
        return path if reached else None

    back = lambda t: [producer[t]] if t in producer else []  # noqa: E731
    fwd = lambda t: consumers.get(t, [])  # noqa: E731
    for n in graph.node:
        if n.op_type not in RECURRENT:
            continue
        ins = [walk(t, back, inputs) for t in n.input[5:7] if t]
        outs = [walk(t, fwd, outputs) for t in n.output[1:3] if t]
        if any(p is not None for p in ins) and any(p is not None for p in outs):
            for p in ins + outs:
                for m in p or []:
                    found[m.name] = m
    return [k for k in found if k]


def _quantize_int8_dynamic(src: Path, out: Path, s: dict, workdir: Path) -> list[str]:
    """INT8 with activations quantized per call (onnxruntime ``quantize_dynamic``) on DYNAMIC_OPS, the search's
    candidate for graphs whose weights sit in MatMul/Gemm, LSTM and embedding tables. No calibration."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = _preprocessed(src, workdir, keep_names=True)  # no fusion: node names stay the FP32 graph's
    model = onnx.load(str(pre))
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    gemms = _gemm_as_matmul(model.graph)
    excluded = {*s.get("nodes_to_exclude", ()), *s.get("float_layers", ())}
    if s.get("float_regions", True):
        from edgebuild.targets.regions import float_regions

        onnx.save(model, str(pre))
        excluded |= {n for v in float_regions(pre).values() for n in v}
    nodes = [n.name for op, _, n in _weights_by_op(model.graph) if op in DYNAMIC_OPS and n.name not in excluded]
    if not nodes:
        raise ConversionError("dynamic INT8: no MatMul, Gemm, LSTM or embedding Gather with constant weights to quantize")
    onnx.save(model, str(pre))
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    quantize_dynamic(str(pre), str(out), op_types_to_quantize=list(DYNAMIC_OPS), nodes_to_quantize=nodes,
                     per_channel=bool(s["per_channel"]), reduce_range=bool(s["reduce_range"]),
                     weight_type=types[s["weight_type"]], extra_options={"MatMulConstBOnly": True})
    pre.unlink()
    for leftover in workdir.glob("*.onnx.data"):
        leftover.unlink()
    counts = {op: sum(1 for o, _, n in _weights_by_op(model.graph) if o == op and n.name in nodes) for op in DYNAMIC_OPS}
    return [f"dynamic INT8 (onnxruntime quantize_dynamic): {counts['MatMul']} MatMul/Gemm, {counts['Gather']} embedding "
            f"Gather, {counts['LSTM']} LSTM layer(s) with int8 weights "
            f"({'per channel' if s['per_channel'] else 'per tensor'}), activations quantized per call"
            + (f"; {gemms} Gemm rewritten as MatMul + Add" if gemms else "") + "; Conv and the other ops float"]


def _quantize_dynamic(src: Path, out: Path, workdir: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = _preprocessed(src, workdir)
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    pre.unlink()


def quantize_static(src: Path, out: Path, calib: SampleSet, settings: dict, workdir: Path,
                    calibration_cache: Path | None = None, preprocessed: bool = False) -> None:
    """Static INT8 QDQ with onnxruntime (public for the pipeline's sensitivity analysis).

    ``calibration_cache``: a JSON file of activation ranges written by the first call and reused by the next
    ones (onnxruntime's ``calibration_cache_path``), so quantizing one layer at a time calibrates once.
    ``preprocessed``: ``src`` is already ``preprocess(src)``'s output (not pre-processed again per call).
    """
    _quantize_static(src, out, calib, OnnxSettings().with_changes(settings).to_dict(), workdir, calibration_cache,
                     preprocessed)


def preprocess(src: Path, workdir: Path) -> Path:
    """onnxruntime's pre-processing without the node-renaming optimization, for repeated ``quantize_static``."""
    return _preprocessed(src, workdir, keep_names=True)


# fake quantization: per-tensor uint8 activations, per-channel int8 weights, min/max ranges, every op type eligible
FAKE_QUANT_SETTINGS = {"op_types": "all", "activation_type": "uint8", "weight_type": "int8", "per_channel": True,
                       "reduce_range": False, "calibrate_method": "minmax", "symmetric_activations": False,
                       "symmetric_weights": True}


class FakeQuant:
    """The backend's public fake-quantization helper (the pipeline's per-layer sensitivity uses it, whatever the
    target): ``runner(layers)`` quantizes only the named nodes of an FP32 ONNX model (QDQ) and runs the result
    unfused on ONNX Runtime CPU — the arithmetic of an int8 kernel without any CPU-specific saturation.

    The model is pre-processed once and the activation ranges calibrated once (on ``calib``, by the first call),
    then reused by every call: quantizing one layer at a time costs one quantization pass per layer. All of it
    (onnxruntime's native quantization and runtime) runs in one child process (targets/isolated.py ``Served``):
    a crash is a ConversionError for that call, and the next call starts a new child (the ranges are kept)."""

    def __init__(self, onnx_path: Path, calib: SampleSet, workdir: Path):
        from edgebuild.targets.isolated import samples_to_disk

        self._args = (str(onnx_path), samples_to_disk(calib, workdir), str(workdir))
        self._served = None

    def runner(self, layers: list[str]) -> Runner:
        from edgebuild.targets.isolated import Served

        if self._served is None or not self._served.alive():
            self._served = Served(_FakeQuantHost, self._args, "fake-quant", "fake quantization", "quantizer")
        self._served.call("quantize", [str(n) for n in layers])
        return _FakeQuantRunner(self._served)

    def runner_except(self, float_layers: list[str]) -> Runner:
        """Every node quantized but ``float_layers`` (a mixed-precision candidate, fake-quantized)."""
        from edgebuild.targets.isolated import Served

        if self._served is None or not self._served.alive():
            self._served = Served(_FakeQuantHost, self._args, "fake-quant", "fake quantization", "quantizer")
        self._served.call("quantize_except", [str(n) for n in float_layers])
        return _FakeQuantRunner(self._served)

    def close(self) -> None:
        if self._served is not None:
            self._served.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _FakeQuantRunner(Runner):
    def __init__(self, served):
        self._served = served

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._served.call("run", feed)


class _FakeQuantHost:
    """In the fake-quant child: the pre-processed model, the calibration samples, the runner of the last call."""

    def __init__(self, onnx_path: str, samples: dict, workdir: str):
        from edgebuild.targets.isolated import samples_from_disk

        self.calib, self.workdir, self.runner = samples_from_disk(samples), Path(workdir), None
        self.model = self.workdir / "fake_quant_model.onnx"
        if not self.model.is_file():  # once, not once per layer (a 70 MB encoder: ~3 s each), nor per child
            preprocess(Path(onnx_path), self.workdir).rename(self.model)
        self.ranges = self.workdir / "fake_quant_ranges.json"

    def quantize(self, layers: list[str]) -> None:
        out, self.runner = self.workdir / "fake_quant.onnx", None
        if not layers:  # nothing to quantize (onnxruntime reads an empty nodes_to_quantize as every node)
            self.runner = OrtRunner(self.model, 1)
            return
        quantize_static(self.model, out, self.calib, {**FAKE_QUANT_SETTINGS, "nodes_to_quantize": layers},
                        self.workdir, self.ranges, preprocessed=True)
        self.runner = OrtRunner(out, 1, simulate=True)

    def quantize_except(self, float_layers: list[str]) -> None:
        import onnx

        from edgebuild.targets.regions import float_regions

        keep = set(float_layers) | {n for v in float_regions(self.model).values() for n in v}  # as a real conversion
        self.quantize([n.name for n in onnx.load(str(self.model), load_external_data=False).graph.node
                       if n.name and n.name not in keep])

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(feed)


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


def resolve_op_types(src: Path, op_types) -> tuple[list[str] | None, str | None]:
    """The op types given Q/DQ (None: onnxruntime's whole registry) and a note saying why, for ``op_types``."""
    if isinstance(op_types, list):
        return [str(t) for t in op_types], f"quantized op types as configured: {', '.join(map(str, op_types))}"
    if op_types == "weighted" or (op_types == "auto" and is_transformer(src)):
        why = "attention found in the graph (transformer): " if op_types == "auto" else ""
        return list(WEIGHTED_OPS), (f"{why}only {', '.join(WEIGHTED_OPS)} quantized (onnxruntime's recipe for "
                                    "transformers); LayerNorm, Softmax, GELU and the other ops stay in float")
    return None, None


def _quantize_static(src: Path, out: Path, calib: SampleSet, s: dict, workdir: Path,
                     calibration_cache: Path | None = None, preprocessed: bool = False) -> list[str]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    named = [*s["nodes_to_exclude"], *s["float_layers"], *s["nodes_to_quantize"]]
    pre = src if preprocessed else _preprocessed(src, workdir, keep_names=bool(named))
    if named and not preprocessed:
        import onnx

        present = {n.name for n in onnx.load(str(pre)).graph.node}
        missing = sorted(set(named) - present)
        if missing:
            raise ConversionError(f"nodes named in the quantization settings are not in the model: {', '.join(missing[:5])}")
    extra = {"ActivationSymmetric": bool(s["symmetric_activations"]), "WeightSymmetric": bool(s["symmetric_weights"]),
             "QuantizeBias": bool(s["quantize_bias"]), "DedicatedQDQPair": bool(s["dedicated_qdq_pair"])}
    calib_extra = {"percentile": float(s["percentile"])} if s["calibrate_method"] == "percentile" else {}
    if s["calibrate_method"] == "percentile":
        extra["CalibPercentile"] = float(s["percentile"])
    op_types, note = resolve_op_types(src, s.get("op_types", "all"))
    regions: list[str] = []
    found: dict = {}
    if s.get("float_regions", False) and not s["nodes_to_quantize"]:
        from edgebuild.targets.regions import describe, float_regions

        found = float_regions(pre)
        regions = [n for v in found.values() for n in v]
        note = "; ".join(filter(None, [note, describe(found)])) or None
    if s.get("float_state", True) and not s["nodes_to_quantize"]:
        state = state_path(pre)
        if state:
            regions += state
            note = "; ".join(filter(None, [note, f"the recurrent state path in float ({len(state)} op(s) between the "
                                                 "state input/output and the recurrent layer)"]))
    if s.get("rounding", "nearest") == "adaround":  # learned weight rounding first (targets/onnx_adaround.py)
        from edgebuild.targets.onnx_adaround import apply

        pre, ada_note = apply(pre, calib, s, workdir, skip={*s["nodes_to_exclude"], *s["float_layers"], *regions},
                              owned=not preprocessed)
        note = "; ".join(filter(None, [note, ada_note]))
        preprocessed = False  # the adjusted copy is this call's own: removed below
    ranges = calibration_cache or workdir / "_ranges.json"
    if not ranges.is_file():
        used = histogram_samples(pre, calib) if s["calibrate_method"] != "minmax" else calib
        if len(used) < len(calib):
            note = "; ".join(filter(None, [note, f"{s['calibrate_method']} calibration histograms {len(used)} of the "
                                                 f"{len(calib)} calibration samples (activation values capped)"]))
        _calibrate_in_chunks(pre, used, methods[s["calibrate_method"]], calib_extra, ranges, workdir)
    quantize_static(
        str(pre), str(out), None, quant_format=QuantFormat.QDQ,
        activation_type=types[s["activation_type"]], weight_type=types[s["weight_type"]],
        per_channel=bool(s["per_channel"]), reduce_range=bool(s["reduce_range"]),
        calibrate_method=methods[s["calibrate_method"]],
        nodes_to_exclude=[*s["nodes_to_exclude"], *s["float_layers"], *regions],
        nodes_to_quantize=list(s["nodes_to_quantize"]) or None,
        op_types_to_quantize=op_types, extra_options=extra, calibration_cache_path=ranges,
    )
    if regions and found.get("postprocess"):
        _float_into_tail(out, set(found["postprocess"]))
    if not preprocessed:
        pre.unlink()
    if calibration_cache is None:
        ranges.unlink()
    for leftover in workdir.glob("*.onnx.data"):
        leftover.unlink()
    return [note] if note else []


def _float_into_tail(path: Path, tail: set[str]) -> None:
    """No Q/DQ on a tensor that only the float tail reads (an output Softmax/Sigmoid kept float, targets/regions.py):
    onnxruntime quantizes a Gemm/Conv's output whatever reads it, so the logits a float Softmax takes were still 8-bit
    (the arg-max of two close symbols tied). The layer before keeps its int8 weights and inputs, with a float output
    (onnxruntime fuses DQ -> Gemm/MatMul into an integer kernel with float output)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    outputs = {o.name for o in graph.output}
    drop, rename = [], {}
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in outputs:
            continue
        users = consumers.get(q.output[0], [])
        if len(users) != 1 or users[0].op_type != "DequantizeLinear" or users[0].output[0] in outputs:
            continue
        dq = users[0]
        readers = consumers.get(dq.output[0], [])
        if readers and all(r.name in tail for r in readers):
            drop += [q, dq]
            rename[dq.output[0]] = q.input[0]
    if not drop:
        return
    for n in drop:
        graph.node.remove(n)
    for n in graph.node:
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
    onnx.save(model, str(path))

