"""ExecuTorch backend: PyTorch's own edge runtime, ``.pte`` programs with the XNNPACK delegate.

It converts the build's torch.export program (``ExportedModel.program``; the backend ``consumes`` TORCH_EXPORT, so
an ONNX source is exit 2 before any work), not the ONNX file: PyTorch -> torch.export -> [PT2E quantization] ->
``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` -> ``to_executorch()`` -> ``model_<precision>.pte``.
No ONNX, no TensorFlow: two converters fewer than the TFLite path.

Precisions: FP32; FP16 (the graph in half precision with float32 I/O, casts at the edges: XNNPACK runs FP16 where the
CPU has FP16 arithmetic, ARMv8.2+; on x86 it converts); dynamic INT8 (weights int8 per channel, activations quantized
per run: Linear layers, for linear-heavy models); static INT8 (PT2E with ``XNNPACKQuantizer``: int8 activations
calibrated on the build's samples (min-max ranges; histogram as a search variant), symmetric int8 weights per channel by default; conv, linear, add, mul, cat and
pooling run int8 in XNNPACK; what the quantizer has no int8 pattern for — LayerNorm, softmax, GELU, attention's
matmuls, embeddings — stays float, and the artifact is named ``_int8`` only when at least 90 % of the weights are int8
(``int8_weight_share`` in its settings), else ``_int8_mixed``).

The accuracy search may vary the weights' granularity (per-channel / per-tensor), the activation observer (min-max
/ histogram) and keep layers in float (``float_layers``: the FP32 ONNX node names of the build's sensitivity, mapped to
the torch modules they were exported from).

Everything native runs isolated (targets/isolated.py): the conversion in a converter child (which also loads the
``.pte`` in the ExecuTorch runtime and runs it once), the runner in a runtime child (``isolate_runner``), where the
ExecuTorch thread pool is set to the profile's threads.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from edgebuild.calibration.budget import at_most
from edgebuild.calibration.dataset import SampleSet
from edgebuild.errors import BadInputError, ConversionError
from edgebuild.targets.base import TORCH_EXPORT, Artifact, Backend, BackendInfo, ExportedModel, Runner, register
from edgebuild.targets.executorch_graph import (delegation, half_module, prelu_for_xnnpack, quantize_pt2e,
                                               recurrent_as_scan)
from edgebuild.targets.executorch_scan import body_constants, scan_partitioner
from edgebuild.targets.executorch_scan import supported as loop_supported
from edgebuild.targets.isolated import quiet_native_stderr
from edgebuild.targets.profiles import TargetProfile
from edgebuild.targets.settings import Precision, Settings, choice, count, flag, names, number

METADATA_METHOD = "edgebuild_metadata"  # the constant method a .pte carries edgebuild's metadata in (JSON string)
INT8_NAMING_SHARE = 0.9  # `_int8` only when at least this share of the weights is int8 (DESIGN: artifact names)
SEGMENT_ALIGNMENT = 128  # ExecutorchBackendConfig's defaults, kept when the metadata is written into a .pte
STEMS = {"fp32": "model_fp32", "fp16": "model_fp16", "dynamic": "model_dynamic_int8", "int8": "model_int8"}


@dataclass(frozen=True)
class ExecuTorchSettings(Settings):
    """PT2E quantization with ExecuTorch's XNNPACKQuantizer (its defaults unless a profile says more)."""

    backend = "executorch"
    INT8_ONLY = ("per_channel", "observer", "calibration_samples", "float_layers")

    per_channel: bool = flag(True)  # int8 weights per output channel (else one scale per tensor)
    # activation ranges: min-max by default (the demo's 300 calibration samples: 31.6 s against 92.2 s with XNNPACK's
    # histogram observers on a loaded host, same top-1 agreement); histogram is the accuracy search's first variant
    observer: str = choice("minmax", "minmax", "histogram", fold=str.lower)
    calibration_samples: int | None = count(None, optional=True)  # None: every calibration sample the build chose
    float_layers: tuple[str, ...] = names()  # FP32 ONNX node names whose torch ops stay float (the accuracy search)
    timeout_s: float = number(1800)  # the converter child's limit


INFO = register(BackendInfo(
    name="executorch", backend=f"{__name__}:ExecuTorchBackend",
    precisions=(Precision.INT8, Precision.FP16, Precision.FP32, Precision.DYNAMIC), settings_type=ExecuTorchSettings,
    extra="executorch", requires=("torch", "torchao", "executorch"),
    # the runner loads the C++ runtime's bindings alone: ``executorch.runtime`` imports the compiler side (exir,
    # torchao), 29 s against 0.04 s on a loaded host, and every runtime child (validation, timing, memory) paid it
    runtime_modules=("torch", "executorch.extension.pybindings._C"),
    suffixes=(".pte",), metadata=f"executorch constant method '{METADATA_METHOD}'",
    versions=("torch", "executorch", "torchao", "numpy"), consumes=TORCH_EXPORT, isolate_runner=True,
    cache_version=2,  # 2: recurrent layers as torch.scan loops (executorch_scan.py), not unrolled
    device_runtimes=("executorch",)))  # pipeline/assets/device_runner.py's ExecuTorch (the runtime's bindings)


class ExecuTorchBackend(Backend):
    supports_float_layers = True

    def artifact_name(self, precision: str, settings: dict | None = None) -> str:
        if precision not in STEMS:
            raise BadInputError(f"executorch backend cannot build precision {precision!r}")
        s = settings or {}
        mixed = precision == "int8" and (s.get("float_layers") or s.get("int8_weight_share", 1.0) < INT8_NAMING_SHARE)
        return STEMS[precision] + ("_mixed" if mixed else "") + ".pte"

    def recovery_candidates(self, profile: TargetProfile, settings: Settings | dict) -> list[tuple[str, Settings]]:
        s = self.requested_settings(profile, settings)
        return [("min-max activation ranges" if s.observer == "histogram" else "histogram activation ranges",
                 s.replace(observer="minmax" if s.observer == "histogram" else "histogram")),
                ("per-tensor weights" if s.per_channel else "per-channel weights", s.replace(per_channel=not s.per_channel))]

    def convert(self, model: ExportedModel, profile: TargetProfile, precision: str, calib: SampleSet,
                workdir: Path, settings: Settings | dict | None = None) -> Artifact:
        from edgebuild.targets.isolated import run_with_samples

        self.check_available(profile.name)
        s = self.requested_settings(profile, settings).for_precision(precision)  # the record: a new dict
        if precision not in STEMS:
            raise ConversionError(f"{profile.name}: executorch backend cannot build precision {precision}")
        if model.program is None:
            raise ConversionError(f"{profile.name}: no torch.export program to convert "
                                  f"({model.program_error or 'the build exported none: a torch source is needed'})")
        if precision == "int8" and s["float_layers"] and not profile.allow_float_layers:
            raise BadInputError(f"{profile.name} runs integer-only: float_layers {s['float_layers']} cannot stay in float")
        workdir.mkdir(parents=True, exist_ok=True)
        samples = at_most(calib, s.get("calibration_samples")) if precision == "int8" else None
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="edgebuild-executorch-", dir=workdir) as tmp:
            job = {"program": str(model.program), "precision": precision, "settings": s, "out": str(Path(tmp) / "model.pte"),
                   "inputs": [t.to_dict() for t in model.inputs], "outputs": [t.name for t in model.outputs],
                   "onnx": str(model.onnx_path), "target": profile.name}
            result = run_with_samples(_convert_job, job, samples, timeout=float(s["timeout_s"]),
                                      what=f"{profile.name}: ExecuTorch {precision} conversion",
                                      name="convert:executorch")
            used = {**s, **result["record"], "converter": _converter_version(),
                    "calibration_samples_used": len(samples) if samples is not None else 0}
            out = workdir / self.artifact_name(precision, used)
            os.replace(Path(tmp) / "model.pte", out)
        io = {"inputs": [t.to_dict() for t in model.inputs], "outputs": [t.to_dict() for t in model.outputs]}
        notes = _notes(precision, used, time.perf_counter() - t0)
        return Artifact(profile.name, self.name, precision, workdir, out.name, [out.name], used, io, notes)

    def runner(self, artifact: Artifact, threads: int) -> Runner:
        return ExecuTorchRunner(artifact.path, artifact.io, threads)

    def embed_metadata(self, path: Path, meta: dict[str, str]) -> str | None:
        if path.suffix != ".pte":
            return None
        write_metadata(path, meta)
        return f"executorch constant method '{METADATA_METHOD}' (a JSON string)"

    def read_metadata(self, path: Path) -> dict[str, str]:
        if path.suffix != ".pte":
            return {}
        module = load_pte(path)
        if METADATA_METHOD not in module.method_names():
            return {}
        return json.loads(module.run_method(METADATA_METHOD, [])[0])


class ExecuTorchRunner(Runner):
    """A .pte on the ExecuTorch runtime's Python bindings (portable kernels + the XNNPACK delegate), fed and read in
    the source model's dtypes. Meant for a runtime child (``isolate_runner``): it sizes the process's thread pool."""

    def __init__(self, path: Path, io: dict, threads: int):
        from executorch.extension.pybindings import _C

        self._lib = _C
        with quiet_native_stderr():  # the runtime logs its CPU probing and thread pool size per process
            try:
                _C._unsafe_reset_threadpool(int(threads))  # the XNNPACK delegate's pthreadpool
            except Exception:  # noqa: BLE001 — a runtime built without a thread pool runs single-threaded
                pass
            try:
                self.method = _Forward(load_pte(path))
                self.method.execute(self._zeros(io))  # the first run packs XNNPACK's weights: its log lines too
            except Exception as e:  # noqa: BLE001 — the runtime raises RuntimeError/ValueError with its error code
                raise ConversionError(f"ExecuTorch cannot load {Path(path).name}: {type(e).__name__}: "
                                      f"{(str(e).strip().splitlines() or [''])[0][:200]}") from e
        self.inputs = [(i["name"], np.dtype(i["dtype"])) for i in io["inputs"]]

    @staticmethod
    def _zeros(io: dict) -> list:
        import torch

        return [torch.zeros(i["shape"], dtype=getattr(torch, i["dtype"])) for i in io["inputs"]]

    def _args(self, feed: dict[str, np.ndarray]) -> list:
        import torch

        return [torch.from_numpy(np.array(feed[name], dtype=dtype, copy=True)) for name, dtype in self.inputs]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.method.execute(self._args(feed))
        return [np.array(o.numpy() if hasattr(o, "numpy") else o, dtype=np.float32, copy=True) for o in outs]

    def time_ms(self, feed: dict[str, np.ndarray], warmup: int, runs: int, budget_s: float) -> list[float]:
        """``execute()`` alone on inputs made once (the numpy -> tensor copy is not counted)."""
        args = self._args(feed)
        for _ in range(warmup):
            self.method.execute(args)
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < runs and (len(times) < 20 or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            self.method.execute(args)
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def threads_used(self) -> int | None:
        try:
            return int(self._lib._threadpool_get_thread_count())
        except Exception:  # noqa: BLE001
            return None


def load_pte(path: Path):
    """The .pte in ExecuTorch's C++ runtime (portable kernels + XNNPACK) through its bindings' extension alone:
    ``executorch.runtime`` would import the compiler side too (exir, torchao: ~30 s on a loaded host)."""
    import torch  # noqa: F401 — loads libtorch, which the bindings link against
    from executorch.extension.pybindings import _C

    return _C._load_for_executorch(str(path))


class _Forward:
    """``execute(args)`` of the program's forward method."""

    def __init__(self, module):
        self.module = module

    def execute(self, args):
        return self.module.forward(args)


# ---- in the converter child -----------------------------------------------------------------------------------


def _convert_job(job: dict) -> dict:
    """torch.export program -> [PT2E] -> XNNPACK-lowered .pte at ``job["out"]``, loaded and run once; its record."""
    import warnings

    import torch

    from edgebuild.targets.isolated import samples_from_disk, set_phase

    warnings.simplefilter("ignore")  # torch.export and torchao deprecation chatter; errors still raise
    torch.manual_seed(0)
    precision, s = job["precision"], job["settings"]
    set_phase("loading the torch.export program")
    ep = torch.export.load(job["program"])
    example = tuple(torch.zeros(i["shape"], dtype=getattr(torch, i["dtype"])) for i in job["inputs"])
    record: dict = {}
    ep, rewritten = prelu_for_xnnpack(ep, example)
    if rewritten:
        record["prelu_rewritten"] = rewritten
    loops = loop_supported(ep.module()) if precision == "fp16" else []
    if loops:
        raise ConversionError(f"{job['target']}: ExecuTorch FP16 of recurrent layers ({', '.join(loops)}) is not "
                              "built: their loop form runs in float32 (INT8 and FP32 are built)")
    if precision == "fp16":
        set_phase("casting the program to FP16")
        ep = torch.export.export(half_module(ep.module()), example, strict=False)
    if precision in ("int8", "dynamic"):
        calib = samples_from_disk(job["samples"])
        ep, quantized = quantize_pt2e(ep, example, precision, s, calib, job)
        record.update(quantized)
    elif precision == "fp32":
        set_phase("recurrent layers as loops (torch.scan)")
        ep, scanned = recurrent_as_scan(ep, example)
        if scanned:
            record["recurrent_scan"] = scanned
    set_phase("lowering to XNNPACK (to_edge_transform_and_lower)")
    edge = _lower(ep, bool(record.get("recurrent_scan")))
    record["delegation"] = delegation(edge.exported_program().graph_module)
    set_phase("serializing the .pte (to_executorch)")
    Path(job["out"]).write_bytes(edge.to_executorch().buffer)
    set_phase("loading the .pte in the ExecuTorch runtime")
    outs = load_pte(Path(job["out"])).forward(list(example))
    if len(outs) != len(job["outputs"]):
        raise ConversionError(f"{job['target']}: the .pte returns {len(outs)} output(s), the model has "
                              f"{len(job['outputs'])} ({', '.join(job['outputs'])})")
    record["runtime_checked"] = True
    return {"record": record}


def _lower(ep, loops: bool):
    """``to_edge_transform_and_lower`` with XNNPACK; a program with recurrent loops gets their bodies lowered too
    (targets/executorch_scan.py)."""
    from executorch.exir import to_edge_transform_and_lower

    if loops:
        return to_edge_transform_and_lower(ep, transform_passes=[body_constants()], partitioner=[scan_partitioner()])
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])


# ---- metadata in the .pte (pipeline/stages/embed.py, through embed_metadata) ---------------------------------------


def write_metadata(path: Path, meta: dict[str, str]) -> None:
    """Add (or replace) the constant method ``edgebuild_metadata`` returning ``meta`` as a JSON string: the .pte's
    other plans, delegate blobs and constant segments are re-serialized unchanged. A device program reads it with
    ``module.execute("edgebuild_metadata")``. The file is replaced by a new one (a hard link into the cache keeps
    the cached bytes)."""
    from executorch.exir._serialize._program import deserialize_pte_binary, serialize_pte_binary
    from executorch.exir.schema import Chain, ContainerMetadata, EValue, ExecutionPlan, String

    pte = deserialize_pte_binary(path.read_bytes())
    plans = [p for p in pte.program.execution_plan if p.name != METADATA_METHOD]
    plans.append(ExecutionPlan(name=METADATA_METHOD, container_meta_type=ContainerMetadata("", "L1#1(*)"),
                               values=[EValue(String(json.dumps(meta, sort_keys=True)))], inputs=[], outputs=[0],
                               chains=[Chain(inputs=[], outputs=[], instructions=[], stacktrace=None)], operators=[],
                               delegates=[], non_const_buffer_sizes=[0]))
    pte.program.execution_plan = plans
    data = bytes(serialize_pte_binary(pte, extract_delegate_segments=True, segment_alignment=SEGMENT_ALIGNMENT))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- records ------------------------------------------------------------------------------------------------------


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def runtime_version() -> str:
    """The ExecuTorch release that wrote the .pte: the device runtime must be this release or newer."""
    return _version("executorch").split("+")[0]


def _converter_version() -> str:
    return (f"torch {_version('torch')} torch.export -> executorch {_version('executorch')} "
            f"to_edge_transform_and_lower (XnnpackPartitioner)")


def _notes(precision: str, s: dict, seconds: float) -> list[str]:
    d = s.get("delegation") or {}
    what = {"fp32": "FP32 weights and arithmetic",
            "fp16": "FP16 weights and arithmetic behind float32 inputs/outputs (casts at the edges); XNNPACK runs FP16 "
                    "natively on ARMv8.2+ cores",
            "dynamic": "dynamic INT8: Linear weights int8 per channel, activations quantized on the fly per run",
            "int8": f"static INT8 (PT2E, XNNPACKQuantizer): {s.get('weights')} weights, activations {s.get('activations')}, "
                    f"calibrated on {s.get('calibration_samples_used')} samples; {100 * s.get('int8_weight_share', 0):.1f} % "
                    "of the weights int8"}
    notes = [f"converted in {seconds:.1f} s with {_converter_version()}",
             f"device runtime: ExecuTorch >= {runtime_version()} with the XNNPACK backend "
             f"({d.get('xnnpack_partitions', '?')} partition(s)); ops on portable kernels: "
             f"{', '.join(d.get('ops_outside_xnnpack') or []) or 'none'}",
             what[precision]]
    if s.get("prelu_rewritten"):
        notes.append(f"{s['prelu_rewritten']} PReLU(s) on 2-D/3-D tensors written as relu(x) - w * relu(-x) (ExecuTorch "
                     "1.5.1's XNNPACK layout pass cannot lower them)")
    for layer, nodes in (s.get("float_layers_kept") or {}).items():
        notes.append(f"float layer {layer}: torch ops {', '.join(nodes)}")
    if precision == "int8" and s.get("int8_weight_share", 1.0) < INT8_NAMING_SHARE and not s.get("float_layers"):
        notes.append(f"named _int8_mixed: only {100 * s['int8_weight_share']:.1f} % of the weights are int8 (the "
                     "XNNPACK quantizer has no int8 pattern for the rest: embeddings, attention's matmuls, norms)")
    if s.get("runtime_checked"):
        notes.append("loaded and ran once in the ExecuTorch runtime after conversion")
    notes.append(f"host check: ExecuTorch {_version('executorch')} Python runtime (portable kernels + XNNPACK), "
                 "x86-64; latency times execute() only")
    return notes
