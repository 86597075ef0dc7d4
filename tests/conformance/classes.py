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
