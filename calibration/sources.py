"""Readers that turn a data source string into a CalibrationSet.

Sources: ``digits`` / ``digits:train`` / ``digits:test`` (scikit-learn's built-in digits, no download),
a ``.npy`` file (inputs), a ``.npz`` file (inputs by input name or ``x``/``inputs``, labels as ``y`` or
``labels``), or an image folder (class sub-folders give labels; a flat folder has none).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import CalibrationSet
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import InputSpec, PreprocessSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
LABEL_KEYS = ("labels", "label", "y", "targets")
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN = 1000  # of 1797; the rest is the held-out test split


def digits(split: str = "all") -> CalibrationSet:
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
    return CalibrationSet(f"digits:{split}", {"input": x[i]}, y[i], {"source": f"digits:{split}"})


def load_source(source: str, inputs: tuple[InputSpec, ...], pre: PreprocessSpec) -> CalibrationSet:
    """Read ``source`` and fit it to the model's inputs (names, per-sample shape, dtype, layout)."""
    if source == "digits" or source.startswith("digits:"):
        data = digits(source.partition(":")[2] or "all")
    else:
        path = Path(source)
        if not path.exists():
            raise BadInputError(f"data source not found: {source}")
        if path.is_dir():
            data = _image_folder(path, pre)
        elif path.suffix == ".npy":
            data = _npy(path)
        elif path.suffix == ".npz":
            data = _npz(path, inputs)
        else:
            raise BadInputError(f"{source}: unsupported data source (use an image folder, .npy, .npz or digits)")
    return fit_to_inputs(data, inputs)


def _npy(path: Path) -> CalibrationSet:
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BadInputError(f"{path}: not a readable .npy file ({e})") from None
    return CalibrationSet(path.name, {"input": x}, None, {"source": str(path)})


def _npz(path: Path, inputs: tuple[InputSpec, ...]) -> CalibrationSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise BadInputError(f"{path}: not a readable .npz file ({e})") from None
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    labels = arrays.pop(label_key) if label_key else None
    names = [i.name for i in inputs]
    if names and all(n in arrays for n in names):
        x = {n: arrays[n] for n in names}
    elif len(arrays) == 1 or any(k in arrays for k in ("x", "inputs", "input")):
        key = next((k for k in ("x", "inputs", "input") if k in arrays), next(iter(arrays)))
        x = {"input": arrays[key]}
    else:
        raise BadInputError(f"{path}: cannot tell which arrays are inputs; name them after the model inputs {names} or 'x'")
    if labels is not None:
        if labels.ndim == 2 and labels.shape[1] > 1:  # one-hot
            labels = labels.argmax(1)
        elif labels.ndim > 1:
            labels = labels.reshape(len(labels), -1)[:, 0]
        if not np.issubdtype(labels.dtype, np.integer) and not np.all(np.mod(labels, 1) == 0):
            raise BadInputError(f"{path}: labels must be class indices (or one-hot), got {labels.dtype} values")
        labels = labels.astype(np.int64)
    return CalibrationSet(path.name, x, labels, {"source": str(path)})


def _image_folder(root: Path, pre: PreprocessSpec) -> CalibrationSet:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes:
        files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise BadInputError(f"{root}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                arrays.append(preprocess_image(im, pre))
        except (UnidentifiedImageError, OSError) as e:
            raise BadInputError(f"{f}: cannot read image ({e})") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise BadInputError(f"{root}: images have different sizes {sorted(shapes)[:3]}; set preprocess.resize")
    labels = np.array([c for _, c in files], dtype=np.int64) if classes else None
    origin = {"source": str(root), "classes": classes} if classes else {"source": str(root)}
    return CalibrationSet(root.name, {"input": np.stack(arrays)}, labels, origin)


def preprocess_image(im, pre: PreprocessSpec) -> np.ndarray:
    """PIL image -> float array [C, H, W] or [H, W, C] following the preprocessing spec."""
    im = im.convert("L" if pre.color == "gray" else "RGB")
    if pre.resize:
        im = im.resize((pre.resize[1], pre.resize[0]))
    a = np.asarray(im, dtype=np.float32)
    a = a[:, :, None] if a.ndim == 2 else a
    if pre.color == "bgr":
        a = a[:, :, ::-1]
    a = a * pre.scale
    if pre.mean:
        a = a - np.asarray(pre.mean, dtype=np.float32)
    if pre.std:
        a = a / np.asarray(pre.std, dtype=np.float32)
    if pre.layout == "NCHW":
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(a, dtype=pre.dtype)


def fit_to_inputs(data: CalibrationSet, inputs: tuple[InputSpec, ...]) -> CalibrationSet:
    """Rename, reshape (NCHW<->NHWC, flatten) and cast samples to what the model expects."""
    if not inputs:
        return data
    if len(inputs) == 1 and len(data.inputs) == 1:
        arrays = {inputs[0].name: next(iter(data.inputs.values()))}
    else:
        missing = [i.name for i in inputs if i.name not in data.inputs]
        if missing:
            raise BadInputError(f"{data.name}: no data for model input(s) {missing}; arrays are {sorted(data.inputs)}")
        arrays = {i.name: data.inputs[i.name] for i in inputs}
    out = {}
    for spec in inputs:
        a, want = arrays[spec.name], tuple(spec.shape[1:])
        if want and a.shape[1:] != want:
            if a.ndim == 4 and a.shape[1:] == (want[2], want[0], want[1]):  # NCHW data, NHWC model
                a = a.transpose(0, 2, 3, 1)
            elif a.ndim == 4 and a.shape[1:] == (want[1], want[2], want[0]):  # NHWC data, NCHW model
                a = a.transpose(0, 3, 1, 2)
            elif int(np.prod(a.shape[1:])) == int(np.prod(want)):
                a = a.reshape((len(a),) + want)
            else:
                raise BadInputError(f"{data.name}: samples of shape {list(a.shape[1:])} do not fit input "
                                    f"{spec.name} of shape {list(spec.shape)}")
        out[spec.name] = np.ascontiguousarray(a.astype(spec.dtype, copy=False))
    return CalibrationSet(data.name, out, data.labels, data.origin)
