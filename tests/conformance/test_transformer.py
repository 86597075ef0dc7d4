"""A BERT-style encoder (issue 15): int64 ids and mask, GELU (Erf), LayerNorm with outlier channels, the additive
attention mask at the float32 minimum as Hugging Face models export it, mean pooling. INT8 of such graphs collapses
when every op gets Q/DQ; edgebuild finds the attention pattern and quantizes only the matrix products (ONNX
Runtime's recipe; NNCF's transformer scheme on x86), and the accuracy search never passes a collapse as success."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgebuild.pipeline.cli import main

SAMPLES = 120


def encoder_module(vocab: int = 300, seq: int = 16, dim: int = 48, layers: int = 2, outlier: float = 20.0):
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
            self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

        def forward(self, x, bias):
            heads = lambda t: t.view(1, seq, 4, dim // 4).transpose(1, 2)  # noqa: E731
            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (dim // 4) ** 0.5 + bias, dim=-1)
            x = self.n1(x + self.o((att @ v).transpose(1, 2).reshape(1, seq, dim)))
            return self.n2(x + self.ff(x))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.randn(1, seq, dim) * 0.1)
            self.norm = nn.LayerNorm(dim)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))

        def forward(self, input_ids, attention_mask):
            m = attention_mask.to(torch.float32)
            bias = (1.0 - m)[:, None, None, :] * torch.finfo(torch.float32).min  # as transformers exports it
            x = self.norm(self.tok(input_ids) + self.pos)
            for layer in self.layers:
                x = layer(x, bias)
            return (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)  # mean pooling

    torch.manual_seed(0)
    model = Encoder().eval()
    with torch.no_grad():  # outlier dimensions, as pretrained encoders have them: LayerNorm scales of 20 on two
        for norm in [model.norm] + [n for layer in model.layers for n in (layer.n1, layer.n2)]:  # channels
            norm.weight[:2] = outlier
    return model


def make_encoder(folder: Path, seq: int = 16) -> tuple[Path, Path]:
    import torch

    path = folder / "encoder.onnx"
    ids = torch.ones(1, seq, dtype=torch.int64)
    torch.onnx.export(encoder_module(seq=seq), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"])
    rng = np.random.default_rng(1)
    lengths = rng.integers(4, seq + 1, SAMPLES)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    data = folder / "encoder.npz"
    np.savez(data, input_ids=rng.integers(1, 300, (SAMPLES, seq)) * mask, attention_mask=mask)
    return path, data


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_encoder(tmp_path_factory.mktemp("encoder"))


def test_attention_is_found_by_graph_pattern(encoder, tmp_path):
    from edgebuild.targets.onnx import is_transformer, resolve_op_types

    model, _ = encoder
    assert is_transformer(model)
    ops, note = resolve_op_types(model, "auto")
    assert ops == ["Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"] and "transformer" in note
    assert resolve_op_types(model, "all") == (None, None)
    cnn = tmp_path / "cnn.onnx"  # a CNN with a softmax head is no transformer
    import torch

    torch.onnx.export(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 10),
                                          torch.nn.Softmax(-1)), torch.zeros(1, 1, 8, 8), str(cnn), dynamo=False)
    assert not is_transformer(cnn)


@pytest.mark.slow
def test_encoder_builds_onnx_cpu_and_x86_without_a_collapse_passed_as_success(encoder, tmp_path, capsys):
    model, data = encoder
    out = tmp_path / "out"
    code = main(["--model", str(model), "--calib", str(data), "--target", "onnx-cpu,x86", "--out", str(out)])
    err = capsys.readouterr().err
    assert code in (0, 1), err  # never 3: a conversion error is where the search starts
    assert "Traceback" not in err
    m = json.loads((out / "manifest.json").read_text())
    onnx_cpu, x86 = m["targets"]["onnx-cpu"], m["targets"]["x86"]
    first = onnx_cpu.get("search", {}).get("tries", [{}])[0]
    assert first.get("precision", "int8") == "int8"
    for t in (onnx_cpu, x86):
        assert t["verdict"] == ("pass" if code == 0 else t["verdict"])
        assert t["metrics"]["outputs"]["embedding"]["cosine_mean"] > 0.95, t["search"]  # the choice is no collapse
        if t["verdict"] == "fail":  # an honest failure names the quality budget it misses
            assert any("cosine" in f for f in t["failures"]), t["failures"]
    # every op quantized, this encoder's worst cosine is ~0.72; with Q/DQ on the matrix products only it is ~0.99
    from edgebuild.targets.isa import host_isa

    if host_isa()["vnni"]:  # full-range weights: the INT8 candidate keeps the embedding
        chosen = next(t for t in onnx_cpu["search"]["tries"] if t["label"] == onnx_cpu["search"]["chosen"])
        assert chosen["precision"] == "int8" and chosen["cosine_min"] > 0.95, onnx_cpu.get("search")
        if onnx_cpu["precision"] != "int8":  # ... and ships unless it runs slower than FP32 on this (loaded) host: a
            # few-ms encoder's INT8 QDQ can (the default objective's rule, pipeline/stages/objective.py)
            assert onnx_cpu["objective"]["overruled"] and "slower than the FP32 baseline" in onnx_cpu["objective"]["why"]
        assert onnx_cpu["metrics"]["cosine_min"] > 0.95
    else:  # AVX2 without VNNI: 7-bit weights (reduce_range: auto) cost this small encoder its worst-sample cosine
        # (0.976 measured), full-range ones saturate in the u8 x s8 kernels (0.945): INT8 misses, honestly — the
        # search tried the INT8 candidates first, each in the record with its miss, and a float artifact that keeps
        # the embedding ships and passes
        tries = onnx_cpu["search"]["tries"]
        assert tries[0]["settings"]["reduce_range"] is True and "VNNI" in str(tries[0]["settings"].get("isa")), tries[0]
        int8 = [t for t in tries if t["precision"] == "int8"]
        assert len(int8) >= 3 and onnx_cpu["precision"] in ("fp16", "fp32") and onnx_cpu["verdict"] == "pass"
        assert onnx_cpu["metrics"]["cosine_min"] > 0.99
    qdq = out / "onnx-cpu" / onnx_cpu["artifact"]
    if onnx_cpu["precision"] == "int8":  # the transformer recipe: LayerNorm/Softmax/Erf have no Q/DQ around them
        import onnx

        g = onnx.load(str(qdq)).graph
        producer = {o: n for n in g.node for o in n.output}
        for n in g.node:
            if n.op_type in ("Softmax", "LayerNormalization", "Erf"):
                assert all(getattr(producer.get(i), "op_type", "") != "DequantizeLinear" for i in n.input), n.name
    assert x86["artifact"].endswith(".xml")
