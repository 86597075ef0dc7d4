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
        model, _ = _raise_ir_version(model)
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


def upgrade_legacy_onnx(model):
    """Make an old ONNX file (IR < 4, weights listed as graph inputs or not, weights as Constant nodes)
    a model every tool downstream reads the way onnxruntime runs it; returns (model, notes of each change).
    The computation is unchanged: only the IR version and how the weights are declared."""
    model, notes = _raise_ir_version(model)
    graph = model.graph
    init = {i.name for i in graph.initializer}
    as_inputs = [i for i in graph.input if i.name in init]
    if as_inputs:  # IR >= 4: initializers are constants, not overridable inputs
        keep = [i for i in graph.input if i.name not in init]
        del graph.input[:]
        graph.input.extend(keep)
        notes.append(f"{len(as_inputs)} initializer(s) removed from the graph inputs (weights are constants, not inputs)")
    constants = [n for n in graph.node if n.op_type == "Constant" and len(n.attribute) == 1
                 and n.attribute[0].name == "value" and n.output[0] not in init]
    if constants:
        from onnx import numpy_helper

        for n in constants:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(n.attribute[0].t), n.output[0]))
        keep = [n for n in graph.node if not any(n is c for c in constants)]
        del graph.node[:]
        graph.node.extend(keep)
        notes.append(f"{len(constants)} Constant node(s) turned into initializers (weights quantize as weights)")
    return model, notes


def _raise_ir_version(model):
    from onnx import helper

    needed = max(4, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    if model.ir_version >= needed:
        return model, []
    old, model.ir_version = model.ir_version, needed
    return model, [f"IR version upgraded {old} -> {needed}"]


def check_onnx(model, what: str) -> str | None:
    """``onnx.checker`` first; a model the checker rejects but onnxruntime loads is accepted the way the
    runtime checks it (returns the note to record); a model neither accepts raises ConversionError."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
        return None
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
    try:
        import onnxruntime as ort

        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        raise ConversionError(f"{what} fails onnx.checker: {reason}") from None
    return f"onnx.checker: {reason} (onnxruntime loads and runs the model; accepted)"


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


# ---- dynamic input dimensions: by meaning, not by position -----------------------------------------------------

BATCH_NAME = r"(?i)^(n|b|bs|batch.*|.*_batch|num_samples)$"  # what a batch dimension is called (N, batch_size, ...)


def input_shape(path: Path, name: str, dims: list, spec, inputs: int) -> tuple[tuple[int, ...], list[str]]:
    """The shape an ONNX input is built at, from its graph ``dims`` (ints; names of symbolic dimensions, ``?`` when
    unnamed) and a note for each dimension taken from the data. A symbolic dimension is the batch (1 on the edge)
    when it is named like one (``N``, ``batch``, ``batch_size``) or, when none is, when it is the leading one. Any
    other symbolic dimension (an OCR model's image width) takes its size from the calibration and evaluation data,
    when every sample of them has the same; otherwise BadInputError names the dimension and the exact line to add.
    ``inputs``: how many inputs the model has (a single input reads a data file's only array)."""
    import re

    symbolic = [a for a, d in enumerate(dims) if isinstance(d, str)]
    named = [a for a in symbolic if re.match(BATCH_NAME, dims[a])]
    batch = set(named) if named else ({0} & set(symbolic))
    shape = [1 if a in batch else d for a, d in enumerate(dims)]
    rest = [a for a in symbolic if a not in batch]
    if not rest:
        return tuple(shape), []
    found, reason = _sizes_from_data(shape, rest, name, spec, inputs)
    if reason:
        a = rest[0]
        what = f"'{dims[a]}'" if dims[a] != "?" else "(unnamed)"
        hint = [found.get(x, _placeholder(dims[x], x)) if x in rest else d for x, d in enumerate(shape)]
        raise BadInputError(
            f"{path}: input {name} {_dims_text(dims)} has a dynamic dimension {what} on axis {a} that is not the batch "
            f"(only a leading or batch-named dimension is), and {reason}; give the size: in edgebuild.yaml "
            f"`input: {{name: {name}, shape: [{', '.join(map(str, hint))}]}}`, or "
            f"--input-shape {name}:{','.join(map(str, hint))}")
    shape = [found.get(a, d) for a, d in enumerate(shape)]
    notes = [f"input {name}: dimension {dims[a] if dims[a] != '?' else f'axis {a}'} = {found[a]}, from the data"
             for a in rest]
    log.info("%s; the batch (%s) is 1", "; ".join(notes), ", ".join(f"axis {a}" for a in sorted(batch)) or "none")
    return tuple(shape), notes


def _dims_text(dims: list) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


def _placeholder(dim: str, axis: int) -> str:
    return (dim if dim != "?" else f"AXIS{axis}").upper()


def _sizes_from_data(shape: list, rest: list[int], name: str, spec, inputs: int) -> tuple[dict[int, int], str | None]:
    """Sizes of the ``rest`` axes of ``shape`` that every sample of the build's data agrees on: ({axis: size}, None),
    or (the sizes the data suggests, why they cannot be taken)."""
    sources = [s for s in dict.fromkeys((spec.calib, spec.eval)) if s]
    if not sources:
        return {}, "there is no calibration or evaluation data to take it from"
    found: dict[int, int] = {}
    for source in sources:
        got, reason = _source_sizes(source, shape, rest, name, spec, inputs)
        if reason:
            return got, f"the data cannot fix it ({source}: {reason})"
        clash = {a: (found[a], v) for a, v in got.items() if a in found and found[a] != v}
        if clash:
            a, (was, now) = next(iter(clash.items()))
            return found, f"the data disagree on it ({sources[0]}: {was}, {source}: {now})"
        found.update(got)
    return found, None


def _source_sizes(source: str, shape: list, rest: list[int], name: str, spec, inputs: int):
    """({axis: size}, None) from one data source, read only as far as its arrays' headers and its images' sizes."""
    path = Path(source)
    if source == "digits" or source.startswith("digits:"):
        return _fit_sample((1, 8, 8), shape, rest)
    if path.is_dir():
        return _image_sizes(path, shape, rest, spec)
    if path.suffix in (".npy", ".npz") and path.is_file():
        sample = _array_sample_shape(path, name, inputs)
        if sample is None:
            return {}, "its arrays' shapes cannot be read for this input"
        return _fit_sample(sample, shape, rest)
    return {}, "it is not a data source edgebuild reads"


def _array_sample_shape(path: Path, name: str, inputs: int) -> tuple[int, ...] | None:
    """One sample's shape in a .npy file, or in the .npz member for input ``name`` (by name; ``x``/``inputs``/
    ``input`` or the only array for a single-input model), from the .npy header alone (no data read)."""
    import zipfile

    from numpy.lib import format as fmt

    def header(fh):
        version = fmt.read_magic(fh)
        shape = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)[0]
        return tuple(shape)[1:] if len(shape) else None

    try:
        if path.suffix == ".npy":
            with open(path, "rb") as fh:
                return header(fh)
        with zipfile.ZipFile(path) as zf:
            members = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
            key = name if name in members else next(
                (k for k in ("x", "inputs", "input") if k in members and inputs == 1), None)
            arrays = [k for k in members if k not in ("y", "labels", "label", "targets", "boxes")]
            key = key or (arrays[0] if inputs == 1 and len(arrays) == 1 else None)
            if key is None:
                return None
            with zf.open(members[key]) as fh:
                return header(fh)
    except Exception:  # a corrupt file: the data reader says what is wrong with it, in its own words, next
        return None


def _fit_sample(sample: tuple[int, ...], shape: list, rest: list[int]):
    """Line one sample's shape up with the input's ``shape`` (symbolic axes ``rest``): with its batch axis, without
    it, or without its size-1 axes; the one way that fits every fixed size gives the sizes."""
    batch = next((a for a, d in enumerate(shape) if d == 1), None)  # as a SampleSet stores a sample (dataset.py)
    ways = [list(range(len(shape)))]
    if batch is not None:
        ways.append([a for a in range(len(shape)) if a != batch])
    ways.append([a for a, d in enumerate(shape) if d != 1])
    fits = []
    for axes in ways:
        if len(axes) == len(sample) and all(shape[a] == v for a, v in zip(axes, sample) if a not in rest):
            got = {a: int(v) for a, v in zip(axes, sample) if a in rest}
            if len(got) == len(rest) and got not in fits:
                fits.append(got)
    if len(fits) == 1:
        return fits[0], None
    if not fits:
        return {}, f"samples of shape {list(sample)} do not line up with it"
    return fits[0], f"samples of shape {list(sample)} line up with it in {len(fits)} ways"


def _image_sizes(root: Path, shape: list, rest: list[int], spec):
    """An image folder: the symbolic height/width of an image input from ``preprocess.resize``, else from the
    images' size when every image has the same (read from the file headers)."""
    from edgebuild.calibration.sources import IMAGE_SUFFIXES

    if len(shape) != 4:
        return {}, f"an image folder feeds 4-D image inputs, this one is {len(shape)}-D"
    hw = (1, 2) if isinstance(shape[3], int) and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4) else (2, 3)
    if any(a not in hw for a in rest):
        return {}, "an image folder gives only an image's height and width"
    if spec.preprocess.resize:
        sizes = {tuple(spec.preprocess.resize)}
    else:
        from PIL import Image

        sizes = {}
        for f in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(f) as im:
                    sizes[(im.height, im.width)] = sizes.get((im.height, im.width), 0) + 1
            except Exception:  # an unreadable image: the data reader names it next
                continue
        if not sizes:
            return {}, "it holds no readable images"
    common = max(sizes, key=lambda s: sizes[s]) if isinstance(sizes, dict) else next(iter(sizes))
    got = {a: int(common[hw.index(a)]) for a in rest}
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in list(sizes)[:4]) + (", …" if len(sizes) > 4 else "")
        return got, f"its images have {len(sizes)} different sizes (height x width: {listed}; set preprocess.resize)"
    return got, None
