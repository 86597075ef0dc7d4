"""More self-built stand-ins (issue 15, item 7): the model classes whose conversion quirks are tested op by op in
tests/targets, here as whole models with data, for end-to-end builds on every CPU target.

    make_face_net    MTCNN O-Net shape: PReLU everywhere, MaxPool(ceil_mode), three heads (prob, box, landmarks)
    make_recogniser  CRNN shape, raw opset 11 with every weight a Constant node: conv -> BiLSTM -> log-softmax (CTC)
    make_yolo        YOLO-style head at two strides: sigmoid/exp decode with a grid and anchors, one [1, N, 5 + C]

Weights are seeded random (no training): the builds are judged on fidelity to the FP32 model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES = 48


def _export(module, shape, path: Path, inputs, outputs, opset: int = 17) -> Path:
    import torch

    torch.onnx.export(module.eval(), (torch.zeros(*shape),), str(path), dynamo=False, opset_version=opset,
                      input_names=inputs, output_names=outputs)
    return path


def _images(shape, seed: int) -> np.ndarray:
    """Smooth random images (blobs on a gradient), normalised to about zero mean and unit spread."""
    rng = np.random.default_rng(seed)
    n, c, h, w = SAMPLES, *shape[1:]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    x = np.empty((n, c, h, w), np.float32)
    for i in range(n):
        base = rng.uniform(0.2, 0.8, (c, 1, 1)) + rng.uniform(-0.3, 0.3, (c, 1, 1)) * (xx + yy)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            base = base + rng.uniform(-0.5, 0.5, (c, 1, 1)) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2)
        x[i] = base
    return ((x - 0.5) / 0.25).astype(np.float32)


def weights_as_constants(m):
    """Every initializer of ONNX model ``m`` turned into a Constant node at the top of the graph (PaddlePaddle's style)."""
    from onnx import helper

    consts = [helper.make_node("Constant", [], [i.name], value=i) for i in m.graph.initializer]
    del m.graph.initializer[:]
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def make_face_net(folder: Path) -> tuple[Path, Path]:
    import torch
    from torch import nn

    class ONet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3), nn.PReLU(16), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      nn.Conv2d(16, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      nn.Conv2d(32, 32, 3), nn.PReLU(32), nn.MaxPool2d(2, 2, ceil_mode=True),
                                      nn.Conv2d(32, 64, 2), nn.PReLU(64))
            self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.PReLU(128))
            self.prob, self.box, self.marks = nn.Linear(128, 2), nn.Linear(128, 4), nn.Linear(128, 10)

        def forward(self, x):
            h = self.fc(self.body(x))
            return torch.softmax(self.prob(h), 1), self.box(h), self.marks(h)

    torch.manual_seed(0)
    net = ONet()
    for m in net.modules():
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.05, 0.4)
    path = _export(net, (1, 3, 48, 48), folder / "face.onnx", ["input"], ["prob", "box", "landmarks"])
    data = folder / "face.npz"
    np.savez(data, input=_images((1, 3, 48, 48), 3))
    return path, data


def make_recogniser(folder: Path) -> tuple[Path, Path]:
    """Exported at opset 11, then every initializer turned into a Constant node, as PaddlePaddle writes them."""
    import onnx
    import torch
    from torch import nn

    class CRNN(nn.Module):
        def __init__(self, classes: int = 12):
            super().__init__()
            self.cnn = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d((2, 1)),
                                     nn.Conv2d(32, 32, (8, 1)), nn.ReLU())
            self.rnn, self.fc = nn.LSTM(32, 24, bidirectional=True, batch_first=True), nn.Linear(48, classes)

        def forward(self, x):
            seq = self.cnn(x).squeeze(2).permute(0, 2, 1)  # [1, T, C]
            return torch.log_softmax(self.fc(self.rnn(seq)[0]), -1)

    torch.manual_seed(0)
    raw = _export(CRNN(), (1, 3, 32, 64), folder / "rec_raw.onnx", ["x"], ["logp"], opset=11)
    path = folder / "rec.onnx"
    onnx.save(weights_as_constants(onnx.load(str(raw))), str(path))
    data = folder / "rec.npz"
    np.savez(data, x=_images((1, 3, 32, 64), 4))
    return path, data


def make_yolo(folder: Path, classes: int = 3) -> tuple[Path, Path]:
    import torch
    from torch import nn

    anchors = {8: [(10, 13), (16, 30)], 16: [(33, 23), (30, 61)]}

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.SiLU())

    class Yolo(nn.Module):
        def __init__(self):
            super().__init__()
            self.b8 = nn.Sequential(block(3, 16, 2), block(16, 24, 2), block(24, 32, 2))
            self.b16 = block(32, 48, 2)
            self.h8, self.h16 = nn.Conv2d(32, 2 * (5 + classes), 1), nn.Conv2d(48, 2 * (5 + classes), 1)

        def decode(self, p, stride):
            n, _, h, w = p.shape
            p = p.view(n, 2, 5 + classes, h, w).permute(0, 1, 3, 4, 2)
            gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack((gx, gy), -1).view(1, 1, h, w, 2).float()
            anchor = torch.tensor(anchors[stride], dtype=torch.float32).view(1, 2, 1, 1, 2)
            xy = (p[..., :2].sigmoid() * 2 - 0.5 + grid) * stride
            wh = (p[..., 2:4].sigmoid() * 2) ** 2 * anchor
            return torch.cat((xy, wh, p[..., 4:].sigmoid()), -1).reshape(n, -1, 5 + classes)

        def forward(self, x):
            f8 = self.b8(x)
            return torch.cat((self.decode(self.h8(f8), 8), self.decode(self.h16(self.b16(f8)), 16)), 1)

    torch.manual_seed(0)
    path = _export(Yolo(), (1, 3, 64, 64), folder / "yolo.onnx", ["images"], ["detections"])
    data = folder / "yolo.npz"
    np.savez(data, images=_images((1, 3, 64, 64), 5))
    return path, data


# ---- issue 22: the arm64 classes -------------------------------------------------------------------------------
#     make_audio        audio-to-notes: raw audio [1, N, 1] (batch, samples, channel), tf2onnx's input name "input_2:0"
#     make_speaker      3-layer LSTM speaker encoder: output = the last layer's final hidden state h_n[-1]
#     make_video_hist   3-D video CNN [1, 3, T, H, W] with a colour-histogram branch (ScatterElements, reduction=add)
#     make_ctc          CNN + 2-layer BiLSTM CTC recogniser, log-softmax [1, T, C]


def _normal(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(0, scale, (SAMPLES, *shape[1:]))).astype(np.float32)


def make_audio(folder: Path) -> tuple[Path, Path]:
    import torch
    from torch import nn

    class Notes(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv1d(1, 16, 33, stride=8), nn.Conv1d(16, 24, 9, stride=4), nn.Conv1d(24, 24, 3)
            self.notes, self.onsets = nn.Conv1d(24, 12, 1), nn.Conv1d(24, 12, 1)

        def forward(self, x):  # [1, N, 1]
            h = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x.transpose(1, 2)))))))
            return torch.sigmoid(self.notes(h)).transpose(1, 2), torch.sigmoid(self.onsets(h)).transpose(1, 2)

    torch.manual_seed(0)
    path = _export(Notes(), (1, 2048, 1), folder / "audio.onnx", ["input_2:0"], ["notes", "onsets"])
    t = np.arange(2048) / 16000.0
    rng = np.random.default_rng(6)
    waves = [sum(rng.uniform(0.1, 0.4) * np.sin(2 * np.pi * rng.uniform(80, 2000) * t) for _ in range(3))
             + rng.normal(0, 0.02, t.shape) for _ in range(SAMPLES)]
    data = folder / "audio.npz"
    np.savez(data, **{"input_2:0": np.stack(waves)[:, :, None].astype(np.float32)})
    return path, data


def make_speaker(folder: Path) -> tuple[Path, Path]:
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.proj = nn.LSTM(16, 32, 3, batch_first=True), nn.Linear(32, 24)

        def forward(self, mels):
            _, (h, _) = self.lstm(mels)
            e = torch.relu(self.proj(h[-1]))
            return e / (e.norm(dim=1, keepdim=True) + 1e-5)

    torch.manual_seed(0)
    path = _export(Encoder(), (1, 20, 16), folder / "speaker.onnx", ["mels"], ["embedding"])
    data = folder / "speaker.npz"
    np.savez(data, mels=_normal((1, 20, 16), 7))
    return path, data


def make_video_hist(folder: Path) -> tuple[Path, Path]:
    import torch
    from torch import nn

    class Clip(nn.Module):
        def __init__(self, bins: int = 8):
            super().__init__()
            self.bins = bins
            self.c1, self.c2 = nn.Conv3d(3, 8, 3, padding=1), nn.Conv3d(8, 16, 3, stride=2, padding=1)
            self.fc = nn.Linear(16 + 3 * bins, 5)

        def forward(self, x):  # [1, 3, T, H, W], values in [0, 1]
            f = torch.relu(self.c2(torch.relu(self.c1(x)))).mean(dim=(2, 3, 4))
            idx = (x.clamp(0, 0.999) * self.bins).floor().long().flatten(2)        # [1, 3, T*H*W]
            hist = torch.zeros(1, 3, self.bins).scatter_add_(2, idx, torch.ones_like(idx, dtype=torch.float32))
            hist = hist / idx.shape[2]
            return torch.softmax(self.fc(torch.cat([f, hist.flatten(1)], 1)), 1), hist

    torch.manual_seed(0)
    path = _export(Clip(), (1, 3, 4, 16, 16), folder / "video.onnx", ["clip"], ["scores", "histogram"])
    frames = np.stack([_images((1, 3, 16, 16), 8 + t) for t in range(4)], axis=2) * 0.25 + 0.5  # back to ~[0, 1]
    data = folder / "video.npz"
    np.savez(data, clip=np.clip(frames, 0, 1).astype(np.float32))
    return path, data


def make_ctc(folder: Path) -> tuple[Path, Path]:
    import torch
    from torch import nn

    class CRNN(nn.Module):
        def __init__(self, classes: int = 20):
            super().__init__()
            self.cnn = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d((2, 1)))
            self.rnn = nn.LSTM(32 * 8, 32, 2, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(64, classes)

        def forward(self, x):  # [1, 1, 32, 64]
            f = self.cnn(x).flatten(1, 2).transpose(1, 2)     # [1, 32, 256]
            return torch.log_softmax(self.fc(self.rnn(f)[0]), -1)

    torch.manual_seed(0)
    path = _export(CRNN(), (1, 1, 32, 64), folder / "ctc.onnx", ["image"], ["logp"])
    data = folder / "ctc.npz"
    np.savez(data, image=_images((1, 1, 32, 64), 9))
    return path, data
