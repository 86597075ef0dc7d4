"""AdaRound for onnxruntime's static INT8: learned rounding of Conv/Gemm/MatMul weights onto onnxruntime's INT8 grid.

Nagel et al. 2020 ("Up or Down? Adaptive Rounding for Post-Training Quantization"): rounding every weight to the
nearest grid point is not what keeps a layer's output best; each weight gets a soft rounding variable (a rectified
sigmoid ``h(V)`` in [0, 1] added to ``floor(w / s)``), optimised to reconstruct the layer's FP32 output on its
calibration inputs, with a regulariser whose exponent is annealed so that every ``h`` ends at 0 or 1.

The result is an FP32 model whose optimised weights sit *exactly* on the grid onnxruntime's quantizer computes from
them: symmetric INT8, per channel (or per tensor), scale ``max|w| / qmax``. Each channel's largest ``|w|`` is kept
unchanged (so the scale is the same) and every other weight is ``k * scale`` with ``|k| <= qmax``; quantizing the
adjusted model with ``quantize_static`` then stores the learned integers (tests/targets/test_onnx_adaround.py).

The tflite backend runs it on the ONNX model before onnx2tf (targets/tflite/backend.py): TF's quantizer derives the
same grid (symmetric int8 +-127 per output channel), so the .tflite stores the learned integers too.

Layers are optimised one by one in graph order, each on the FP32 inputs it sees in the calibration samples; a layer
whose hard-rounded result reconstructs worse than nearest rounding keeps nearest rounding. (aimet-onnx implements the
same method, but it pins its own torch and CUDA stack: it does not fit requirements.lock.)
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's values)
ITERATIONS = 300  # optimisation steps per layer
BATCH = 8  # calibration samples per step
LR = 3e-2  # Adam on the rounding variables (10, 3e-2: 95 % of them binary after 300 steps on a small CNN)
# the rounding regulariser (mean over the weights) beside the output error normalised by nearest rounding's
REG_WEIGHT = 10.0
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed from ... to ...
WARMUP = 0.2  # share of the steps with reconstruction only
CAPTURE_ELEMENTS = 40_000_000  # layer inputs held at once (floats): fewer calibration samples for large activations
MAX_SAMPLES = 64
TIME_LIMIT = 120.0  # seconds of one conversion's AdaRound; the layers after it keep nearest rounding (recorded)
VALIDATION = 0.25  # share of the captured samples held back to check each layer's learned rounding


def weighted_layers(model, skip: set[str] = frozenset()) -> list:
    """The nodes AdaRound can adjust: Conv (not auto_pad), Gemm (transA=0) and MatMul (a 2-D constant B) with a
    constant weight read by no other node, in graph (topological) order."""
    import onnx

    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    inits = set(shapes)
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    out = []
    for n in model.graph.node:
        if n.name in skip or len(n.input) < 2 or n.input[1] not in inits or readers.get(n.input[1], 0) != 1:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv" and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            out.append(n)
        elif n.op_type == "Gemm" and not attrs.get("transA", 0):
            out.append(n)
        elif n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2:
            out.append(n)
    return out


def grid(w: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """onnxruntime's symmetric weight scale (quant_utils.compute_scale_zp): ``max|w| / qmax`` per channel along
    ``axis`` (None: per tensor), shaped to broadcast against ``w``; 1.0 where a channel is all zero."""
    if axis is None:
        absmax = np.abs(w).max(keepdims=True).astype(np.float64)
    else:
        absmax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis), keepdims=True).astype(np.float64)
    scale = (2 * absmax / (2 * qmax)).astype(w.dtype)
    return np.where(scale < np.finfo(w.dtype).tiny, np.ones_like(scale), scale)


def weight_axis(node) -> int:
    import onnx

    if node.op_type == "MatMul":  # onnxruntime's per-channel axis for a MatMul's B: its output columns
        return 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and onnx.helper.get_attribute_value(a) for a in node.attribute) else 1
    return 0


def _capture(model, layers: list, samples: SampleSet, workdir: Path,
             n: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Each layer's input in ``model`` on the first ``n`` samples (default: as many as CAPTURE_ELEMENTS allows), by
    tensor name, and that number of samples."""
    import onnx
    import onnxruntime as ort

    names = list(dict.fromkeys(n.input[0] for n in layers))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for t in names:
        if t not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    path = workdir / "_adaround_probe.onnx"
    onnx.save(probe, str(path))
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got: dict[str, list] = {t: [] for t in names}
        fixed = n is not None
        n = min(len(samples), MAX_SAMPLES) if n is None else n
        for i in range(n):
            res = sess.run(names, samples.feed(i))
            for t, v in zip(names, res):
                got[t].append(np.asarray(v, dtype=np.float32))
            if i == 0 and not fixed:
                per_sample = sum(int(v.size) for v in res)
                n = max(1, min(n, CAPTURE_ELEMENTS // max(per_sample, 1)))
            if i + 1 >= n:
                break
    finally:
        path.unlink(missing_ok=True)
    return {t: np.concatenate(v, axis=0) for t, v in got.items()}, n


def _layer_fn(node, attrs: dict, bias):
    """The layer as a torch function of (input, weight)."""
    import torch
    import torch.nn.functional as F

    if node.op_type == "MatMul":
        return lambda x, w: x @ w
    if node.op_type == "Gemm":
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        trans_b = bool(attrs.get("transB", 0))

        def gemm(x, w):
            y = alpha * (x.reshape(x.shape[0], -1) @ (w.t() if trans_b else w))
            return y if bias is None else y + beta * bias
        return gemm
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def convolve(x, w):
        k = w.ndim - 2
        pads = list(attrs.get("pads", [0] * (2 * k)))
        begin, end = pads[:k], pads[k:]
        if begin != end:  # asymmetric padding: pad first (F.pad takes the last axis first)
            x = F.pad(x, [p for i in reversed(range(k)) for p in (begin[i], end[i])])
            begin = [0] * k
        return conv[k](x, w, bias, stride=list(attrs.get("strides", [1] * k)), padding=begin,
                       dilation=list(attrs.get("dilations", [1] * k)), groups=int(attrs.get("group", 1)))
    return convolve


def _round_layer(fn, x: np.ndarray, xq: np.ndarray, w: np.ndarray, scale: np.ndarray, qmax: int, iterations: int,
                 rng) -> tuple:
    """The rounding that makes the layer, fed ``xq`` (its input with the layers before it already rounded), reproduce
    its FP32 output on ``x`` (the FP32 input): Nagel et al.'s asymmetric reconstruction, which also absorbs the
    error of the layers before. Returns the learned integers of one layer (same shape as ``w``) and the output MSE
    of nearest and of learned rounding
    on the held-back part of the samples (VALIDATION of them, never optimised on). A learned rounding that does not
    beat nearest rounding there (too few samples for the layer's fan-in: it fits the optimised part only) is not
    used: nearest comes back, with equal errors."""
    import torch

    xt, xqt = torch.from_numpy(x), torch.from_numpy(xq)
    wt, st = torch.from_numpy(w), torch.from_numpy(scale)
    held = max(1, int(round(VALIDATION * len(x)))) if len(x) >= 4 else 0
    fit, check = (xqt[:len(x) - held], xqt[len(x) - held:]) if held else (xqt, xqt)
    with torch.no_grad():
        target = fn(xt[:len(x) - held], wt)
        check_target = fn(xt[len(x) - held:], wt) if held else target
        nearest = torch.clamp(torch.round(wt / st), -qmax, qmax)
        base = float(((fn(fit, nearest * st) - target) ** 2).mean())
        base_check = float(((fn(check, nearest * st) - check_target) ** 2).mean())
    if base == 0.0 or base_check == 0.0:
        return nearest.numpy(), base_check, base_check
    floor = torch.floor(wt / st)
    rest = torch.clamp(wt / st - floor, 0.01, 0.99)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)  # h(v) == rest at the start
    opt = torch.optim.Adam([v], lr=LR)
    warm = int(WARMUP * iterations)
    for it in range(iterations):
        idx = torch.from_numpy(rng.choice(len(fit), size=min(BATCH, len(fit)), replace=False))
        h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
        soft = torch.clamp(floor + h, -qmax, qmax) * st
        loss = ((fn(fit[idx], soft) - target[idx]) ** 2).mean() / base
        if it >= warm:  # the rounding regulariser, its exponent annealed from BETA[0] to BETA[1]
            beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + np.cos(np.pi * (it - warm) / max(iterations - warm, 1)))
            loss = loss + REG_WEIGHT * (1 - torch.abs(2 * h - 1) ** beta).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
        learned = torch.clamp(floor + (h >= 0.5).to(floor.dtype), -qmax, qmax)
        err = float(((fn(check, learned * st) - check_target) ** 2).mean())
    if err >= base_check:
        return nearest.numpy(), base_check, base_check
    return learned.numpy(), base_check, err


def on_grid(w: np.ndarray, k: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """FP32 weights whose onnxruntime quantization is exactly ``k``: ``k * scale``, each channel's largest ``|w|``
    kept as it was (so the scale onnxruntime derives is the same), nothing beyond it."""
    w0 = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    k0 = k.reshape(1, -1) if axis is None else np.moveaxis(k, axis, 0).reshape(w.shape[axis], -1)
    s0 = scale.reshape(-1, 1)
    absmax = np.abs(w0).max(axis=1, keepdims=True)
    out = np.clip((k0.astype(np.float32) * s0).astype(np.float32), -absmax, absmax)
    rows, top = np.arange(len(w0)), np.abs(w0).argmax(axis=1)
    out[rows, top] = w0[rows, top]  # the element that sets the scale keeps its exact value
    if axis is None:
        return out.reshape(w.shape).astype(w.dtype)
    moved = np.moveaxis(w, axis, 0).shape
    return np.moveaxis(out.reshape(moved), 0, axis).astype(w.dtype)


def adaround(src: Path, out: Path, samples: SampleSet, workdir: Path, *, per_channel: bool = True,
             reduce_range: bool = False, skip: set[str] = frozenset(), iterations: int = ITERATIONS,
             time_limit: float | None = None, seed: int = 0) -> dict:
    """Write ``out``: ``src`` with the weights of its Conv/Gemm/MatMul layers (not in ``skip``) rounded by AdaRound onto
    onnxruntime's symmetric INT8 grid. Returns the record: layers adjusted, output error relative to nearest
    rounding (median over the layers, on the held-back calibration samples), samples, steps, seconds."""
    import onnx
    import torch
    from onnx import numpy_helper

    start = time.monotonic()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    qmax = 64 if reduce_range else 127
    model = onnx.load(str(src))
    layers = weighted_layers(model, set(skip))
    inits = {t.name: t for t in model.graph.initializer}
    record = {"method": "adaround", "layers": 0, "of": len(layers), "iterations": iterations, "samples": 0,
              "grid": f"symmetric int8 (+-{qmax}) {'per channel' if per_channel else 'per tensor'}"}
    if not layers:
        onnx.save(model, str(out))
        return record
    inputs, record["samples"] = _capture(model, layers, samples, workdir)  # FP32: the targets
    ratios, kept, skipped = [], 0, []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small per-layer problems: one thread is as fast, and the host is shared
    longest = 0.0  # the longest layer so far: a layer starts only when one as long still ends within the limit
    for node in layers:
        began = time.monotonic()
        if time_limit is not None and began - start + longest > time_limit:
            skipped.append(node.name)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32, copy=True)
        bias = None
        if len(node.input) > 2 and node.input[2] in inits:
            bias = torch.from_numpy(numpy_helper.to_array(inits[node.input[2]]).astype(np.float32, copy=True))
        elif len(node.input) > 2 and node.input[2]:
            skipped.append(node.name)  # a computed bias: not a layer of this kind
            continue
        axis = weight_axis(node) if per_channel else None
        scale = grid(w, axis, qmax)
        shared = sum(n.input[0] == node.input[0] for n in layers) > 1  # an input several layers read stays
        x = inputs[node.input[0]] if shared else inputs.pop(node.input[0])
        xq = x if node is layers[0] else _capture(model, [node], samples, workdir, record["samples"])[0][node.input[0]]
        k, base, err = _round_layer(_layer_fn(node, attrs, bias), x, xq, w, scale, qmax, iterations, rng)
        if err < base:
            kept += 1
        ratios.append(err / base if base > 0 else 1.0)
        adjusted = on_grid(w, k, scale, axis)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(adjusted, node.input[1]))
        longest = max(longest, time.monotonic() - began)
    torch.set_num_threads(threads)
    onnx.save(model, str(out))
    record.update(layers=len(ratios), improved=kept, seconds=round(time.monotonic() - start, 1),
                  relative_mse_median=round(float(np.median(ratios)), 3) if ratios else None)
    if skipped:
        record["not_adjusted"] = len(skipped)
    return record


def describe(record: dict) -> str:
    if not record.get("layers"):
        return "AdaRound: no Conv/Gemm layer to adjust"
    text = (f"AdaRound weight rounding on {record['layers']} of {record['of']} Conv/Gemm/MatMul layers "
            f"({record['improved']} "
            f"improved; output error vs nearest rounding median {record['relative_mse_median']}x on the held-back "
            f"part of {record['samples']} calibration samples, {record['iterations']} steps per layer, "
            f"{record['seconds']} s)")
    if record.get("not_adjusted"):
        text += f"; {record['not_adjusted']} layer(s) left at nearest rounding (time limit)"
    return text

LAYER_SECONDS = 1.5  # one layer's steps and input capture (ocr-cls, 54 layers: 64-79 s on a loaded 2-core host)


def expected_seconds(onnx_path: Path) -> float:
    """The search's estimate of what AdaRound adds to a conversion: its layers' steps, at most TIME_LIMIT."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return min(TIME_LIMIT, LAYER_SECONDS * len(weighted_layers(model)))


def extra_seconds(settings, onnx_path: Path) -> float:
    """A backend's ``extra_seconds``: what a candidate with ``rounding: adaround`` adds to a plain INT8 try."""
    rounding = settings.get("rounding") if isinstance(settings, dict) else getattr(settings, "rounding", "")
    return expected_seconds(onnx_path) if rounding == "adaround" else 0.0


def candidate_label() -> str:
    return ("AdaRound weight rounding (Conv/Gemm/MatMul weights rounded up or down as learned on the calibration "
            f"samples, {ITERATIONS} steps per layer, at most {TIME_LIMIT:.0f} s)")


def apply(pre: Path, calib: SampleSet, s: dict, workdir: Path, skip: set[str], owned: bool) -> tuple[Path, str]:
    """In the quantizer: the pre-processed model with AdaRound weights (a new file in ``workdir``) and the note that
    says what was done. ``owned``: ``pre`` is this conversion's own copy (removed once adjusted)."""
    from edgebuild.errors import ConversionError

    if s["weight_type"] != "int8" or not s["symmetric_weights"]:
        raise ConversionError("AdaRound rounding needs symmetric int8 weights "
                              "(weight_type: int8, symmetric_weights: true)")
    out = workdir / "_adaround.onnx"
    record = adaround(pre, out, calib, workdir, per_channel=bool(s["per_channel"]),
                      reduce_range=bool(s["reduce_range"]), skip=skip, time_limit=TIME_LIMIT)
    if owned:
        pre.unlink()
    return out, describe(record)
