"""INT8 quantization in a converter child (targets/isolated.py): static QDQ, dynamic INT8, or onnxruntime's plain
dynamic recipe; the result must hold int8 layers."""
from __future__ import annotations

from pathlib import Path

from edgebuild.calibration.dataset import SampleSet
from edgebuild.errors import ConversionError
from edgebuild.targets.onnx.coverage import coverage_note
from edgebuild.targets.onnx.dynamic import quantize_dynamic_all, quantize_int8_dynamic, quantize_recurrent
from edgebuild.targets.onnx.static import quantize_qdq
from edgebuild.targets.onnx.weight_only import int8_weights


def quantize_isolated(src: Path, out: Path, calib: SampleSet, settings: dict, workdir: Path, precision: str,
                      target: str, ranges_store: Path | None = None, runtime_counts: bool = True) -> list[str]:
    """Dynamic or static INT8 quantization in a converter child (targets/isolated.py): a crash or a hang of
    onnxruntime's native code fails this target, not the build. Returns the conversion's notes. ``ranges_store``:
    static INT8's activation ranges kept across this build's conversions (static.py ``stored_ranges``).
    ``runtime_counts``: the notes say what onnxruntime runs in int8 and in float (not for a TensorRT artifact)."""
    from edgebuild.targets.isolated import run_with_samples

    job = {"src": str(src), "out": str(out), "settings": settings, "workdir": str(workdir), "precision": precision,
           "target": target, "ranges_store": str(ranges_store) if ranges_store else None,
           "runtime_counts": runtime_counts}
    static = precision == "int8" and settings.get("activations") != "dynamic"
    samples = static or (precision == "int8" and settings.get("weight_only", False))  # the weight-only check's
    return run_with_samples(_quantize_job, job, calib if samples else None,
                            what=f"{target}: ONNX {precision} conversion failed", name="convert:onnx")


def _quantize_job(job: dict) -> list[str]:
    """In the converter child: the quantization proper."""
    from edgebuild.targets.isolated import samples_from_disk, set_phase

    src, out, workdir = Path(job["src"]), Path(job["out"]), Path(job["workdir"])
    set_phase(f"onnxruntime {job['precision']} quantization")
    if job["precision"] == "dynamic":
        quantize_dynamic_all(src, out, workdir)
        return []
    if job["settings"].get("activations") == "dynamic":
        notes = quantize_int8_dynamic(src, out, job["settings"], workdir)
    else:
        store = Path(job["ranges_store"]) if job.get("ranges_store") else None
        notes = quantize_qdq(src, out, samples_from_disk(job["samples"]), job["settings"], workdir, ranges_store=store)
        if job["settings"].get("quantize_recurrent", True):
            notes += quantize_recurrent(out, job["settings"], workdir)
    _check_quantized(out, job["target"])
    if job["settings"].get("weight_only", False):  # the float layers' weights int8 where it costs nothing
        set_phase("weight-only INT8 of the float layers")
        notes += int8_weights(out, out, samples_from_disk(job["samples"]), workdir, source=src,
                              max_loss_db=job["settings"].get("weight_only_loss_db", 1.0))
    if job.get("runtime_counts", True):
        set_phase("counting the int8 kernels onnxruntime runs")
        notes += [n for n in [coverage_note(out)] if n]
    return notes


def _check_quantized(path: Path, target: str) -> None:
    """An ``_int8`` file must hold int8 layers: onnxruntime quantizes nothing inside If/Loop subgraphs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if not any(n.op_type in ("DequantizeLinear", "DynamicQuantizeLSTM", "MatMulInteger") for n in graph.node):
        subgraphs = sorted({n.op_type for n in graph.node if any(a.type == onnx.AttributeProto.GRAPH for a in n.attribute)})
        where = f" (its layers sit inside {', '.join(subgraphs)} subgraphs, which onnxruntime does not quantize)" if subgraphs else ""
        raise ConversionError(f"{target}: INT8 quantization left every layer in float{where}")
