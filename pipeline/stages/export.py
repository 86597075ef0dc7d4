"""Stage: the loaded model -> one checked, simplified FP32 ONNX file (the input of every backend).

Torch modules and TorchScript go through the TorchScript-based exporter at opset 17 (fast, and the opset
every converter downstream handles); a torch.export program (.pt2) can only go through the dynamo exporter
(opset 18). ONNX sources are fixed to batch 1 and, below opset 13, upgraded to 13 (per-channel QDQ needs it).
Every export is verified against torch on evaluation feeds; the fidelity is recorded.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import warnings
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline.cache import file_hash  # noqa: F401 (re-exported: the hash of a model file)
from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.pipeline.stages.load import LoadedModel
from edgebuild.pipeline.stages.onnx_file import (  # noqa: F401 (re-exported: checks of an ONNX file)
    check_onnx,
    input_shape,
    raise_ir_version,
    upgrade_legacy_onnx,
)
from edgebuild.similarity import cosine
from edgebuild.targets.base import ExportedModel, TensorInfo

TORCH_OPSET, MIN_OPSET = 17, 13
FIDELITY_SAMPLES = 64
MIN_EXPORT_COSINE = 0.9999
log = logging.getLogger("edgebuild.export")


# torch's exporters keep process-global state (torch.onnx's GLOBALS.in_onnx_export: two exports at once in one process
# fail with "GLOBALS.in_onnx_export must be False"), and warnings.catch_warnings swaps the process's warning filters
# (two at once can leave "ignore" behind): one export at a time per process. Builds in threads of one process wait
# for each other's export only; their results are what each gives alone.
TORCH_EXPORT = threading.Lock()

def export_onnx(loaded: LoadedModel, evalset: SampleSet, workdir: Path,
                calib: SampleSet | None = None) -> tuple[ExportedModel, dict]:
    """Write ``workdir/model_fp32.onnx``; return it as a ExportedModel plus an export record for the manifest."""
    import onnx

    out = workdir / "model_fp32.onnx"
    record: dict = {"source": loaded.description}
    if loaded.kind == "onnx":
        model = onnx.load(str(loaded.onnx_path))
        model, notes, frozen = _normalize_onnx(model, loaded, [evalset, calib])
        record.update(exporter="none (ONNX source)", notes=notes)
        if frozen:
            record["frozen_inputs"] = frozen
    else:
        model, exporter = _export_torch(loaded, workdir)
        record["exporter"] = exporter
    model, record["simplifier"] = _keep_inputs(model, *_simplify(model))
    note = check_onnx(model, "exported ONNX")
    if note:
        record.setdefault("notes", []).append(note)
    onnx.save(model, str(out))
    record["opset"] = _opset(model)
    inputs, outputs = _io(model, loaded)
    mi = ExportedModel(out, inputs, outputs, record["opset"], file_hash(out))
    log.debug("FP32 ONNX: %s, opset %s, outputs %s, sha256 %s", record.get("exporter"), record["opset"],
              ", ".join(f"{o.name} {list(o.shape)}" for o in outputs), mi.content_hash)
    if loaded.module is not None:
        record["fidelity_vs_torch"] = _fidelity(loaded, out, evalset)
    return mi, record


def export_program(loaded: LoadedModel, model: ExportedModel, workdir: Path) -> tuple[ExportedModel, dict]:
    """For backends that consume a torch.export program (``Backend.consumes``): ``workdir/model_fp32.pt2`` of a
    torch source (a .pt2 source's own program; an nn.Module exported at the input shapes, ``strict=False``), as
    ``model.program``. When torch.export cannot capture the model, ``program_error`` says why (only those targets
    fail). Returns the model and a record for the manifest."""
    import torch

    out = workdir / "model_fp32.pt2"
    try:
        ep = loaded.exported_program
        if ep is None:
            if isinstance(loaded.module, torch.jit.ScriptModule):
                raise ConversionError("a TorchScript model cannot be captured by torch.export; give the nn.Module "
                                      "(package.module:attr) or a torch.export .pt2 program")
            args = tuple(torch.zeros(i.shape, dtype=getattr(torch, i.dtype)) for i in loaded.inputs)
            with TORCH_EXPORT, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(loaded.module, args, strict=False)
        with TORCH_EXPORT:
            torch.export.save(ep, str(out))
    except Exception as e:  # noqa: BLE001 — torch.export raises many types; it fails only the targets that need it
        error = f"torch.export failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:240]}"
        return dataclasses.replace(model, program_error=error), {"torch_export": error}
    return (dataclasses.replace(model, program=out),
            {"torch_export": f"torch.export (torch {torch.__version__}), {out.stat().st_size} bytes"})


def _export_torch(loaded: LoadedModel, workdir: Path):
    import onnx
    import torch

    names = [i.name for i in loaded.inputs]
    args = tuple(torch.zeros(i.shape, dtype=getattr(torch, i.dtype)) for i in loaded.inputs)
    outputs = output_names(loaded, _dry_run(loaded, args))
    tmp = workdir / "_export.onnx"
    try:
        with TORCH_EXPORT, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if loaded.exported_program is not None:
                torch.onnx.export(loaded.exported_program, args, str(tmp), dynamo=True, input_names=names,
                                  output_names=outputs, external_data=False, verbose=False)
                exporter = f"torch.onnx dynamo (torch {torch.__version__})"
            else:
                torch.onnx.export(loaded.module, args, str(tmp), dynamo=False, opset_version=TORCH_OPSET,
                                  input_names=names, output_names=outputs, do_constant_folding=True)
                exporter = f"torch.onnx TorchScript-based (torch {torch.__version__})"
    except Exception as e:
        raise ConversionError(f"torch -> ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:240]}") from e
    model = onnx.load(str(tmp))
    tmp.unlink()
    return model, exporter


def output_names(loaded: LoadedModel, result) -> list[str]:
    """Names of the exported outputs: ``output_names`` of the spec, else what forward's return says — a dict's keys,
    a namedtuple's fields, ``output`` for one tensor, ``output_<i>`` for a tuple (never the tracer's "37")."""
    import torch

    leaves = [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
    if loaded.output_names:
        if len(loaded.output_names) != len(leaves):
            raise BadInputError(f"output_names names {len(loaded.output_names)} output(s) "
                                f"({', '.join(loaded.output_names)}); the model returns {len(leaves)} tensor(s)")
        return list(loaded.output_names)
    if isinstance(result, torch.Tensor):
        return ["output"]
    if isinstance(result, dict) and len(result) == len(leaves) and all(isinstance(k, str) for k in result):
        return [str(k) for k in result]
    fields = getattr(result, "_fields", None)
    if fields and len(fields) == len(leaves):
        return list(fields)
    return [f"output_{i}" for i in range(len(leaves))]


def _dry_run(loaded: LoadedModel, args):
    """One forward pass on zeros of the given input shapes (its result names the outputs): a model that cannot
    take them is bad input (a wrong --input-shape), said in one line before the exporter's trace."""
    import torch

    try:
        with TORCH_EXPORT, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loaded.module(*args)
    except Exception as e:
        given = ", ".join(f"{i.name} {list(i.shape)} {i.dtype}" for i in loaded.inputs)
        raise BadInputError(f"the model does not run on the given input(s) {given}: {type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:200]} (check --input-shape / inputs in edgebuild.yaml)") from None


def _normalize_onnx(model, loaded: LoadedModel, datasets=()):
    from onnx import shape_inference, version_converter

    from edgebuild.pipeline.stages.specialize import specialize_constant_ifs

    ir = model.ir_version
    model, notes = upgrade_legacy_onnx(model)
    model, frozen, more = specialize_constant_ifs(model, datasets)  # before the sizes are fixed: see below
    notes += more
    shapes = {i.name: i.shape for i in loaded.inputs}
    unfixed = onnx_copy(model)
    for gi in model.graph.input:
        if gi.name in shapes:
            dims = gi.type.tensor_type.shape.dim
            while len(dims) < len(shapes[gi.name]):
                dims.add()
            for d, v in zip(dims, shapes[gi.name]):
                if not d.HasField("dim_value") or d.dim_value != v:
                    d.Clear()
                    d.dim_value = v
    for go in model.graph.output:  # outputs follow from the inputs; drop stale symbolic dims
        for d in go.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.Clear()
    reason = _ort_refuses(model)
    if reason and not _ort_refuses(unfixed):
        # onnxruntime infers shapes of both branches of an If statically: with fixed input sizes an untaken branch
        # (e.g. a VAD's 8 kHz path on 16 kHz chunks) can become invalid. The inputs then keep their symbolic
        # sizes in the graph; every feed still has the declared shape.
        model = unfixed
        notes.append(f"input sizes kept symbolic in the graph: fixing them makes onnxruntime refuse it ({reason})")
    opset = _opset(model)
    if opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise ConversionError(f"cannot upgrade ONNX opset {opset} to {MIN_OPSET}: {str(e).splitlines()[0]}") from e
        notes.append(f"opset upgraded {opset} -> {MIN_OPSET} (per-channel QDQ needs >= 13)")
        model, _ = raise_ir_version(model)
    if model.ir_version != ir:  # one note for the whole upgrade
        notes = [f"IR version upgraded {ir} -> {model.ir_version}"] + [n for n in notes if not n.startswith("IR version")]
    model = shape_inference.infer_shapes(model)
    return model, notes, frozen


def onnx_copy(model):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _ort_refuses(model) -> str | None:
    """onnxruntime's one-line reason for refusing to load ``model``, or None when it loads."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        return str(e).strip().splitlines()[0][:200]
    return None



def _simplify(model):
    try:
        import onnxslim
    except ImportError:
        return model, "none (onnxslim not installed)"
    try:
        return onnxslim.slim(model), f"onnxslim {onnxslim.__version__}"
    except Exception as e:  # simplification is an optimization; the unsimplified graph is still correct
        return model, f"onnxslim failed, graph kept as exported ({type(e).__name__})"


def _keep_inputs(before, after, simplifier: str):
    """The simplifier drops inputs the graph no longer reads (a frozen ``sr``); the interface keeps them."""
    have = {i.name for i in after.graph.input}
    if all(i.name in have for i in before.graph.input):
        return after, simplifier
    by_name = {i.name: i for i in after.graph.input}
    inputs = [by_name.get(i.name, i) for i in before.graph.input] + [i for i in after.graph.input
                                                                      if i.name not in {j.name for j in before.graph.input}]
    del after.graph.input[:]
    after.graph.input.extend(inputs)
    return after, simplifier


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _io(model, loaded: LoadedModel):
    import onnx

    layouts = {i.name: i.layout for i in loaded.inputs}
    init = {i.name for i in model.graph.initializer}

    def info(v, layout="ANY"):
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorInfo(v.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, layout)

    declared = {i.name: tuple(i.shape) for i in loaded.inputs}
    inputs = tuple(info(v, layouts.get(v.name, "ANY")) for v in model.graph.input if v.name not in init)
    inputs = tuple(dataclasses.replace(i, shape=declared.get(i.name, i.shape)) if -1 in i.shape else i for i in inputs)
    if [i.name for i in inputs] != [i.name for i in loaded.inputs]:
        raise BadInputError(f"model inputs are {[i.name for i in inputs]}, the build spec names {[i.name for i in loaded.inputs]}")
    return inputs, tuple(info(v) for v in model.graph.output)


def _fidelity(loaded: LoadedModel, onnx_path: Path, evalset: SampleSet) -> dict:
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst_cos, worst_err = 1.0, 0.0
    n = min(len(evalset), FIDELITY_SAMPLES)
    with torch.no_grad():
        for i in range(n):
            feed = evalset.feed(i)
            ref = loaded.module(*[torch.from_numpy(feed[s.name]) for s in loaded.inputs])
            ref = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
            got = sess.run(None, feed)
            for r, g in zip(ref, got):
                r, g = r.numpy().ravel().astype(np.float64), np.asarray(g).ravel().astype(np.float64)
                worst_err = max(worst_err, float(np.abs(r - g).max()))
                worst_cos = min(worst_cos, cosine(r, g))
    if worst_cos < MIN_EXPORT_COSINE:
        raise ConversionError(f"the exported ONNX disagrees with torch (cosine {worst_cos:.5f}, max abs error {worst_err:.3g})")
    return {"samples": n, "min_cosine": worst_cos, "max_abs_error": worst_err}
