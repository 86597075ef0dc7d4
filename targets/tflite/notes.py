"""What a TFLite artifact's record says about it: the converter versions and the notes of the report and manifest."""
from __future__ import annotations

from importlib import metadata

from edgebuild.targets.tflite.fused_lstm import STATEFUL_OPS


def converter_version() -> str:
    v = {n: _version(n) for n in ("onnx2tf", "tensorflow")}
    return f"onnx2tf {v['onnx2tf']} -> tf.lite.TFLiteConverter (tensorflow {v['tensorflow']})"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def artifact_notes(precision: str, io: dict, result: dict, s: dict, seconds: float) -> list[str]:
    notes = [f"converted in {seconds:.1f} s with {converter_version()}",
             f"device runtime: LiteRT / TensorFlow Lite >= {result.get('min_runtime_version', '?')} "
             f"(the model's min_runtime_version); builtin ops: {', '.join(result['ops'])}"]
    what = {"fp32": "FP32 weights and arithmetic",
            "fp16": "FP16 weights (half size): the GPU delegate computes in FP16; XNNPACK on CPU dequantizes to FP32",
            "dynamic": "weight-only INT8 (dynamic range): activations stay float, quantized on the fly per op",
            "int8": f"full-integer INT8 (every op int8; calibrated on {s.get('calibration_samples_used')} samples; "
                    f"{'per-channel' if s.get('per_channel', True) else 'per-tensor'} weights; "
                    f"TF's {s.get('quantizer_used')} quantizer)"}
    if s.get("float_layers_kept"):
        kept = s["float_layers_kept"]
        what["int8"] = (f"mixed INT8: every op int8 except the {sum(map(len, kept.values()))} TFLite op(s) of "
                        f"{len(kept)} ONNX layer(s) kept in float (float weights and activations, with QUANTIZE/"
                        f"DEQUANTIZE at their borders; calibrated on {s.get('calibration_samples_used')} samples; "
                        f"{'per-channel' if s.get('per_channel', True) else 'per-tensor'} weights; TF's mlir quantizer, "
                        "as the legacy one cannot keep layers in float)")
    if s.get("transformer_float_ops") and not s.get("float_layers_kept"):
        what["int8"] = (f"mixed INT8 for a transformer: every op int8 except the {len(s['transformer_float_ops'])} TFLite "
                        "op(s) of its LayerNorm, Softmax and GELU, kept in float (transformer_float: TFLite has no int8 "
                        "LayerNorm, and its int8 decomposition lost the model's accuracy); calibrated on "
                        f"{s.get('calibration_samples_used')} samples")
    elif s.get("tail_float_ops") and not s.get("float_layers_kept"):
        what["int8"] = (f"mixed INT8: every op int8 except the {len(s['tail_float_ops'])} TFLite op(s) of the "
                        "post-processing tail after the last weighted layer, kept in float (float_tail: one int8 "
                        "scale for pixel boxes and [0, 1] scores rounds the scores away); calibrated on "
                        f"{s.get('calibration_samples_used')} samples")
    elif s.get("frontend_float_ops") and not s.get("float_layers_kept"):
        what["int8"] = (f"mixed INT8: every op int8 except the {len(s['frontend_float_ops'])} TFLite op(s) of the "
                        "signal-processing front-end before the first learned layer, kept in float with its fixed "
                        "kernels (float_frontend: 8-bit there loses the spectrogram)"
                        + (f", and {len(s['float_ops_kept'])} kept in float by the converter "
                           f"({'; '.join(s.get('repairs') or [])})" if s.get("float_ops_kept") else "")
                        + f"; calibrated on {s.get('calibration_samples_used')} samples")
    elif s.get("float_ops_kept") and not s.get("float_layers_kept"):
        what["int8"] = (f"mixed INT8: every op int8 except {len(s['float_ops_kept'])} TFLite op(s) kept in float by the "
                        f"converter ({'; '.join(s.get('repairs') or [])}), with QUANTIZE/DEQUANTIZE at their borders; "
                        f"calibrated on {s.get('calibration_samples_used')} samples")
    if precision == "int8" and s.get("activations") == "dynamic":
        what["int8"] = ("dynamic-range INT8 (the accuracy search's recurrent recipe): weights int8 per channel, "
                        "activations float, quantized on the fly per op and time step; recurrent layers kept a loop")
    notes.append(what[precision])
    narrowed = result.get("ranges_repaired") or []
    if precision == "int8" and narrowed:
        first, method = narrowed[0], s.get("calibrate_method", "minmax")
        why = ("to the mean of each sample's min and max measured in LiteRT (calibrate_method: mean_minmax)"
               if method == "mean_minmax" else
               f"by onnxruntime's {method} search over the values measured in LiteRT (calibrate_method: {method})"
               if method != "minmax" else "to what the calibration data holds (TF's calibrator logs an op's first "
               "input after the op overwrote its buffer)")
        notes.append(f"{len(narrowed)} activation range(s) narrowed {why}, e.g. {first['tensor'][:60]} "
                     f"{first['logged']} -> {first['measured']}")
    if any(op.startswith("WHILE ") for op in result["ops"]):
        notes.append("recurrent layers kept as a WHILE loop over time steps (not unrolled: XNNPACK would hold packed "
                     "weights once per step)")
    fused = [op.split()[0] for op in result["ops"] if op.split()[0] in STATEFUL_OPS]
    if fused:
        notes.append(f"stateful: {', '.join(fused)} (lstm_fused) keeps its state in variable tensors between "
                     "invocations; call reset_all_variables() (Android: resetVariableTensors()) before each independent "
                     "sequence, as edgebuild's runner does before every run, or the next call starts from the last state")
    notes += [f"ONNX rewrite before onnx2tf: {r}" for r in s.get("onnx_rewrites") or []]
    if s.get("xnnpack_checked"):
        notes.append("loaded and ran one sample in LiteRT with XNNPACK after conversion")
    cov = s.get("xnnpack_coverage") or {}
    if "ops" in cov:
        rest = ", ".join(f"{op} x{n}" for op, n in sorted(cov["fallback"].items()))
        notes.append(f"XNNPACK runs {cov['delegated']} of {cov['ops']} ops in {cov['partitions']} partition(s)"
                     + (f"; on LiteRT's builtin kernels: {rest}" if rest else ""))
    for node, ops in (s.get("float_layers_kept") or {}).items():
        notes.append(f"float layer {node}: " + ("; ".join(ops) if ops else "no TFLite op of its own stayed float "
                                                "(folded or fused by the converter)"))
    for p in io["inputs"] + io["outputs"]:
        if "from_input" in p:
            notes.append(f"output {p['name']} is input {p['from_input']} unchanged: the .tflite does not compute it "
                         "(onnx2tf drops pass-through outputs); edgebuild's runner returns the input, a device app has it")
        elif p["scale"] is not None:
            notes.append(f"{p['name']} is {p['dtype']} on the device: real = {p['scale']:.6g} * (q - {p['zero_point']})")
    for p in io["inputs"]:
        if p["source_shape"] == [] and p["shape"] == [1]:
            notes.append(f"input {p['name']} is 0-d in the source and shape [1] on the device (onnx2tf makes scalar "
                         "inputs rank 1); edgebuild's runner reshapes, a device app feeds one value as [1]")
        if p["perm"]:
            notes.append(f"input {p['name']} is {p['layout']} {p['shape']} on the device (source {p['source_layout']} "
                         f"{p['source_shape']}); edgebuild's runner transposes, a device app feeds it in that layout")
    for p in io["outputs"]:
        if p.get("perm"):
            notes.append(f"output {p['name']} is {p['layout']} {p['shape']} on the device (source "
                         f"{p['source_shape']}); edgebuild's runner transposes it back")
    notes.append(f"host check: LiteRT {_version('ai-edge-litert')} with {s['host_kernels']} kernels; "
                 "latency times invoke() only, like benchmark_model")
    return notes
