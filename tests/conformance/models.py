"""Self-built stand-ins for the model classes people deploy (issue 15), with matching data files.

Each ``make_*`` writes the model and a ``.npz`` keyed by input name into a folder and returns their paths.
Weights are seeded random (no training needed): the builds are judged on fidelity to the FP32 model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES = 48


# ---- (a) a stateful voice-activity detector: input [1, 576], state [2, 1, 128] (batch on axis 1), sr int64 0-d
def vad_module():
    import torch
    from torch import nn

    class TinyVAD(nn.Module):
        """Frame encoder + LSTM cell carried in ``state`` = stack(h, c) [2, batch, 128]; ``sr`` scales
        the frame (an int64 scalar, as in real VAD models); outputs (speech probability, new state)."""

        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv1d(1, 16, 9, stride=4), nn.ReLU(), nn.Conv1d(16, 32, 5, stride=4), nn.ReLU())
            self.proj = nn.Linear(32 * 35, 64)
            self.cell = nn.LSTMCell(64, 128)
            self.head = nn.Linear(128, 1)

        def forward(self, x, state, sr):
            x = x * (sr.to(torch.float32) / 16000.0)
            f = self.enc(x.unsqueeze(1)).flatten(1)
            h, c = self.cell(torch.relu(self.proj(f)), (state[0], state[1]))
            return torch.sigmoid(self.head(h)), torch.stack([h, c])

    torch.manual_seed(0)
    return TinyVAD().eval()


def make_vad(folder: Path) -> tuple[Path, Path]:
    """ONNX export with symbolic batch dims (axis 0 of ``input``, axis 1 of ``state``), plus data stored
    the way a user has it: frames (N, 576), states (N, 2, 128) without the batch axis, one sr for all."""
    import torch

    model = vad_module()
    path = folder / "vad.onnx"
    args = (torch.zeros(1, 576), torch.zeros(2, 1, 128), torch.tensor(16000, dtype=torch.int64))
    torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=["input", "state", "sr"],
                      output_names=["prob", "new_state"],
                      dynamic_axes={"input": {0: "batch"}, "state": {1: "batch"}, "prob": {0: "batch"}, "new_state": {1: "batch"}})
    rng = np.random.default_rng(0)
    t = np.arange(576) / 16000.0
    frames = np.stack([np.sin(2 * np.pi * rng.uniform(100, 800) * t) * rng.uniform(0.01, 1) for _ in range(SAMPLES)])
    states = np.zeros((SAMPLES, 2, 128), np.float32)  # carried state: run the frames through the model in order
    with torch.no_grad():
        st = torch.zeros(2, 1, 128)
        for i in range(SAMPLES):
            states[i] = st[:, 0].numpy()
            _, st = model(torch.from_numpy(frames[i:i + 1].astype(np.float32)), st, args[2])
    data = folder / "vad.npz"
    np.savez(data, input=frames.astype(np.float32), state=states, sr=np.int64(16000))
    return path, data


# ---- (b) a tiny BERT-style encoder: int64 input_ids [1, 16] + attention_mask [1, 16] -> embedding [1, 32]
def encoder_module(vocab: int = 200, seq: int = 16, dim: int = 32, layers: int = 2):
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

        def forward(self, x, bias):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(1, 2) / dim ** 0.5 + bias, dim=-1)
            x = self.n1(x + self.out(att @ v))
            return self.n2(x + self.ff(x))

    class TinyEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.randn(1, seq, dim) * 0.1)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))

        def forward(self, input_ids, attention_mask):
            m = attention_mask.to(torch.float32)
            x, bias = self.tok(input_ids) + self.pos, (1.0 - m)[:, None, :] * -1e4
            for layer in self.layers:
                x = layer(x, bias)
            return (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)  # mean pooling

    torch.manual_seed(0)
    return TinyEncoder().eval()


def make_encoder(folder: Path, seq: int = 16) -> tuple[Path, Path]:
    """ONNX export with symbolic batch; ids stored (N, 16), masks (N, 1, 16) (with the batch axis)."""
    import torch

    path = folder / "encoder.onnx"
    ids = torch.zeros(1, seq, dtype=torch.int64)
    torch.onnx.export(encoder_module(seq=seq), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "embedding": {0: "batch"}})
    rng = np.random.default_rng(1)
    lengths = rng.integers(4, seq + 1, SAMPLES)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 200, (SAMPLES, seq)) * mask
    data = folder / "encoder.npz"
    np.savez(data, input_ids=ids, attention_mask=mask[:, None, :])
    return path, data


# ---- (c) a classic model-zoo CNN file: IR version 3, opset 8, weights not listed as graph inputs
def old_cnn(opset: int = 8, weights_as_inputs: bool = False, constants: bool = False):
    """Conv-BN-ReLU-LRN-MaxPool, a Sum skip, Dropout, GAP, Gemm, Softmax: the ops of the old zoo files.
    ``constants``: the weights as Constant nodes (opset 11 style) instead of initializers."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    w = {"conv1_w_0": rng.standard_normal((8, 3, 3, 3)) * 0.3, "conv1_b_0": rng.standard_normal(8) * 0.1,
         "bn_scale": 1 + 0.1 * rng.standard_normal(8), "bn_bias": 0.1 * rng.standard_normal(8),
         "bn_mean": 0.1 * rng.standard_normal(8), "bn_var": 1 + 0.1 * rng.random(8),
         "conv2_w_0": rng.standard_normal((8, 8, 3, 3)) * 0.2,
         "fc_w_0": rng.standard_normal((10, 8)) * 0.5, "fc_b_0": np.zeros(10)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [h.make_node("Constant", [], [k], value=nh.from_array(v, k)) for k, v in w.items()] if constants else []
    nodes += [h.make_node("Conv", ["data_0", "conv1_w_0", "conv1_b_0"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
              h.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], epsilon=1e-5),
              h.make_node("Relu", ["bn"], ["r1"]),
              h.make_node("LRN", ["r1"], ["lrn"], size=3, alpha=1e-4, beta=0.75, bias=1.0),
              h.make_node("MaxPool", ["lrn"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
              h.make_node("Conv", ["p1", "conv2_w_0"], ["c2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
              h.make_node("Sum", ["c2", "p1"], ["s"]),
              h.make_node("Relu", ["s"], ["r2"]),
              h.make_node("Dropout", ["r2"], ["d"], ratio=0.5),
              h.make_node("GlobalAveragePool", ["d"], ["g"]),
              h.make_node("Flatten", ["g"], ["f"], axis=1),
              h.make_node("Gemm", ["f", "fc_w_0", "fc_b_0"], ["logits"], transB=1),
              h.make_node("Softmax", ["logits"], ["prob_1"])]
    inputs = [h.make_tensor_value_info("data_0", T.FLOAT, [1, 3, 16, 16])]
    if weights_as_inputs:
        inputs += [h.make_tensor_value_info(k, T.FLOAT, v.shape) for k, v in w.items()]
    graph = h.make_graph(nodes, "zoo_cnn", inputs, [h.make_tensor_value_info("prob_1", T.FLOAT, [1, 10])],
                         initializer=[] if constants else [nh.from_array(v, k) for k, v in w.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="zoo-era")
    model.ir_version = 6 if constants else 3
    return model


def make_old_cnn(folder: Path, **kw) -> tuple[Path, Path]:
    import onnx

    path = folder / "zoo_cnn.onnx"
    onnx.save(old_cnn(**kw), str(path))
    rng = np.random.default_rng(2)
    x = rng.random((SAMPLES, 3, 16, 16), dtype=np.float32)
    x[: SAMPLES // 2, 0] += 0.5  # two kinds of images, so the class scores vary
    data = folder / "zoo_cnn.npz"
    np.savez(data, data_0=x)
    return path, data


# ---- (a') the same class as real VADs export it: the network sits in an If on the 0-d int64 ``sr``
def branchy_vad(hidden: int = 16):
    """``If(sr == 16000)``: the 16 kHz branch (conv stride 4 -> LSTM -> head) or the 8 kHz one (stride 2, other
    weights); inputs input [batch, 576], state [2, batch, hidden], sr int64 0-d; outputs prob, new_state."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def branch(tag: str, stride: int, seed: int):
        rng = np.random.default_rng(seed)
        steps = (576 - 9) // stride + 1
        feats = 4 * steps
        w = {f"{tag}_conv_w": rng.normal(0, 0.3, (4, 1, 9)), f"{tag}_W": rng.normal(0, 0.05, (1, 4 * hidden, feats)),
             f"{tag}_R": rng.normal(0, 0.2, (1, 4 * hidden, hidden)), f"{tag}_B": rng.normal(0, 0.1, (1, 8 * hidden)),
             f"{tag}_head": rng.normal(0, 0.5, (hidden, 1)), f"{tag}_shape": np.array([1, -1, feats]),
             f"{tag}_ax1": np.array([1]), f"{tag}_ax0": np.array([0]), f"{tag}_split": np.array([1, 1])}
        inits = [numpy_helper.from_array(v.astype(np.int64 if v.dtype.kind == "i" else np.float32), k) for k, v in w.items()]
        def t(x):
            return f"{tag}_{x}"

        nodes = [helper.make_node("Unsqueeze", ["input", t("ax1")], [t("x3")]),
                 helper.make_node("Conv", [t("x3"), t("conv_w")], [t("c")], strides=[stride]),
                 helper.make_node("Relu", [t("c")], [t("r")]),
                 helper.make_node("Reshape", [t("r"), t("shape")], [t("seq")]),
                 helper.make_node("Split", ["state", t("split")], [t("h0"), t("c0")], axis=0),
                 helper.make_node("LSTM", [t("seq"), t("W"), t("R"), t("B"), "", t("h0"), t("c0")],
                                  ["", t("h"), t("cc")], hidden_size=hidden),
                 helper.make_node("Squeeze", [t("h"), t("ax0")], [t("h2")]),
                 helper.make_node("MatMul", [t("h2"), t("head")], [t("logit")]),
                 helper.make_node("Sigmoid", [t("logit")], [t("prob")]),
                 helper.make_node("Concat", [t("h"), t("cc")], [t("state_out")], axis=0)]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(t("prob"), TensorProto.FLOAT, None),
                                                  helper.make_tensor_value_info(t("state_out"), TensorProto.FLOAT, None)],
                                 inits)

    graph = helper.make_graph(
        [helper.make_node("Equal", ["sr", "khz16"], ["is16"]),
         helper.make_node("If", ["is16"], ["prob", "new_state"], then_branch=branch("k16", 4, 1),
                          else_branch=branch("k8", 2, 2))],
        "branchy_vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 576]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", hidden]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, "batch", hidden])],
        [numpy_helper.from_array(np.array(16000, np.int64), "khz16")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def make_branchy_vad(folder: Path, rates=(16000,)) -> tuple[Path, Path]:
    """The If-VAD and its data: frames, the states the model itself carries, ``sr`` cycling through ``rates``
    (one value: stored once, as users do)."""
    import onnx
    import onnxruntime as ort

    model = branchy_vad()
    path = folder / "branchy_vad.onnx"
    onnx.save(model, str(path))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    t = np.arange(576) / 16000.0
    frames = np.stack([np.sin(2 * np.pi * rng.uniform(100, 800) * t) * rng.uniform(0.01, 1)
                       for _ in range(SAMPLES)]).astype(np.float32)
    srs = np.array([rates[i % len(rates)] for i in range(SAMPLES)], np.int64)
    states = np.zeros((SAMPLES, 2, 16), np.float32)
    st = np.zeros((2, 1, 16), np.float32)
    for i in range(SAMPLES):
        states[i] = st[:, 0]
        _, st = sess.run(None, {"input": frames[i:i + 1], "state": st, "sr": np.array(srs[i])})
    data = folder / "branchy_vad.npz"
    np.savez(data, input=frames, state=states, sr=np.int64(rates[0]) if len(rates) == 1 else srs)
    return path, data
