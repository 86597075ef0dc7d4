"""Readers that turn a data source string into a SampleSet.

Sources: ``digits`` / ``digits:train`` / ``digits:test`` (scikit-learn's built-in digits, no download),
a ``.npy`` file (inputs), a ``.npz`` file (inputs by input name or ``x``/``inputs``, labels as ``y`` or
``labels``), or an image folder (class sub-folders give labels; a flat folder has none).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet, sample_shape
from edgebuild.calibration.npy import read_npy, read_npz  # noqa: F401 (re-exported: the safe readers)
from edgebuild.errors import BadInputError
from edgebuild.specs import InputSpec, PreprocessSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
LABEL_KEYS = ("labels", "label", "y", "targets")
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN = 1000  # of 1797; the rest is the held-out test split
log = logging.getLogger("edgebuild.data")


def digits(split: str = "all") -> SampleSet:
    """scikit-learn's 8x8 digits (ships with the package), scaled to [0, 1], NCHW [N, 1, 8, 8]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(x))
    idx = {"all": np.arange(len(x)), "train": np.sort(perm[:DIGITS_TRAIN]), "test": np.sort(perm[DIGITS_TRAIN:])}
    if split not in idx:
        raise BadInputError(f"unknown digits split {split!r}; use digits, digits:train or digits:test")
    i = idx[split]
    return SampleSet(f"digits:{split}", {"input": x[i]}, y[i],
                          {"source": f"digits:{split}", "classes": [str(c) for c in range(10)]})


def load_source(source: str, inputs: tuple[InputSpec, ...], pre: PreprocessSpec) -> SampleSet:
    """Read ``source`` and fit it to the model's inputs (names, per-sample shape, dtype, layout)."""
    if source == "digits" or source.startswith("digits:"):
        data = digits(source.partition(":")[2] or "all")
    else:
        path = Path(source)
        if not path.exists():
            raise BadInputError(f"data source not found: {source}")
        if path.is_dir():
            data = _image_folder(path, _image_preprocessing(path, inputs, pre))
        elif path.suffix == ".npy":
            data = _npy(path)
        elif path.suffix == ".npz":
            data = _npz(path, inputs)
        else:
            raise BadInputError(f"{source}: unsupported data source (use an image folder, .npy, .npz or digits)")
    return fit_to_inputs(data, inputs)


@dataclass
class RawData:
    """Arrays as a source holds them, before they are fitted to the model's inputs (counts may differ:
    a single value or a single sample is broadcast to every sample)."""

    name: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    origin: dict = field(default_factory=dict)


def _npy(path: Path) -> RawData:
    return RawData(path.name, {"input": read_npy(path)}, None, {"source": str(path)})


def _npz(path: Path, inputs: tuple[InputSpec, ...]) -> RawData:
    arrays = read_npz(path)
    names = [i.name for i in inputs]
    boxes = arrays.pop("boxes") if "boxes" in arrays and "boxes" not in names else None
    label_key = next((k for k in LABEL_KEYS if k in arrays and k not in names), None)
    labels = arrays.pop(label_key) if label_key else None
    if names and all(n in arrays for n in names):
        x = {n: arrays[n] for n in names}
    elif len(arrays) == 1 or any(k in arrays for k in ("x", "inputs", "input")):
        key = next((k for k in ("x", "inputs", "input") if k in arrays), next(iter(arrays), None))
        if key is None:
            raise BadInputError(f"{path}: holds no arrays")
        x = {"input": arrays[key]}
        if len(names) > 1:
            missing = [n for n in names if n not in arrays]
            raise BadInputError(f"{path}: the model has inputs {names}; name the arrays after them "
                                f"(missing: {missing}; the file has {sorted(arrays)})")
    else:
        raise BadInputError(f"{path}: cannot tell which arrays are inputs; name them after the model inputs {names} or 'x' "
                            f"(the file has {sorted(arrays)})")
    if boxes is not None:
        if labels is not None:
            raise BadInputError(f"{path}: give either class labels or detection boxes, not both")
        labels = _boxes(path, boxes)
    elif labels is not None:
        labels = _labels(path, labels)
    return RawData(path.name, x, labels, {"source": str(path)})


def _boxes(path: Path, boxes: np.ndarray) -> np.ndarray:
    """Ground-truth detections ``[N, K, 5]``: class, x1, y1, x2, y2 per box, rows with class -1 are padding."""
    if boxes.dtype.kind not in "iuf" or boxes.ndim != 3 or boxes.shape[2] != 5:
        raise BadInputError(f"{path}: boxes must be a numeric [samples, boxes, 5] array (class, x1, y1, x2, y2; "
                            f"class -1 pads), got {boxes.dtype} {list(boxes.shape)}")
    if not np.isfinite(boxes).all():
        raise BadInputError(f"{path}: boxes hold NaN or Inf")
    return boxes.astype(np.float64)


def _labels(path: Path, labels: np.ndarray) -> np.ndarray:
    if labels.dtype.kind not in "biuf":
        raise BadInputError(f"{path}: labels must be class indices (or one-hot), got {labels.dtype} values")
    if labels.ndim == 0:
        raise BadInputError(f"{path}: labels must have one entry per sample, got a single value")
    if labels.ndim == 2 and labels.shape[1] > 1:  # one-hot
        labels = labels.argmax(1)
    elif labels.ndim > 1:
        labels = labels.reshape(len(labels), -1)[:, 0]
    if not np.issubdtype(labels.dtype, np.integer) and not np.all(np.mod(labels, 1) == 0):
        raise BadInputError(f"{path}: labels must be class indices (or one-hot), got {labels.dtype} values")
    return labels.astype(np.int64)


def _image_preprocessing(root: Path, inputs: tuple[InputSpec, ...], pre: PreprocessSpec) -> PreprocessSpec:
    """An image folder feeds the model's one input; scaling and normalisation apply to float inputs only
    (an integer image input gets the raw pixel values in its dtype)."""
    if len(inputs) > 1:
        raise BadInputError(f"{root}: an image folder gives one input, the model has {len(inputs)} "
                            f"({[i.name for i in inputs]}); give a .npz keyed by input name")
    if pre.resize is None and inputs:
        size = model_image_size(inputs[0])
        if size:
            pre = replace(pre, resize=size)  # images of any size fit the model (preprocess.resize overrides)
    if inputs and np.dtype(inputs[0].dtype).kind != "f":
        return replace(pre, scale=1.0, mean=(), std=(), dtype=inputs[0].dtype)
    return pre


def model_image_size(spec: InputSpec) -> tuple[int, int] | None:
    """(height, width) of an image input [1, C, H, W] (NCHW) or [1, H, W, C] (NHWC); None when not an image."""
    shape = tuple(spec.shape or ())
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    h, w = (shape[1], shape[2]) if spec.layout == "NHWC" else (shape[2], shape[3])
    return (h, w)


IN_MEMORY_BYTES = 256 << 20  # decoded image folders larger than this live in a disk-backed array


def _image_folder(root: Path, pre: PreprocessSpec) -> RawData:
    """Every image of the folder decoded one at a time (EXIF orientation applied) into one array — in memory when
    small, else disk-backed (an anonymous temporary file, mapped), so memory does not grow with the folder."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes:
        files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise BadInputError(f"{root}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    first = _read_image(files[0][0], pre)
    stacked = _allocate((len(files), *first.shape), first.dtype)
    stacked[0] = first
    for i, (f, _) in enumerate(files[1:], 1):
        a = _read_image(f, pre)
        if a.shape != first.shape:
            raise BadInputError(f"{root}: images have different sizes ({files[0][0].name}: {list(first.shape)}, "
                                f"{f.name}: {list(a.shape)}); set preprocess.resize")
        stacked[i] = a
    labels = np.array([c for _, c in files], dtype=np.int64) if classes else None
    origin = {"source": str(root), "classes": classes} if classes else {"source": str(root)}
    if pre.resize:
        origin["resize"] = list(pre.resize)
    if isinstance(stacked, np.memmap):
        origin["disk_backed"] = True
    log.debug("%s: %d images, %d classes, samples %s%s", root, len(files), len(classes), list(first.shape),
              " (disk-backed)" if isinstance(stacked, np.memmap) else "")
    return RawData(root.name, {"input": stacked}, labels, origin)


def _allocate(shape: tuple[int, ...], dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes <= IN_MEMORY_BYTES:
        return np.empty(shape, dtype)
    import tempfile

    from edgebuild.procs import tempdir

    with tempfile.TemporaryFile(prefix="edgebuild-images-", dir=tempdir()) as f:  # unlinked; lives as long as the mapping
        return np.memmap(f, dtype=dtype, mode="w+", shape=shape)


def _read_image(path: Path, pre: PreprocessSpec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return preprocess_image(im, pre)
    except (UnidentifiedImageError, OSError) as e:
        raise BadInputError(f"{path}: cannot read image ({e})") from None


def preprocess_image(im, pre: PreprocessSpec) -> np.ndarray:
    """PIL image -> float array [C, H, W] or [H, W, C] following the preprocessing spec: EXIF orientation, colour,
    centre crop, resize (with the spec's interpolation), scale, mean/std, layout."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)  # a phone photo taken upright is upright
    im = im.convert("L" if pre.color == "gray" else "RGB")
    if pre.crop:
        im = im.crop(center_box(im.size, pre.crop, pre.resize))
    if pre.resize:
        im = im.resize((pre.resize[1], pre.resize[0]), resample=getattr(Image.Resampling, pre.interpolation.upper()))
    a = np.asarray(im, dtype=np.float32)
    a = a[:, :, None] if a.ndim == 2 else a
    if pre.color == "bgr":
        a = a[:, :, ::-1]
    if pre.scale != 1.0:
        a = a * pre.scale
    if pre.mean:
        a = a - np.asarray(pre.mean, dtype=np.float32)
    if pre.std:
        a = a / np.asarray(pre.std, dtype=np.float32)
    if pre.layout == "NCHW":
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(np.round(a) if np.dtype(pre.dtype).kind != "f" else a, dtype=pre.dtype)


def center_box(size: tuple[int, int], fraction: float, out_hw: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """The centred (left, top, right, bottom) box ``fraction`` of the shorter side tall or wide, at the aspect
    ratio of ``out_hw`` (square when None): ImageNet's 0.875 is 224 of 256."""
    w, h = size
    aspect = out_hw[1] / out_hw[0] if out_hw else 1.0  # width / height
    ch = min(h, w / aspect) * fraction
    cw = ch * aspect
    left, top = round((w - cw) / 2), round((h - ch) / 2)
    return left, top, max(left + 1, round(left + cw)), max(top + 1, round(top + ch))


def fit_to_inputs(data: RawData | SampleSet, inputs: tuple[InputSpec, ...]) -> SampleSet:
    """Fit the arrays of a source to the model's inputs: match names, lay each sample out as the input
    without its batch axis (see ``SampleSet``), check the values and cast to the input dtype.

    Per input, an array may hold N samples with or without the batch axis (``(N, 2, 128)`` or
    ``(N, 2, 1, 128)`` for a state ``[2, 1, 128]``; ``(N,)`` for a 0-d scalar), images in the other layout
    (NCHW <-> NHWC), flattened samples, or a single sample / single value used for every sample."""
    source = data.origin.get("source", data.name)
    if not inputs:
        return SampleSet(data.name, {k: _values(source, k, v, v.dtype) for k, v in data.inputs.items()},
                              data.labels, data.origin)
    if all(i.name in data.inputs for i in inputs):
        arrays = {i.name: data.inputs[i.name] for i in inputs}
    elif len(inputs) == 1 and len(data.inputs) == 1:
        arrays = {inputs[0].name: next(iter(data.inputs.values()))}
    else:
        missing = [i.name for i in inputs if i.name not in data.inputs]
        raise BadInputError(f"{source}: no data for model input(s) {missing}; arrays are {sorted(data.inputs)}")
    fitted, single = {}, []
    for spec in inputs:
        a = np.asarray(arrays[spec.name])
        _check_kind(source, spec.name, a)
        fitted[spec.name], one = _layout(source, spec, a)
        if one or len(fitted[spec.name]) == 1:
            single.append(spec.name)
    counts = {k: len(v) for k, v in fitted.items() if k not in single}
    n = max(counts.values(), default=1)
    if len(set(counts.values())) > 1:
        raise BadInputError(f"{source}: inputs have different sample counts {counts}")
    origin = dict(data.origin)
    for k in single:
        if len(fitted[k]) != n:
            fitted[k] = np.repeat(fitted[k], n, axis=0)
    if single and n > 1:
        origin["broadcast"] = single  # one value used for every sample
    out = {spec.name: _values(source, spec.name, fitted[spec.name], np.dtype(spec.dtype)) for spec in inputs}
    if data.labels is not None and len(data.labels) != n:
        raise BadInputError(f"{source}: {len(data.labels)} labels for {n} samples")
    if n == 0:
        raise BadInputError(f"{source}: holds no samples")
    return SampleSet(data.name, out, data.labels, origin, {i.name: tuple(i.shape) for i in inputs})


def _check_kind(source: str, name: str, a: np.ndarray) -> None:
    if a.dtype.kind == "c":
        raise BadInputError(f"{source}: input {name} holds complex values ({a.dtype}); edgebuild never drops the "
                            "imaginary part silently: give real data (e.g. np.abs, or real and imaginary as channels)")
    if a.dtype.kind not in "biuf":
        raise BadInputError(f"{source}: input {name} holds {a.dtype} values, not numbers")


def _layout(source: str, spec: InputSpec, a: np.ndarray) -> tuple[np.ndarray, bool]:
    """``a`` as ``[N, *sample shape]``, and whether it was a single sample (to broadcast)."""
    full, want = tuple(spec.shape), sample_shape(spec.shape)
    squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731 - size-1 axes carry no data
    got = a.shape[1:] if a.ndim else None
    if got == want:
        return a, False
    if got == full or (got is not None and squeeze(got) == squeeze(want)):
        return a.reshape((len(a), *want)), False
    if got is not None and a.ndim == 4 and len(want) == 3 and np.dtype(spec.dtype).kind == "f":
        if got == (want[2], want[0], want[1]):  # NCHW data, NHWC model
            return a.transpose(0, 2, 3, 1), False
        if got == (want[1], want[2], want[0]):  # NHWC data, NCHW model
            return a.transpose(0, 3, 1, 2), False
    if a.shape in (want, full) or (a.ndim <= len(want) and squeeze(a.shape) == squeeze(want)):
        return a.reshape((1, *want)), True  # one sample (or one scalar) for every sample
    flat = lambda s: len(squeeze(s)) <= 1  # noqa: E731
    if got is not None and int(np.prod(got)) == int(np.prod(want)) and (flat(got) or flat(want)):
        return a.reshape((len(a), *want)), False  # flattened samples, or flat data for an image input
    shapes = [f"(N, {', '.join(map(str, want))})" if want else "(N,)"]
    if full != want:
        shapes.append(f"(N, {', '.join(map(str, full))})")
    shapes.append(f"one {list(full)} array for all samples" if full else "one scalar for all samples")
    raise BadInputError(f"{source}: samples of shape {list(got if got is not None else a.shape)} do not fit input "
                        f"{spec.name} of shape {list(full)} ({spec.dtype}); give {' or '.join(shapes)}")


def _values(source: str, name: str, a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast ``a`` to ``dtype`` only where no value changes meaning: no NaN/Inf anywhere, whole numbers in
    range for integer inputs, 0/1 for bool inputs."""
    _check_kind(source, name, a)
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            first = int(np.argmax(bad.reshape(len(a), -1).any(1))) if a.ndim else 0
            raise BadInputError(f"{source}: input {name} has {int(bad.sum())} NaN/Inf value(s) (first in sample {first}); "
                                "clean or drop those samples")
    if dtype.kind == "b":
        if a.dtype.kind != "b" and not np.isin(a, (0, 1)).all():
            raise BadInputError(f"{source}: input {name} is bool; its data must be 0/1 or bool")
    elif dtype.kind in "iu":
        if a.dtype.kind == "f" and not np.all(np.mod(a, 1) == 0):
            raise BadInputError(f"{source}: input {name} is {dtype} and is never normalised or quantized; "
                                "its data must be whole numbers, not fractions")
        info = np.iinfo(dtype)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise BadInputError(f"{source}: input {name} is {dtype}; values {a.min()}..{a.max()} do not fit")
    out = np.ascontiguousarray(a.astype(dtype, copy=False))
    if dtype.kind == "f" and out.size and not np.isfinite(out).all():
        raise BadInputError(f"{source}: input {name} overflows {dtype} (values up to {np.abs(a).max():.3g})")
    return out
