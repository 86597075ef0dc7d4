"""edgebuild's runner on a board (or under the aarch64 emulator): self-contained, needs Python 3.8+, numpy and the
artifact's runtime only (never edgebuild). Shipped to the device by `edgebuild validate --device/--emulate`.

    python3 device_runner.py --probe          one JSON line: machine, python, the runtimes importable here
    python3 device_runner.py JOB_DIR          runs JOB_DIR/job.json on JOB_DIR/feeds.npz -> outputs.npz, result.json

job.json: backend (tflite | onnx | openvino | executorch), artifact (file name in JOB_DIR), io (the artifact's I/O record from
metadata.json), inputs (source input names, in order), samples, threads, timing {warmup, runs, budget_s},
compile_config (OpenVINO: the CPU plugin properties the build recorded); for a stateful model, state ([[output index,
input name]]) and runs ([[start, stop]]): within a run, each step after the first is fed the state outputs of the
step before (closed loop), as edgebuild judges it.
feeds.npz holds ``x<k>`` = input k stacked over the samples, in the source model's layout and dtype; this runner
adapts them to the artifact (TFLite: the layout permutation and the int8/uint8 input quantization recorded in the
model) and back, like edgebuild's host runners. Latency times the runtime's invoke alone, inputs already set.
Exit codes: 0 ok · 3 the runtime failed on the artifact · 4 the runtime is not installed here.
"""
import importlib.util
import json
import os
import platform
import sys
import time

RUNTIMES = {"tflite": ("ai_edge_litert", "tflite_runtime", "tensorflow"), "onnx": ("onnxruntime",),
            "openvino": ("openvino",), "executorch": ("executorch",)}


def probe():
    found = {}
    for names in RUNTIMES.values():
        for name in names:
            found[name] = importlib.util.find_spec(name) is not None
    found["numpy"] = importlib.util.find_spec("numpy") is not None
    return {"machine": platform.machine(), "python": platform.python_version(), "runtimes": found}


class TFLite:
    def __init__(self, path, io, threads, compile_config=None):
        if importlib.util.find_spec("ai_edge_litert"):
            from ai_edge_litert.interpreter import Interpreter
            self.runtime = "ai_edge_litert"
        elif importlib.util.find_spec("tflite_runtime"):
            from tflite_runtime.interpreter import Interpreter
            self.runtime = "tflite_runtime"
        else:
            from tensorflow.lite import Interpreter
            self.runtime = "tensorflow"
        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        signature = self.interpreter.get_signature_runner()
        ins, outs = signature.get_input_details(), signature.get_output_details()
        self.inputs = [(spec, ins[spec["signature_key"]]) for spec in io["inputs"]]
        self.outputs = [(spec, None if "from_input" in spec else outs[spec["signature_key"]]) for spec in io["outputs"]]
        self.feed = {}

    def set(self, feed):
        import numpy as np
        self.feed = feed  # an output that is an input unchanged is not in the .tflite: it is the input
        for spec, d in self.inputs:
            x = np.asarray(feed[spec["name"]])
            if spec.get("perm"):
                x = x.transpose(spec["perm"])
            if x.ndim == 0:
                x = x.reshape(1)
            scale, zero = d["quantization"]
            dtype = np.dtype(d["dtype"])
            if dtype.kind in "iu" and scale != 0.0 and x.dtype.kind == "f":
                info = np.iinfo(dtype)
                x = np.clip(np.round(x / scale) + zero, info.min, info.max)
            self.interpreter.set_tensor(d["index"], np.ascontiguousarray(x, dtype=dtype))

    def invoke(self):
        self.interpreter.invoke()

    def get(self):
        import numpy as np
        result = []
        for spec, d in self.outputs:
            if d is None:
                result.append(np.asarray(self.feed[spec["from_input"]]).astype(np.float32))
                continue
            y = self.interpreter.get_tensor(d["index"])
            scale, zero = d["quantization"]
            quantized = np.dtype(d["dtype"]).kind in "iu" and scale != 0.0
            y = (y.astype(np.float32) - zero) * np.float32(scale) if quantized else y.astype(np.float32)
            result.append(np.ascontiguousarray(y.transpose(spec["perm"]) if spec.get("perm") else y))
        return result


class Onnx:
    runtime = "onnxruntime"

    def __init__(self, path, io, threads, compile_config=None):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.feed, self.result = None, None

    def set(self, feed):
        self.feed = feed

    def invoke(self):
        self.result = self.session.run(self.names, self.feed)

    def get(self):
        import numpy as np
        return [np.asarray(o, dtype=np.float32) for o in self.result]


class OpenVino:
    runtime = "openvino"

    def __init__(self, path, io, threads, compile_config=None):
        import openvino as ov
        config = dict(compile_config or {"PERFORMANCE_HINT": "LATENCY"}, INFERENCE_NUM_THREADS=threads)
        self.compiled = ov.Core().compile_model(path, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def set(self, feed):
        import numpy as np
        self.feed = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in feed.items()}  # 0-d stays 0-d

    def invoke(self):
        self.result = self.request.infer(self.feed)

    def get(self):
        import numpy as np
        return [np.array(self.result[o], dtype=np.float32) for o in self.compiled.outputs]


class ExecuTorch:
    """A .pte on ExecuTorch's C++ runtime through its Python bindings (the executorch wheel: portable kernels and
    the XNNPACK delegate). Only the bindings' extension is loaded, never executorch.exir (the compiler side): it
    needs torch's shared libraries (``import torch`` first) and numpy, nothing else. Without torch (the emulator
    root) the same runtime runs through edgebuild_et (a C ABI over its C++ Module API, numpy in and out)."""
    runtime = "executorch"

    def __init__(self, path, io, threads, compile_config=None):
        try:
            import torch  # noqa: F401 — loads libtorch, which the bindings link against
            from executorch.extension.pybindings import _C
            self.binding = "pybindings"
        except ImportError:  # no torch (the emulator root): the same C++ runtime through edgebuild_et's C ABI
            import edgebuild_et as _C
            self.binding = "edgebuild_et"
        try:
            _C._unsafe_reset_threadpool(int(threads))  # the XNNPACK delegate's thread pool
        except Exception:
            pass
        self.module = _C._load_for_executorch(path)
        self.inputs = [(spec["name"], spec["dtype"]) for spec in io["inputs"]]
        self.args, self.result = [], None

    def set(self, feed):
        import numpy as np
        self.args = [np.array(feed[name], dtype=dtype, copy=True) for name, dtype in self.inputs]
        if self.binding == "pybindings":
            import torch
            self.args = [torch.from_numpy(a) for a in self.args]

    def invoke(self):
        self.result = self.module.forward(self.args)

    def get(self):
        import numpy as np
        return [np.array(o.numpy() if hasattr(o, "numpy") else o, dtype=np.float32) for o in self.result]


def run(job_dir):
    import numpy as np
    job = json.load(open(os.path.join(job_dir, "job.json")))
    cls = {"tflite": TFLite, "onnx": Onnx, "openvino": OpenVino, "executorch": ExecuTorch}[job["backend"]]
    stacked = np.load(os.path.join(job_dir, "feeds.npz"), allow_pickle=False)
    feeds = [{name: stacked["x%d" % k][i] for k, name in enumerate(job["inputs"])} for i in range(job["samples"])]
    t0 = time.perf_counter()
    model = cls(os.path.join(job_dir, job["artifact"]), job["io"], job["threads"], job.get("compile_config"))
    load_s = time.perf_counter() - t0
    outputs = []
    starts = set(r[0] for r in job.get("runs") or [[i, i + 1] for i in range(len(feeds))])
    for i, feed in enumerate(feeds):
        if i not in starts:
            for index, name in job.get("state") or []:
                like = np.asarray(feed[name])
                feed = dict(feed, **{name: np.asarray(outputs[-1][index]).reshape(like.shape).astype(like.dtype)})
        model.set(feed)
        model.invoke()
        outputs.append(model.get())
    np.savez(os.path.join(job_dir, "outputs.npz"),
             **{"y%d" % j: np.stack([o[j] for o in outputs]) for j in range(len(outputs[0]))})
    t = job.get("timing") or {}
    times = []
    if t.get("runs"):
        model.set(feeds[0])
        for _ in range(t["warmup"]):
            model.invoke()
        deadline = time.perf_counter() + t["budget_s"]
        while len(times) < t["runs"] and (len(times) < 20 or time.perf_counter() < deadline):
            s = time.perf_counter()
            model.invoke()
            times.append((time.perf_counter() - s) * 1e3)
    result = {"runtime": model.runtime, "runtime_version": _version(model.runtime), "load_s": load_s,
              "samples": len(outputs), "times_ms": times, "warmup": t.get("warmup", 0), **probe()}
    if getattr(model, "binding", None):
        result["binding"] = model.binding  # ExecuTorch: its Python bindings, or edgebuild_et (C ABI, no torch)
    json.dump(result, open(os.path.join(job_dir, "result.json"), "w"))


def _version(name):
    try:
        from importlib.metadata import version
        return version(name.replace("_", "-"))
    except Exception:
        return "?"


def main(argv):
    if argv[1:] == ["--probe"]:
        print(json.dumps(probe()))
        return 0
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        run(argv[1])
    except ImportError as e:
        print("device_runner: runtime not installed: %s" % e, file=sys.stderr)
        return 4
    except Exception as e:
        print("device_runner: %s: %s" % (type(e).__name__, str(e).strip().splitlines()[0][:300] if str(e).strip() else ""),
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
