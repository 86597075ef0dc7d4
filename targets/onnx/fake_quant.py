"""Fake quantization for the pipeline's per-layer sensitivity and mixed-precision proxy (QDQ run unfused)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgebuild.calibration.dataset import SampleSet
from edgebuild.targets.base import Runner
from edgebuild.targets.onnx.dynamic import quantize_recurrent, recurrent_layers
from edgebuild.targets.onnx.prepare import preprocess
from edgebuild.targets.onnx.runner import OrtRunner
from edgebuild.targets.onnx.static import WEIGHTED_OPS, float_into_tail, quantize_static


# fake quantization: per-tensor uint8 activations, per-channel int8 weights, min/max ranges, every op type eligible
FAKE_QUANT_SETTINGS = {"op_types": "all", "activation_type": "uint8", "weight_type": "int8", "per_channel": True,
                       "reduce_range": False, "calibrate_method": "minmax", "symmetric_activations": False,
                       "symmetric_weights": True}


class FakeQuant:
    """The backend's public fake-quantization helper (the pipeline's per-layer sensitivity uses it, whatever the
    target): ``runner(layers)`` quantizes only the named nodes of an FP32 ONNX model (QDQ) and runs the result
    unfused on ONNX Runtime CPU — the arithmetic of an int8 kernel without any CPU-specific saturation.

    The model is pre-processed once and the activation ranges calibrated once (on ``calib``, by the first call),
    then reused by every call: quantizing one layer at a time costs one quantization pass per layer. All of it
    (onnxruntime's native quantization and runtime) runs in one child process (targets/isolated.py ``Served``):
    a crash is a ConversionError for that call, and the next call starts a new child (the ranges are kept)."""

    def __init__(self, onnx_path: Path, calib: SampleSet, workdir: Path):
        from edgebuild.targets.isolated import samples_to_disk

        self._args = (str(onnx_path), samples_to_disk(calib, workdir), str(workdir))
        self._served = None

    def runner(self, layers: list[str]) -> Runner:
        from edgebuild.targets.served import Served

        if self._served is None or not self._served.alive():
            self._served = Served(_FakeQuantHost, self._args, "fake-quant", "fake quantization", "quantizer")
        self._served.call("quantize", [str(n) for n in layers])
        return _FakeQuantRunner(self._served)

    def runner_except(self, float_layers: list[str], weighted_only: bool = False) -> Runner:
        """Every node quantized but ``float_layers`` (a mixed-precision candidate, fake-quantized); with
        ``weighted_only`` only the weighted layers (``WEIGHTED_OPS``, as ``op_types: weighted``)."""
        from edgebuild.targets.served import Served

        if self._served is None or not self._served.alive():
            self._served = Served(_FakeQuantHost, self._args, "fake-quant", "fake quantization", "quantizer")
        self._served.call("quantize_except", [str(n) for n in float_layers], weighted_only)
        return _FakeQuantRunner(self._served)

    def layer_noise(self, layers: list[str], samples: SampleSet) -> dict[str, float]:
        """Per layer, the quantization noise it adds, from ONE run of the whole graph fake-quantized beside the FP32
        one (``_FakeQuantHost.layer_noise``): {node name: relative error of its output - relative error of its
        input}, for the named nodes found in the graph. A cheap stand-in for quantizing one layer at a time (a
        quantization pass and an evaluation per layer: 64 layers of PP-OCRv4's detector took minutes)."""
        from edgebuild.targets.served import Served

        if self._served is None or not self._served.alive():
            self._served = Served(_FakeQuantHost, self._args, "fake-quant", "fake quantization", "quantizer")
        return self._served.call("layer_noise", [str(n) for n in layers], [samples.feed(i) for i in range(len(samples))])

    def close(self) -> None:
        if self._served is not None:
            self._served.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _FakeQuantRunner(Runner):
    def __init__(self, served):
        self._served = served

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._served.call("run", feed)


class _FakeQuantHost:
    """In the fake-quant child: the pre-processed model, the calibration samples, the runner of the last call."""

    def __init__(self, onnx_path: str, samples: dict, workdir: str):
        from edgebuild.targets.isolated import samples_from_disk

        self.calib, self.workdir, self.runner = samples_from_disk(samples), Path(workdir), None
        self.model = self.workdir / "fake_quant_model.onnx"
        if not self.model.is_file():  # once, not once per layer (a 70 MB encoder: ~3 s each), nor per child
            preprocess(Path(onnx_path), self.workdir).rename(self.model)
        self.ranges = self.workdir / "fake_quant_ranges.json"
        self.recurrent = set(recurrent_layers(self.model))

    def quantize(self, layers: list[str], tail: set[str] | None = None) -> None:
        """Only ``layers`` quantized; ``tail``: nodes of a float post-processing tail, whose input tensors get no
        Q/DQ when only the tail reads them (as in a real conversion, static.py ``float_into_tail``). LSTM layers
        among them are quantized as a conversion quantizes them (static QDQ has no LSTM: onnxruntime's
        DynamicQuantizeLSTM, dynamic.py ``quantize_recurrent``), so the sensitivity ranks recurrent layers too: a
        speaker encoder's first LSTM, fed linear mel power, is the one that collapses at 8 bits."""
        out, self.runner = self.workdir / "fake_quant.onnx", None
        recurrent = [n for n in layers if n in self.recurrent]
        static = [n for n in layers if n not in self.recurrent]
        if not layers:  # nothing to quantize (onnxruntime reads an empty nodes_to_quantize as every node)
            self.runner = OrtRunner(self.model, 1)
            return
        if static:
            quantize_static(self.model, out, self.calib, {**FAKE_QUANT_SETTINGS, "nodes_to_quantize": static},
                            self.workdir, self.ranges, preprocessed=True)
            if tail:
                float_into_tail(out, tail)
        else:
            shutil.copyfile(self.model, out)
        if recurrent:
            quantize_recurrent(out, {"float_layers": [n for n in self.recurrent if n not in recurrent]}, self.workdir)
        self.runner = OrtRunner(out, 1, simulate=bool(static))

    def quantize_except(self, float_layers: list[str], weighted_only: bool = False) -> None:
        import onnx

        from edgebuild.targets.regions import float_regions

        regions = float_regions(self.model)
        keep = set(float_layers) | {n for v in regions.values() for n in v}  # as a real conversion
        # as a real conversion: no Q/DQ on a tensor only the float tail reads (a detector's score logits before its
        # output Sigmoids: 8-bit there, the proxy and the noise ranking saw a collapse the conversion does not have)
        self.quantize([n.name for n in onnx.load(str(self.model), load_external_data=False).graph.node
                       if n.name and n.name not in keep and (not weighted_only or n.op_type in WEIGHTED_OPS)],
                      set(regions["postprocess"]))

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(feed)

    def layer_noise(self, layers: list[str], feeds: list[dict]) -> dict[str, float]:
        """Every node quantized (as ``quantize_except([])``), the FP32 and the fake-quantized graph run on ``feeds``
        with each named node's first input and first output exposed. A tensor's error is its energy-weighted
        relative squared error over the feeds, sum |q - f|^2 / sum |f|^2; a node's noise is its output's error less
        its input's: what quantizing its input and its weights adds (the QDQ graph keeps the names of the float
        tensors; the node reads the dequantized copy of its input)."""
        import onnx

        from edgebuild.targets.regions import float_regions

        self.quantize_except([])
        quantized = self.workdir / "fake_quant.onnx"
        floating = {n for v in float_regions(self.model).values() for n in v}  # not quantized: no noise of their own
        layers = [n for n in layers if n not in floating]
        from edgebuild.targets.regions import graph_index

        f_graph = onnx.load(str(self.model), load_external_data=False).graph
        nodes = {n.name: n for n in f_graph.node if n.name}
        _, consumers = graph_index(f_graph)
        q_graph = onnx.load(str(quantized), load_external_data=False).graph
        known = {o for n in q_graph.node for o in n.output} | {i.name for i in q_graph.input}

        def output(node) -> str | None:
            """The node's output as the QDQ graph has it: a Relu/Clip right after it is folded into its int8 range
            by the quantizer (its output then carries the values), so the activation's output stands for it."""
            t = node.output[0] if node.output else None
            while t is not None and t not in known:
                after = consumers.get(t, [])
                t = after[0].output[0] if len(after) == 1 and after[0].op_type in ("Relu", "Clip") else None
            return t

        pairs = {name: (nodes[name].input[0], output(nodes[name])) for name in layers
                 if name in nodes and nodes[name].input and output(nodes[name]) is not None}
        inputs = {i.name for i in q_graph.input}  # a graph input carries no error (and is no output to expose)
        tensors = sorted({t for pair in pairs.values() for t in pair if t in known and t not in inputs})
        runs = [OrtRunner(_exposing(path, tensors, self.workdir / f"_noise_{i}.onnx"), 1, simulate=i == 1)
                for i, path in enumerate((self.model, quantized))]
        num = dict.fromkeys(tensors, 0.0)
        den = dict.fromkeys(tensors, 0.0)
        for feed in feeds:
            f_out, q_out = (dict(zip(r.output_names, r.run(feed))) for r in runs)
            for t in tensors:
                f, q = f_out[t].astype(np.float64), q_out[t].astype(np.float64)
                num[t] += float(np.sum((q - f) ** 2))
                den[t] += float(np.sum(f ** 2))
        err = {t: num[t] / den[t] if den[t] > 0 else 0.0 for t in tensors}
        return {name: max(err.get(y, 0.0) - err.get(x, 0.0), 0.0) for name, (x, y) in pairs.items()}


def _exposing(path: Path, tensors: list[str], out: Path) -> Path:
    """A copy of the model at ``path`` whose graph outputs include ``tensors`` (after its own outputs)."""
    import onnx

    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in have)
    onnx.save(model, str(out))
    return out
