"""TensorFlow Lite Micro on the host: does an INT8 .tflite fit a microcontroller, and does TFLM agree with LiteRT?

The ``tflite-micro`` package (TFLM's own interpreter, reference kernels, built for the host) loads the artifact
in a child process (``targets/isolated.py``: TFLM aborts or segfaults on some bad models). What it reports:

- ``arena_bytes``: the tensor arena TFLM's RecordingMicroAllocator used (head + tail: activations, tensor and
  node structs, kernels' persistent buffers) after loading and running the model. It comes from a 64-bit host
  build: on a 32-bit Cortex-M the structs are smaller, so this is a safe upper bound for the reference kernels;
  optimized kernels (CMSIS-NN) may ask for a little scratch space on top (leave a margin).
- ``flash_bytes``: the model as the firmware holds it (the .tflite bytes; the C array holds exactly these), not
  counting the TFLM library and kernels' code.
- an op TFLM has no kernel for is a ``ConversionError`` naming the op (exit 3), read from TFLM's own message.
- TFLM's outputs on the first evaluation samples, compared with the host LiteRT run of the same artifact.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from edgebuild.errors import ConversionError, MissingToolError
from edgebuild.procs import tempdir
from edgebuild.targets.base import Artifact, Runner

RUNTIME_MODULES = ("tflite_micro.python.tflite_micro.runtime",)  # imported before the memory baseline
OPENER = "edgebuild.targets.tflite.tflm:open_runner"
SAMPLES = 8  # evaluation samples run on TFLM and on LiteRT to compare
KB = 1024


def arena_given(model_bytes: int) -> int:
    """The arena TFLM is given on the host: far more than an MCU has (it uses what it needs; pages never touched
    cost nothing). Too small an arena makes TFLM crash rather than fail."""
    return max(8 << 20, 20 * model_bytes)


def open_runner(artifact: Artifact, threads: int) -> "TFLMRunner":
    return TFLMRunner(artifact)


@contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """TFLM prints its errors and allocation records on file descriptor 2: collect them (lines)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(dir=tempdir()) as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            try:
                ctypes.CDLL(None).fflush(None)
            except (OSError, AttributeError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines += f.read().decode(errors="replace").splitlines()


def missing_ops(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(re.findall(r"Didn't find op for builtin opcode '(\w+)'", "\n".join(lines))))


class TFLMRunner(Runner):
    """The .tflite on TFLM's interpreter, fed and read in the source model's layout and dtype (like TFLiteRunner)."""

    def __init__(self, artifact: Artifact):
        from ai_edge_litert.interpreter import Interpreter as LiteRT
        from tflite_micro.python.tflite_micro import runtime

        from edgebuild.targets.tflite.port import Port

        data = artifact.path.read_bytes()
        self.arena_size = arena_given(len(data))  # generous: the used part is what TFLM reports
        with _captured_stderr() as log:
            try:
                self.interpreter = runtime.Interpreter.from_bytes(data, arena_size=self.arena_size)
            except (RuntimeError, ValueError) as e:
                error = e
            else:
                error = None
        if error is not None:
            ops = missing_ops(log)
            if ops:
                raise ConversionError(f"TensorFlow Lite Micro has no kernel for op {', '.join(ops)} in "
                                      f"{artifact.main}; the model cannot run on a microcontroller")
            raise ConversionError(f"TensorFlow Lite Micro cannot load {artifact.main}: {error} "
                                  f"({'; '.join(log[-2:])[:200]})")
        # TFLM addresses inputs/outputs by position; the artifact's io by signature key: LiteRT maps one to the other
        host = LiteRT(model_content=data)
        sig = next(iter(host._get_full_signature_list().values()))
        order_in = [d["index"] for d in host.get_input_details()]
        order_out = [d["index"] for d in host.get_output_details()]

        def port(spec: dict, order: list[int], kind: str) -> Port:
            position = order.index(sig[kind][spec["signature_key"]])
            details = {"index": position, "dtype": spec["dtype"],
                       "quantization": (spec.get("scale") or 0.0, spec.get("zero_point") or 0)}
            return Port(spec, details)

        self.inputs = [port(s, order_in, "inputs") for s in artifact.io["inputs"]]
        self.outputs = [s if "from_input" in s else port(s, order_out, "outputs") for s in artifact.io["outputs"]]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        for p in self.inputs:
            self.interpreter.set_input(p.to_tensor(feed[p.name]), p.index)
        self.interpreter.invoke()
        return [np.asarray(feed[p["from_input"]]).astype(np.float32) if isinstance(p, dict) else  # a pass-through
                p.from_tensor(np.asarray(self.interpreter.get_output(p.index))) for p in self.outputs]

    def memory_report(self) -> dict:
        """TFLM's own account of its arena (RecordingMicroAllocator), after the runs so far."""
        with _captured_stderr() as log:
            self.interpreter.print_allocations()
        text = "\n".join(log)
        found = {k: re.search(rf"Arena allocation {k} (\d+) bytes", text) for k in ("total", "head", "tail")}
        if not found["total"]:
            raise ConversionError(f"TensorFlow Lite Micro did not report its arena ({text[:200]!r})")
        return {"runtime": "tflite-micro", "arena_bytes": int(found["total"].group(1)),
                **{f"arena_{k}_bytes": int(m.group(1)) for k, m in found.items() if m and k != "total"},
                "arena_given_bytes": self.arena_size}


def flash(artifact: Artifact) -> dict:
    """The model in flash: the .tflite bytes, and what the optional C array (``quant.c_array``) holds."""
    model = artifact.path.stat().st_size
    out = {"model_bytes": model, "flash_bytes": model, "flash_kb": round(model / KB, 2)}
    sources = [f for f in artifact.files if f.endswith((".cc", ".h"))]
    if sources:
        text = "".join((artifact.directory / f).read_text() for f in sources)
        size = sum((artifact.directory / f).stat().st_size for f in sources)
        out["c_array"] = {"files": sources, "source_bytes": size, "array_bytes": len(re.findall(r"0x[0-9a-f]{2}", text))}
    return out


def _agreement(host: list[list[np.ndarray]], micro: list[list[np.ndarray]], io: dict) -> dict:
    """TFLM vs LiteRT on the same artifact and samples, per output: top-1 agreement, max abs error (also in
    quantization steps of the output)."""
    out = {}
    for j, spec in enumerate(io["outputs"]):
        a = np.stack([np.asarray(s[j], np.float32).reshape(-1) for s in host])
        b = np.stack([np.asarray(s[j], np.float32).reshape(-1) for s in micro])
        err = float(np.abs(a - b).max()) if a.size else 0.0
        o = {"max_abs_error": err, "exact": bool(err == 0.0)}
        if spec.get("scale"):
            o["max_error_steps"] = round(err / float(spec["scale"]), 3)
        if a.shape[1] > 1:
            o["top1_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)) * 100)
        out[spec["name"]] = o
    return out


def installed_version(target: str) -> str:
    """The installed tflite-micro version (it keys cached results); a clear MissingToolError when absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tflite-micro")
    except PackageNotFoundError:
        raise MissingToolError(target, "tflite_micro") from None


def micro_fit(artifact: Artifact, feeds: list[dict], host: list[list[np.ndarray]], tflm_version: str) -> dict:
    """Arena and flash from TFLM, and TFLM's agreement with ``host`` (LiteRT's outputs of the same artifact on
    ``feeds``): TFLM loads and runs the artifact in a child of its own (it aborts on some models)."""
    from edgebuild.targets.served import IsolatedRunner

    try:
        with IsolatedRunner("tflite", artifact, 1, opener=OPENER, memory=True) as r:
            micro = [r.run(f) for f in feeds]
            report = r.memory()["runtime"]
    except ConversionError as e:
        if "crashed" not in str(e):
            raise
        raise ConversionError(f"{e}: TensorFlow Lite Micro died loading or running {artifact.main} (an arena over "
                              f"{arena_given(artifact.path.stat().st_size) >> 20} MB, or a model it cannot "
                              "run); not a microcontroller model as it is") from None
    return {"runtime": f"tflite-micro {tflm_version} (host build, reference kernels)",
            "arena_bytes": report["arena_bytes"], "arena_kb": round(report["arena_bytes"] / KB, 2),
            "arena_detail": report, **flash(artifact),
            "agreement_with_litert": {"samples": len(feeds), "outputs": _agreement(host, micro, artifact.io)}}


def write_c_array(model_path: Path) -> list[str]:
    """``<stem>_data.cc``/``.h``: the model as an aligned C array, the form TensorFlow Lite Micro loads."""
    data = model_path.read_bytes()
    stem, symbol = model_path.stem + "_data", "g_" + model_path.stem.replace("-", "_")
    rows = ",\n".join("  " + ", ".join(f"0x{b:02x}" for b in data[i:i + 12]) for i in range(0, len(data), 12))
    header = (f"// {model_path.name} as a C array (generated by edgebuild)\n#pragma once\n\n"
              f"extern const unsigned char {symbol}[];\nextern const unsigned int {symbol}_len;\n")
    source = (f'#include "{stem}.h"\n\n// {model_path.name}, {len(data)} bytes; 16-byte aligned for TFLite Micro\n'
              f"alignas(16) const unsigned char {symbol}[] = {{\n{rows}\n}};\n"
              f"const unsigned int {symbol}_len = {len(data)};\n")
    (model_path.parent / f"{stem}.h").write_text(header)
    (model_path.parent / f"{stem}.cc").write_text(source)
    return [f"{stem}.cc", f"{stem}.h"]
