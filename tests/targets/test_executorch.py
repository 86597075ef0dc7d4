"""The ExecuTorch backend (targets/executorch.py): torch.export -> PT2E -> XNNPACK .pte, run by the ExecuTorch runtime.

Fast tests check the contract pieces (profiles, settings, naming, the ONNX-source refusal, the ONNX-name -> torch-op
mapping of float layers); slow ones convert models built here (a CNN, a small transformer encoder, an LSTM) to INT8
and run them in the ExecuTorch runtime, and build the demo end to end (metadata inside the .pte).
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from edgebuild.errors import BadInputError
from edgebuild.targets.base import ExportedModel, TensorInfo, check_source, get_backend
from edgebuild.targets.profiles import catalogue, load_profile

pytest.importorskip("executorch")


def test_profiles_load_with_their_backend_and_device_facts():
    cat = catalogue()
    for name in ("arm64-executorch", "android-executorch"):
        p = cat[name]
        assert p.backend == "executorch" and p.precision == "int8" and p.threads == 4
        assert "ExecuTorch >= 1.5" in p.device_runtime and p.io_dtype == "float32"
        assert get_backend(p.backend).requested_settings(p).per_channel is True


def test_a_quant_typo_is_exit_2_naming_the_closest_setting(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: et-typo\nbackend: executorch\ndescription: typo\nquant: {observr: minmax}\n")
    with pytest.raises(BadInputError, match="did you mean observer"):
        load_profile(path)
    path.write_text("name: et-bad\nbackend: executorch\ndescription: bad\nquant: {observer: entropy}\n")
    with pytest.raises(BadInputError, match="observer must be one of minmax, histogram"):
        load_profile(path)


def test_artifact_names_follow_the_naming_rule():
    b = get_backend("executorch")
    assert b.artifact_name("fp32") == "model_fp32.pte" and b.artifact_name("fp16") == "model_fp16.pte"
    assert b.artifact_name("dynamic") == "model_dynamic_int8.pte"
    assert b.artifact_name("int8", {"int8_weight_share": 0.97}) == "model_int8.pte"
    assert b.artifact_name("int8", {"int8_weight_share": 0.72}) == "model_int8_mixed.pte"  # < 90 % int8 weights
    assert b.artifact_name("int8", {"float_layers": ["/fc/Gemm"], "int8_weight_share": 0.95}) == "model_int8_mixed.pte"


def test_search_variants_flip_granularity_and_observer():
    b = get_backend("executorch")
    p = catalogue()["arm64-executorch"]
    variants = dict(b.recovery_candidates(p, b.requested_settings(p)))
    assert variants["per-tensor weights"].per_channel is False
    assert variants["histogram activation ranges"].observer == "histogram"
    assert b.supports_float_layers


def test_onnx_sources_are_refused_before_any_work(tmp_path, demo_onnx):
    with pytest.raises(BadInputError, match="takes PyTorch models"):
        check_source(get_backend("executorch"), "arm64-executorch", "onnx")
    check_source(get_backend("executorch"), "arm64-executorch", "torch")
    check_source(get_backend("onnx"), "onnx-cpu", "onnx")  # ONNX backends take both
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "edgebuild.pipeline.cli", "--target", "arm64-executorch", "--model",
                        str(demo_onnx), "--calib", "digits:train", "--eval", "digits:test", "-o", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr
    assert "takes PyTorch models" in r.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_target_all_with_an_onnx_model_skips_the_pytorch_only_targets(tmp_path, demo_onnx):
    """`--target all` builds every target an ONNX model can go to: the build goes past the source check (and here
    stops at the missing calibration data, before any conversion)."""
    r = subprocess.run([sys.executable, "-m", "edgebuild.pipeline.cli", "--target", "all", "--model", str(demo_onnx),
                        "--calib", str(tmp_path / "no-such-data"), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr
    assert "takes PyTorch models" in r.stderr and "skipped (--target all)" in r.stderr
    assert "no-such-data" in r.stderr.strip().splitlines()[-1]


def test_onnx_layer_names_map_to_the_torch_ops_they_came_from():
    import torch

    from edgebuild.targets.executorch_graph import float_nodes, onnx_scope_module

    assert onnx_scope_module("/layer1/layer1.0/conv1/Conv") == ("layer1.0.conv1", "Conv")
    assert onnx_scope_module("/layer1/layer1.0/seq/seq.0/Conv_1") == ("layer1.0.seq.0", "Conv")
    assert onnx_scope_module("/fc/Gemm") == ("fc", "Gemm") and onnx_scope_module("node_linear") is None
    gm = torch.export.export(_Cnn().eval(), (torch.zeros(1, 3, 16, 16),)).module()
    kept, nodes = float_nodes(gm, ["/features/features.3/Conv", "/head/Gemm"], {"target": "t"})
    assert kept["/features/features.3/Conv"] == ["conv2d_1"] and kept["/head/Gemm"] == ["linear"]
    with pytest.raises(Exception, match="maps to no op"):
        float_nodes(gm, ["/nothing/Conv"], {"target": "t"})


# ---- models built here --------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def _Cnn():
    torch = _torch()
    nn = torch.nn

    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.features(x).flatten(1))

    torch.manual_seed(0)
    return Cnn()


def _Encoder():
    torch = _torch()
    nn = torch.nn

    class Encoder(nn.Module):
        """One pre-norm transformer encoder block over token embeddings, mean-pooled into an embedding."""

        def __init__(self, vocab=64, d=32, heads=4):
            super().__init__()
            self.embed, self.heads = nn.Embedding(vocab, d), heads
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, ids):
            x = self.embed(ids)
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            x = x + self.ff(self.norm2(x))
            return x.mean(1)

    torch.manual_seed(0)
    return Encoder()


def _Lstm():
    torch = _torch()
    nn = torch.nn

    class Lstm(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    return Lstm()


MODELS = {  # name: (factory, input shape, input dtype)
    "cnn": (_Cnn, (1, 3, 16, 16), "float32"),
    "encoder": (_Encoder, (1, 12), "int64"),
    "lstm": (_Lstm, (1, 5, 8), "float32"),
}


def _exported(name, tmp_path):
    """(module, ExportedModel with the ONNX file and the torch.export program, calibration SampleSet, eval feeds)."""
    torch = _torch()
    from edgebuild.calibration.dataset import SampleSet
    from edgebuild.pipeline.stages.export import file_hash

    factory, shape, dtype = MODELS[name]
    module = factory().eval()
    rng = np.random.default_rng(0)
    make = (lambda n: rng.integers(0, 64, (n, *shape[1:])).astype(dtype)) if dtype == "int64" else \
        (lambda n: rng.standard_normal((n, *shape[1:])).astype(dtype))
    example = (torch.zeros(shape, dtype=getattr(torch, dtype)),)
    onnx_path, program = tmp_path / f"{name}.onnx", tmp_path / f"{name}.pt2"
    torch.onnx.export(module, example, str(onnx_path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"])
    torch.export.save(torch.export.export(module, example), str(program))
    out_shape = tuple(module(*example).shape)
    model = ExportedModel(onnx_path, (TensorInfo("x", shape, dtype),), (TensorInfo("y", out_shape, "float32"),), 17,
                          file_hash(onnx_path), program=program)
    return module, model, SampleSet("calib", {"x": make(8)}), [{"x": a[None]} for a in make(24)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_int8_converts_and_runs_in_the_executorch_runtime(name, tmp_path):
    torch = _torch()
    from edgebuild.targets.served import IsolatedRunner

    module, model, calib, feeds = _exported(name, tmp_path)
    backend, profile = get_backend("executorch"), catalogue()["arm64-executorch"]
    # the CNN also keeps a layer in float, as the accuracy search does (the demo's end-to-end build is full INT8)
    island = {"float_layers": ["/features/features.0/Conv"]} if name == "cnn" else None
    art = backend.convert(model, profile, "int8", calib, tmp_path / "int8", island)
    assert art.path.suffix == ".pte" and art.settings["runtime_checked"]
    share = art.settings["int8_weight_share"]
    assert art.main == ("model_int8.pte" if share >= 0.9 and not island else "model_int8_mixed.pte"), (art.main, share)
    if island:
        assert art.settings["float_layers_kept"] == {"/features/features.0/Conv": ["conv2d"]}
    assert share > 0.5 and art.settings["delegation"]["xnnpack_partitions"] >= 1
    with IsolatedRunner("executorch", art, 2) as runner:
        got = np.stack([runner.run(f)[0].reshape(-1) for f in feeds])
        assert runner.threads_used() == 2
    with torch.no_grad():
        want = np.stack([module(torch.from_numpy(f["x"])).numpy().reshape(-1) for f in feeds])
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert np.median(cosine) > 0.98, (name, cosine)
    assert art.size_bytes < 0.5 * sum(p.numel() * 4 for p in module.parameters()) + 60_000


@pytest.mark.slow
def test_demo_builds_end_to_end_with_metadata_in_the_pte(tmp_path):
    from edgebuild.pipeline.build import build
    from edgebuild.pipeline.spec import BuildSpec
    from edgebuild.pipeline.stages.embed import read
    from edgebuild.targets.served import IsolatedRunner
    from edgebuild.targets.base import Artifact

    result = build(BuildSpec(targets=("arm64-executorch",), out=str(tmp_path / "out"), calib_samples=64,
                             cache_dir=str(tmp_path / "cache")))
    assert result.exit_code == 0, result.manifest["targets"]
    target = tmp_path / "out" / "arm64-executorch"
    v = json.loads((target / "validation.json").read_text())
    meta = json.loads((target / "metadata.json").read_text())
    assert v["verdict"] == "pass" and v["metrics"]["accuracy_drop"] <= 0.5 and meta["artifact"] == "model_int8.pte"
    assert v["baseline_fp32"]["artifact"] == "model_fp32.pte" and v["ratios"]["size_vs_fp32"] < 0.35
    assert v["memory"]["peak_mb"] > 0 and {"p50_ms", "p90_ms"} <= set(v["latency"])
    assert meta["settings"]["int8_weight_share"] > 0.99 and meta["settings"]["calibration_samples_used"] == 64
    assert "executorch constant method" in meta["embedded_metadata"]["model_int8.pte"]
    inside = read(target / "model_int8.pte", "executorch")
    assert inside["edgebuild.target"] == "arm64-executorch" and inside["edgebuild.precision"] == "int8"
    assert json.loads(inside["edgebuild.inputs"])[0]["shape"] == [1, 1, 8, 8]
    # the shipped bytes (metadata written in) still run and agree with the FP32 reference
    art = Artifact("arm64-executorch", "executorch", "int8", target, "model_int8.pte", ["model_int8.pte"],
                   meta["settings"], meta["io"])
    ref = np.load(tmp_path / "out" / "reference" / "outputs.npz")
    feeds = np.load(tmp_path / "out" / "reference" / "feeds.npz")
    want = ref[json.loads((tmp_path / "out" / "reference" / "reference.json").read_text())["outputs"][0]][:50]
    with IsolatedRunner("executorch", art, 1) as runner:
        got = np.stack([runner.run({"input": feeds["input"][i][None]})[0] for i in range(50)])
    assert (got.reshape(50, -1).argmax(1) == want.reshape(50, -1).argmax(1)).mean() >= 0.95
    assert "torch_export" in result.manifest["model"]
    _validate_again(tmp_path / "out", target, v)


def _validate_again(out, target, built, monkeypatch=None):
    """The shipped .pte checked again after the build: `edgebuild validate` on the host's ExecuTorch runtime; the
    self-contained board runner (what --device and --emulate run) on the same feeds; --emulate, when an arm64 root
    with ExecuTorch is set up (else exit 4 naming the setup)."""
    import os
    import shutil

    from edgebuild.pipeline import emulate
    from edgebuild.pipeline.device import RUNNER, read_results, write_job
    from edgebuild.pipeline.revalidate import load
    from edgebuild.pipeline.stages.per_target import open_runner
    from edgebuild.pipeline.stages.validate import collect

    cli = [sys.executable, "-m", "edgebuild.pipeline.cli", "validate", str(target), "--json"]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(r.stdout)
    assert again["verdict"] == "pass" and again["metrics"]["accuracy"] == pytest.approx(built["metrics"]["accuracy"])
    assert {"p50_ms", "p90_ms"} <= set(again["latency"])

    loaded = load(target, None, None)
    job = out.parent / "job"
    job.mkdir()
    write_job(loaded, job, timed=False)
    done = subprocess.run([sys.executable, RUNNER.name, "."], cwd=job, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    board, result = read_results(job, len(loaded.evalset))
    assert result["runtime"] == "executorch" and result["runtime_version"].startswith("1.")
    with open_runner(loaded.backend, loaded.artifact, 1) as runner:
        host = collect(runner, loaded.evalset)
    assert len(board) == len(host) > 100
    np.testing.assert_allclose(np.stack([b[0] for b in board]), np.stack([h[0] for h in host]), rtol=0, atol=1e-5)

    if emulate.missing() is None and (emulate.emulator_root() / emulate.EXECUTORCH_MARK).is_file():
        r = subprocess.run(cli[:-1] + ["--emulate", "--json"], capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-2000:]
        emulated = json.loads(r.stdout)
        e = emulated["emulation"]
        assert "executorch" in e["runtime"] and "(aarch64," in e["runtime"] and "edgebuild_et" in e["runtime"]
        assert emulated["verdict"] == "pass" and emulated["latency"] is None  # judged by validate.assess(vs_host=...)
        assert e["vs_host"]["samples"] == emulated["metrics"]["samples"] > 100 and emulate.host_failures(e["vs_host"]) == []
        assert e["qemu_invoke_ms"]["runs"] == emulate.QEMU_RUNS and "not a device number" in e["qemu_invoke_ms"]["note"]
        assert emulated["metrics"]["accuracy"] == pytest.approx(built["metrics"]["accuracy"], abs=0.5)
        return
    root = out.parent / "root-without-executorch"  # an arm64 root made without EDGEBUILD_EMULATOR_EXECUTORCH=1
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "python3").touch()
    (root / ".edgebuild-ready").touch()
    r = subprocess.run(cli[:-1] + ["--emulate"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "EDGEBUILD_ARM64_ROOT": str(root)})
    assert r.returncode == 4, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    if shutil.which("qemu-aarch64-static"):
        assert "has no ExecuTorch runtime" in line and "EDGEBUILD_EMULATOR_EXECUTORCH=1 edgebuild setup-emulator" in line
    else:
        assert "qemu-aarch64-static is not installed" in line


@pytest.mark.slow
def test_prelu_after_a_linear_is_rewritten_so_xnnpack_can_lower_it(tmp_path):
    """MTCNN's RNet/ONet: PReLU on the 2-D output of a Linear makes ExecuTorch 1.5.1's XNNPACK layout pass assert
    (the whole lowering fails, FP32 too); written as relu(x) - w * relu(-x) it lowers and gives the same outputs."""
    torch = _torch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgebuild.targets.executorch import load_pte
    from edgebuild.targets.executorch_graph import prelu_for_xnnpack

    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.PReLU(8),
                          nn.Unflatten(1, (2, 4)), nn.PReLU(2)).eval()
    example = (torch.zeros(1, 3, 8, 8),)
    ep = torch.export.export(model, example, strict=False)
    with pytest.raises(Exception, match="ChannelsLastTaggedReshapePass"):  # if this starts passing, drop the rewrite
        to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    ep, rewritten = prelu_for_xnnpack(ep, example)
    assert rewritten == 2  # the 2-D and the 3-D one; the 4-D PReLU after the conv stays one op
    (tmp_path / "m.pte").write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    x = torch.randn(1, 3, 8, 8)
    got = load_pte(tmp_path / "m.pte").forward([x])[0]
    assert torch.allclose(got, model(x), atol=1e-5)
