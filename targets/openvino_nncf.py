"""The OpenVINO backend's NNCF side (targets/openvino.py): ``nncf.quantize`` with the float scope resolved from ONNX names
to OpenVINO operations, NNCF's output kept off stdout, and OpenVINO/NNCF imported with their telemetry off."""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import sys

from edgebuild.calibration.dataset import SampleSet
from edgebuild.errors import ConversionError

# ONNX operator types (what the rest of edgebuild speaks) -> the OpenVINO operations they become
ONNX_TO_OV_TYPES = {
    "Conv": ("Convolution", "GroupConvolution"),
    "ConvTranspose": ("ConvolutionBackpropData", "GroupConvolutionBackpropData"),
    "Gemm": ("MatMul",), "MatMul": ("MatMul",), "Mul": ("Multiply",), "Add": ("Add",), "Sub": ("Subtract",),
    "Div": ("Divide",), "AveragePool": ("AvgPool",), "GlobalAveragePool": ("ReduceMean",),
    "ReduceMean": ("ReduceMean",),
}


def _ops_named(op_names: list[str], name: str) -> list[str]:
    """The OpenVINO operations made from the ONNX node ``name`` (or the operation of that name): ONNX
    ``/layer/Conv`` becomes ``/layer/Conv/WithoutBiases`` (Convolution) plus ``/layer/Conv`` (bias Add)."""
    return [m for m in op_names if m == name or m.startswith(name + "/")]


FOLDED_INTO = ("BatchNormalization", "Add", "Mul", "Sub", "Div")  # what OpenVINO folds into a Conv/MatMul before it


def onnx_outputs(path: str) -> dict[str, list[str]]:
    """ONNX node name -> the tensor names OpenVINO may know its operation by: its outputs, and the outputs of the one
    op that consumes it when OpenVINO folds that op into it (a Conv + BatchNormalization becomes a Convolution named
    ``Multiply_7837``, with no trace of the ONNX name; PaddlePaddle's PP-OCR graphs are all Conv + BN)."""
    import onnx

    from edgebuild.targets.regions import graph_index

    graph = onnx.load(path, load_external_data=False).graph
    _, consumers = graph_index(graph)
    out = {}
    for n in graph.node:
        names = [o for o in n.output if o]
        c = consumers.get(n.output[0], []) if n.output else []
        if len(c) == 1 and c[0].op_type in FOLDED_INTO:
            names += [o for o in c[0].output if o]
        out[n.name] = names
    return out


def _op_by_tensor(ov_model, tensors: list[str]) -> list[str]:
    """The Convolution/MatMul-like operations that compute the named tensors: the op producing one of them, or the
    weighted op it was folded into (found back through Add/Multiply/Subtract, at most 3 steps)."""
    weighted = {t for types in ONNX_TO_OV_TYPES.values() for t in types if t not in ("Multiply", "Add", "Subtract",
                                                                                      "Divide")}
    wanted, found = set(tensors), []
    for op in ov_model.get_ops():
        if not any(wanted & o.get_names() for o in op.outputs()):
            continue
        node, steps = op, 0
        while node.get_type_name() not in weighted and node.get_type_name() in ("Add", "Multiply", "Subtract") and steps < 3:
            node, steps = node.input_value(0).get_node(), steps + 1
        found += [op.get_friendly_name()] + ([node.get_friendly_name()] if node.get_type_name() in weighted else [])
    return sorted(set(found))


RECURRENT_OV = ("LSTMSequence", "GRUSequence", "RNNSequence")
RESHAPING = ("Reshape", "Squeeze", "Unsqueeze", "Transpose")


def _layer_behind(op) -> str | None:
    """The recurrent operation whose output ``op`` reshapes: OpenVINO names an ONNX LSTM's last op (the Reshape of
    Y to ONNX's layout) after the ONNX node and the LSTMSequence itself ``LSTMSequence_76``, so ignoring the name
    alone left the LSTM's input quantized."""
    for _ in range(3):
        if op is None or op.get_type_name() not in RESHAPING or op.get_input_size() == 0:
            return None
        op = op.input_value(0).get_node()
        if op.get_type_name() in RECURRENT_OV:
            return op.get_friendly_name()
    return None


def resolve_float_scope(ov_model, s: dict, target: str,
                        onnx_outputs: dict[str, list[str]] | None = None) -> tuple[dict, list[str]]:
    """The NNCF ignored scope (OpenVINO names and types) for ``ignored_scope`` and ``float_layers``.

    ``ignored_scope`` is the user's: names and types may be ONNX or OpenVINO ones, and an entry that matches
    nothing fails the conversion. ``float_layers`` come from the accuracy search's ONNX sensitivity ranking:
    one with no OpenVINO counterpart (fused away by the converter) is skipped and noted.
    """
    ops = list(ov_model.get_ops())
    op_names = sorted(op.get_friendly_name() for op in ops)
    op_types = {op.get_type_name() for op in ops}
    scope = s["ignored_scope"]
    names, missing, notes = [], [], []
    for n in scope["names"]:
        hits = _ops_named(op_names, n)
        names += hits
        missing += [] if hits else [n]
    types = []
    for t in scope["types"]:
        hits = [c for c in ONNX_TO_OV_TYPES.get(t, (t,)) if c in op_types]
        types += hits
        missing += [] if hits else [f"type {t}"]
    if missing:
        raise ConversionError(f"{target}: ignored_scope entries not in the model: {', '.join(missing)} "
                              f"(operations include {', '.join(op_names[:6])}, ...)")
    by_name = {op.get_friendly_name(): op for op in ops}
    for n in s["float_layers"]:
        hits = _ops_named(op_names, n)
        if not hits and onnx_outputs:  # OpenVINO renamed it (a folded BatchNormalization): find it by its tensors
            hits = _op_by_tensor(ov_model, onnx_outputs.get(n, []))
        hits += [w for h in hits if (w := _layer_behind(by_name.get(h))) is not None]
        names += hits
        if not hits:
            notes.append(f"float layer {n} has no OpenVINO operation of that name (fused by the converter); skipped")
    return {"names": sorted(set(names)), "types": sorted(set(types)), "patterns": list(scope["patterns"])}, notes


def quantize(ov_model, calib: SampleSet, s: dict, target: str, onnx_outputs: dict | None = None,
              onnx_path: str | None = None):
    """NNCF post-training quantization; returns (model, what was applied, notes)."""
    nncf = import_without_telemetry("nncf")
    from edgebuild.calibration.adapters import nncf_dataset
    from edgebuild.calibration.budget import at_most

    from edgebuild.targets.isa import resolve

    overflow_fix, isa = resolve("overflow_fix", s["overflow_fix"])
    resolved, notes = resolve_float_scope(ov_model, s, target, onnx_outputs)
    if s.get("float_regions", True) and onnx_path:
        from edgebuild.targets.regions import describe, float_regions

        found = float_regions(onnx_path)
        op_names = sorted(op.get_friendly_name() for op in ov_model.get_ops())
        extra = [m for v in found.values() for n in v for m in _ops_named(op_names, n)]
        if extra:
            resolved["names"] = sorted(set(resolved["names"]) | set(extra))
            notes.append(describe(found))
    scope = nncf.IgnoredScope(**resolved, validate=True) if any(resolved.values()) else None
    calib = at_most(calib, s["subset_size"])
    subset = len(calib)  # NNCF's own default (300) would cap again
    kwargs = dict(
        preset=nncf.QuantizationPreset(s["preset"]), target_device=nncf.TargetDevice(s["target_device"]),
        subset_size=subset, fast_bias_correction=s["fast_bias_correction"],
        model_type=nncf.ModelType(s["model_type"]) if s["model_type"] else None, ignored_scope=scope,
        advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix(overflow_fix),
                                                                **_activation_ranges(s.get("activation_ranges"))),
    )
    with _nncf_output() as warnings:
        quantized = nncf.quantize(ov_model, nncf_dataset(calib), **kwargs)
    applied = {"calibration_samples": subset, "ignored_scope": resolved, "overflow_fix": overflow_fix,
               **({"isa": isa} if isa else {}),
               "algorithm": f"nncf.quantize: {RANGES[s.get('activation_ranges') or 'default']} + "
                            + ("fast bias correction" if s["fast_bias_correction"] else "bias correction")}
    notes += [f"NNCF: {w}" for w in dict.fromkeys(warnings)][:10]
    return quantized, applied, notes


RANGES = {"default": "mean of per-sample min-max ranges", "minmax": "min-max ranges over the set",
          "histogram": "histogram ranges (error-minimizing clip)", "mean_quantile": "mean 1e-4 quantile ranges"}


def _activation_ranges(name: str | None) -> dict:
    """NNCF's advanced parameter for the ``activation_ranges`` setting ({} for NNCF's own default)."""
    if name in (None, "default"):
        return {}
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return {"activations_range_estimator_params": getattr(RangeEstimatorParametersSet, name.upper())}


@contextlib.contextmanager
def _nncf_output():
    """Keep NNCF's progress bars and log lines off stdout (``edgebuild --json`` prints the manifest
    there); its warnings are returned, to be kept as artifact notes."""
    nncf_logger = logging.getLogger("nncf")
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            lines = record.getMessage().strip().splitlines()
            records.append(lines[0][:300] if lines else record.levelname)

    saved = nncf_logger.handlers[:]
    nncf_logger.handlers = [_Keep(logging.WARNING)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield records
    finally:
        nncf_logger.handlers = saved


# ---- imports ------------------------------------------------------------------------------------------


def import_without_telemetry(name: str):
    """Import openvino or nncf with their telemetry off.

    ``import openvino`` (an "import" event), ``openvino.convert_model`` and ``nncf`` report usage to Google
    Analytics through the ``openvino_telemetry`` package unless the user opted out (``opt_in_out --opt_out``,
    a file under ~/intel) or a CI variable (CI=true, TF_BUILD, JENKINS_URL) is set; there is no other switch.
    Both fall back to a no-op stub when that package cannot be imported: the patches that make it unimportable
    (targets/isolated.py ``NO_TELEMETRY``, data) are applied for its whole life in every child of a build, where
    OpenVINO runs; here they are applied again around the import (a caller outside a child, e.g. a test) and restored
    after it. If something imported the telemetry package before, its sender is stubbed for as long as well.
    """
    from edgebuild.procs import Patch, patched
    from edgebuild.targets.isolated import NO_TELEMETRY

    patches = list(NO_TELEMETRY)
    if sys.modules.get("openvino_telemetry") is not None:  # already imported by someone else
        patches.insert(0, Patch("openvino_telemetry.utils.sender:TelemetrySender", "send",
                                lambda *args, **kwargs: None, why="a telemetry client imported before edgebuild"))
    with patched(patches):
        return importlib.import_module(name)
