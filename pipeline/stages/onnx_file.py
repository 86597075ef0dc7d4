"""An ONNX file as a source: upgrading an old file, checking it as onnxruntime would, and the shape each of its
inputs is built at (dynamic dimensions by meaning, not by position). Used by loading (``load.py``: an ONNX
source) and by the export (``export.py``: every exported or normalised file); it imports neither."""
from __future__ import annotations

import logging
from pathlib import Path

from edgebuild.pipeline.errors import BadInputError, ConversionError

log = logging.getLogger("edgebuild.export")


def upgrade_legacy_onnx(model):
    """Make an old ONNX file (IR < 4, weights listed as graph inputs or not, weights as Constant nodes)
    a model every tool downstream reads the way onnxruntime runs it; returns (model, notes of each change).
    The computation is unchanged: only the IR version and how the weights are declared."""
    model, notes = raise_ir_version(model)
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


def raise_ir_version(model):
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
