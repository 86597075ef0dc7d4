"""LSTM on arm64: onnx2tf's WHILE loop against TFLite's fused UNIDIRECTIONAL_SEQUENCE_LSTM (``quant.lstm_fused``).

    .venv/bin/python scripts/benchmark_lstm_fused.py                       # a Resemblyzer-shaped encoder, made here
    .venv/bin/python scripts/benchmark_lstm_fused.py --onnx m.onnx --calib calib.npz --precisions fp32

The default model is the shape of Resemblyzer's speaker encoder (40 mel channels x 160 frames -> 3-layer LSTM(256)
-> the last layer's final hidden state -> Linear(256) -> L2 norm), random weights, nothing downloaded. Each precision
is converted twice by the tflite backend (``lstm_fused`` off and on) and the two artifacts are timed in interleaved
rounds on LiteRT with XNNPACK (``invoke()`` alone, as benchmark_model times it), so machine load hits both alike.
Printed per precision: p50 of each, the loop/fused speed ratio, sizes, runtime memory (pipeline/memory.py: peak
resident memory of loading and running it, in a child of its own), and the worst cosine to onnxruntime over the
samples (each run from the zero state: the runner resets the fused op's variable tensors).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchmark_int8 import host  # noqa: E402


def encoder_onnx(path: Path, frames: int = 160) -> Path:
    import onnx
    import onnxslim
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.linear = torch.nn.LSTM(40, 256, 3, batch_first=True), torch.nn.Linear(256, 256)

        def forward(self, mels):
            _, (h, _) = self.lstm(mels)
            e = torch.relu(self.linear(h[-1]))
            return e / (e.norm(dim=1, keepdim=True) + 1e-5)

    torch.manual_seed(0)
    torch.onnx.export(Encoder().eval(), (torch.zeros(1, frames, 40),), str(path), input_names=["mels"],
                      output_names=["embedding"], opset_version=17, dynamo=False)
    onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))
    return path


def model_of(onnx_path: Path):
    import onnx
    from onnx import helper

    from edgebuild.targets.base import ExportedModel, TensorInfo

    g = onnx.load(str(onnx_path)).graph
    init = {i.name for i in g.initializer}

    def info(v):
        t = v.type.tensor_type
        shape = tuple(d.dim_value for d in t.shape.dim)
        return TensorInfo(v.name, shape, helper.tensor_dtype_to_np_dtype(t.elem_type).name, "ANY")

    return ExportedModel(onnx_path, tuple(info(v) for v in g.input if v.name not in init),
                         tuple(info(v) for v in g.output), 17)


def samples(model, calib_npz: Path | None, n: int):
    from edgebuild.calibration.dataset import SampleSet, sample_shape

    rng = np.random.default_rng(0)
    if calib_npz:
        with np.load(calib_npz) as z:
            data = {t.name: z[t.name][:n] for t in model.inputs}
    else:  # mel power frames: squared normals, channels of different sizes
        data = {t.name: (rng.normal(0, 1, (n, *sample_shape(t.shape))) ** 2
                         * np.geomspace(0.01, 4, t.shape[-1])).astype(np.float32) for t in model.inputs}
    return SampleSet("bench", data, shapes={t.name: t.shape for t in model.inputs})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, help="an ONNX model with LSTMs (default: the encoder made here)")
    ap.add_argument("--calib", type=Path, help="an .npz of samples per input name (default: synthetic mel frames)")
    ap.add_argument("--precisions", default="fp32,fp16", help="of fp32, fp16 (dynamic range keeps the loop)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from edgebuild.pipeline import memory
    from edgebuild.similarity import cosine
    from edgebuild.targets.base import get_backend
    from edgebuild.targets.profiles import catalogue
    from edgebuild.targets.tflite.backend import TFLiteRunner

    print("host:", host())
    with tempfile.TemporaryDirectory(prefix="bench-lstm-") as tmp:
        onnx_path = args.onnx or encoder_onnx(Path(tmp) / "encoder.onnx")
        model = model_of(onnx_path)
        calib = samples(model, args.calib, 16)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        refs = [sess.run(None, calib.feed(i)) for i in range(len(calib))]
        backend, profile = get_backend("tflite"), catalogue()["arm64"]
        for precision in args.precisions.split(","):
            arts, runners, times = {}, {}, {}
            for way, fused in (("loop", False), ("fused", True)):
                arts[way] = backend.convert(model, profile, precision, calib, Path(tmp) / f"{precision}-{way}",
                                            {"lstm_fused": fused})
                runners[way] = TFLiteRunner(arts[way].path, arts[way].io, args.threads)
                times[way] = []
            worst = {way: min(cosine(np.concatenate([np.ravel(y) for y in r.run(calib.feed(i))]),
                                     np.concatenate([np.ravel(y) for y in refs[i]])) for i in range(len(calib)))
                     for way, r in runners.items()}
            feed = calib.feed(0)
            for _ in range(args.rounds):
                for way, r in runners.items():
                    times[way] += r.time_ms(feed, 3, args.runs, 30.0)
            p50 = {way: float(np.median(t)) for way, t in times.items()}
            for way in runners:
                ops = sorted({op.split()[0] for op in arts[way].settings["device_requires"]["builtin_ops"]})
                peak = memory.measure("tflite", arts[way], args.threads, feed)["peak_mb"]
                print(f"{precision:8s} {way:6s} p50 {p50[way]:8.2f} ms  size {arts[way].size_bytes / 1e6:6.2f} MB  "
                      f"runtime memory {peak:6.1f} MB  worst cosine {worst[way]:.5f}  ops {', '.join(ops)}")
            print(f"{precision:8s} fused speed-up over the loop: {p50['loop'] / p50['fused']:.2f}x "
                  f"({args.rounds} interleaved rounds, {args.threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
