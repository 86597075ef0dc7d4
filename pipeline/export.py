"""Stage: the loaded model -> one checked, simplified FP32 ONNX file (the input of every backend).

Torch modules and TorchScript go through the TorchScript-based exporter at opset 17 (fast, and the opset
every converter downstream handles); a torch.export program (.pt2) can only go through the dynamo exporter
(opset 18). ONNX sources are fixed to batch 1 and, below opset 13, upgraded to 13 (per-channel QDQ needs it).
Every export is verified against torch on evaluation feeds; the fidelity is recorded.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import CalibrationSet
from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.pipeline.sources import LoadedModel
from edgebuild.targets.base import ModelInput, TensorInfo

TORCH_OPSET, MIN_OPSET = 17, 13
FIDELITY_SAMPLES = 64
MIN_EXPORT_COSINE = 0.9999


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(loaded: LoadedModel, evalset: CalibrationSet, workdir: Path) -> tuple[ModelInput, dict]:
    """Write ``workdir/model_fp32.onnx``; return it as a ModelInput plus an export record for the manifest."""
    import onnx

    out = workdir / "model_fp32.onnx"
    record: dict = {"source": loaded.description}
    if loaded.kind == "onnx":
        model = onnx.load(str(loaded.onnx_path))
        model, notes = _normalize_onnx(model, loaded)
        record.update(exporter="none (ONNX source)", notes=notes)
    else:
        model, exporter = _export_torch(loaded, workdir)
        record["exporter"] = exporter
    model, record["simplifier"] = _simplify(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ConversionError(f"exported ONNX fails onnx.checker: {str(e).splitlines()[0]}") from e
    onnx.save(model, str(out))
    record["opset"] = _opset(model)
    inputs, outputs = _io(model, loaded)
    mi = ModelInput(out, inputs, outputs, record["opset"], loaded.module, file_hash(out))
    if loaded.module is not None:
        record["fidelity_vs_torch"] = _fidelity(loaded, out, evalset)
    return mi, record


def _export_torch(loaded: LoadedModel, workdir: Path):
    import onnx
    import torch

    names = [i.name for i in loaded.inputs]
    args = tuple(torch.zeros(i.shape, dtype=getattr(torch, i.dtype)) for i in loaded.inputs)
    tmp = workdir / "_export.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if loaded.exported_program is not None:
                torch.onnx.export(loaded.exported_program, args, str(tmp), dynamo=True, input_names=names,
                                  external_data=False, verbose=False)
                exporter = f"torch.onnx dynamo (torch {torch.__version__})"
            else:
                torch.onnx.export(loaded.module, args, str(tmp), dynamo=False, opset_version=TORCH_OPSET,
                                  input_names=names, do_constant_folding=True)
                exporter = f"torch.onnx TorchScript-based (torch {torch.__version__})"
    except Exception as e:
        raise ConversionError(f"torch -> ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:240]}") from e
    model = onnx.load(str(tmp))
    tmp.unlink()
    return model, exporter


def _normalize_onnx(model, loaded: LoadedModel):
    import onnx
    from onnx import version_converter

    notes = []
    shapes = {i.name: i.shape for i in loaded.inputs}
    for gi in model.graph.input:
        if gi.name in shapes:
            for d, v in zip(gi.type.tensor_type.shape.dim, shapes[gi.name]):
                if not d.HasField("dim_value") or d.dim_value != v:
                    d.Clear()
                    d.dim_value = v
    for go in model.graph.output:  # outputs follow from the inputs; drop stale symbolic dims
        for d in go.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.Clear()
    opset = _opset(model)
    if opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise ConversionError(f"cannot upgrade ONNX opset {opset} to {MIN_OPSET}: {str(e).splitlines()[0]}") from e
        notes.append(f"opset upgraded {opset} -> {MIN_OPSET} (per-channel QDQ needs >= 13)")
    model = onnx.shape_inference.infer_shapes(model)
    return model, notes


def _simplify(model):
    try:
        import onnxslim
    except ImportError:
        return model, "none (onnxslim not installed)"
    try:
        return onnxslim.slim(model), f"onnxslim {onnxslim.__version__}"
    except Exception as e:  # simplification is an optimization; the unsimplified graph is still correct
        return model, f"onnxslim failed, graph kept as exported ({type(e).__name__})"


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

    inputs = tuple(info(v, layouts.get(v.name, "ANY")) for v in model.graph.input if v.name not in init)
    if [i.name for i in inputs] != [i.name for i in loaded.inputs]:
        raise BadInputError(f"model inputs are {[i.name for i in inputs]}, the build spec names {[i.name for i in loaded.inputs]}")
    return inputs, tuple(info(v) for v in model.graph.output)


def _fidelity(loaded: LoadedModel, onnx_path: Path, evalset: CalibrationSet) -> dict:
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
                denom = np.linalg.norm(r) * np.linalg.norm(g)
                worst_cos = min(worst_cos, float(r @ g / denom) if denom else float(np.allclose(r, g)))
    if worst_cos < MIN_EXPORT_COSINE:
        raise ConversionError(f"the exported ONNX disagrees with torch (cosine {worst_cos:.5f}, max abs error {worst_err:.3g})")
    return {"samples": n, "min_cosine": worst_cos, "max_abs_error": worst_err}
