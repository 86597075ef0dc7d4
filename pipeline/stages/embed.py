"""Metadata inside the artifact: what a device program needs to use the file without manifest.json.

A post-packaging step (the converters stay as they are): ONNX ``metadata_props``, a TFLite ``metadata`` entry
named ``edgebuild`` (a JSON buffer, written through the flatbuffer schema that ai-edge-litert ships), OpenVINO
``<rt_info><edgebuild>`` in the IR's XML (the .bin is untouched); a format a backend owns through its
``Backend.embed_metadata`` (ExecuTorch ``.pte``: a constant method ``edgebuild_metadata``). Every file is rewritten to a new file and
renamed over the old one, so a hard link into the stage cache is never changed; the sha256 of what lands in
the output is computed after this step. Nothing here reaches the network.

Keys (all strings; lists and mappings as JSON): ``edgebuild.version``, ``edgebuild.target``,
``edgebuild.precision``, ``edgebuild.source_model_sha256``, ``edgebuild.inputs`` (name, shape, dtype, layout),
``edgebuild.outputs`` (names), ``edgebuild.class_names`` (when known), ``edgebuild.preprocess``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

TFLITE_METADATA_NAME = "edgebuild"
PREFIX = "edgebuild."


def fields(*, version: str, target: str, precision: str, source_sha256: str, inputs: list[dict],
           outputs: list[str], preprocess: dict, class_names: list[str] | None = None) -> dict[str, str]:
    """The metadata as flat string pairs (what ONNX metadata_props and rt_info hold)."""
    out = {"version": version, "target": target, "precision": precision, "source_model_sha256": source_sha256,
           "inputs": json.dumps(inputs), "outputs": json.dumps(outputs), "preprocess": json.dumps(preprocess)}
    if class_names:
        out["class_names"] = json.dumps(list(class_names))
    return {PREFIX + k: str(v) for k, v in out.items()}


def embed(path: Path, meta: dict[str, str]) -> str | None:
    """Write ``meta`` into the artifact at ``path``; returns the format it went into, or None when the file
    kind carries no metadata (then manifest.json/metadata.json remain the only record)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        _onnx(path, meta)
        return "onnx metadata_props"
    if suffix == ".tflite":
        _tflite(path, meta)
        return f"tflite metadata '{TFLITE_METADATA_NAME}'"
    if suffix == ".xml" and path.with_suffix(".bin").is_file():
        _openvino_xml(path, meta)
        return "openvino rt_info"
    return None


def read(path: Path, backend: str | None = None) -> dict[str, str]:
    """The edgebuild metadata an artifact carries ({} when none); ``backend``: the one that reads its format when
    this module does not (``Backend.read_metadata``)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in m.metadata_props if p.key.startswith(PREFIX)}
    if suffix == ".tflite":
        from ai_edge_litert import schema_py_generated as S

        model = S.Model.GetRootAs(path.read_bytes(), 0)
        for i in range(model.MetadataLength()):
            md = model.Metadata(i)
            if md.Name() and md.Name().decode() == TFLITE_METADATA_NAME:
                data = model.Buffers(md.Buffer()).DataAsNumpy().tobytes()
                return json.loads(data.decode())
        return {}
    if suffix == ".xml":
        import xml.etree.ElementTree as ET

        node = ET.parse(path).getroot().find("rt_info/edgebuild")
        return {} if node is None else {PREFIX + c.tag: c.get("value", "") for c in node}
    if backend:
        from edgebuild.targets.base import get_backend

        return get_backend(backend).read_metadata(path)
    return {}


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # a new inode: a hard link to the cache keeps the cached bytes
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _onnx(path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external tensors stay where they are
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    _replace(path, model.SerializeToString())


def _tflite(path: Path, meta: dict[str, str]) -> None:
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as S

    model = S.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    model.metadata = [m for m in (model.metadata or []) if (m.name or b"") not in (TFLITE_METADATA_NAME,
                                                                                   TFLITE_METADATA_NAME.encode())]
    buffer = S.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    model.buffers = [*(model.buffers or []), buffer]
    entry = S.MetadataT()
    entry.name = TFLITE_METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    builder = flatbuffers.Builder(max(1024, path.stat().st_size + 4096))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    _replace(path, bytes(builder.Output()))


def _openvino_xml(path: Path, meta: dict[str, str]) -> None:
    import xml.etree.ElementTree as ET

    tree = ET.parse(path)
    net = tree.getroot()
    rt = net.find("rt_info")
    if rt is None:
        rt = ET.SubElement(net, "rt_info")
    old = rt.find("edgebuild")
    if old is not None:
        rt.remove(old)
    node = ET.SubElement(rt, "edgebuild")
    for k, v in meta.items():
        ET.SubElement(node, k[len(PREFIX):] if k.startswith(PREFIX) else k, value=v)
    _replace(path, ET.tostring(net, encoding="utf-8", xml_declaration=True))


def embed_target(ctx, profile, art, outdir: Path) -> dict[str, str]:
    """Embed the build's metadata into every file of a packaged target that can carry it (called where the
    target is described, before the files' sha256 are taken); returns {file: where it went}."""
    from dataclasses import asdict

    from edgebuild.pipeline.stages.data import class_names
    from edgebuild.pipeline.versions import tool_versions
    from edgebuild.targets.base import get_backend

    classes = class_names(ctx.job.spec, ctx.job.calib, ctx.job.evalset)
    meta = fields(version=tool_versions(("edgebuild",))["edgebuild"] or "unknown", target=profile.name,
                  precision=art.precision, source_sha256=ctx.job.model.content_hash,
                  inputs=[asdict(i) for i in ctx.job.model.inputs], outputs=[o.name for o in ctx.job.model.outputs],
                  preprocess=asdict(ctx.job.spec.preprocess), class_names=classes)
    done = {}
    for name in sorted(art.files):
        where = embed(outdir / name, meta)
        if where is None and getattr(art, "backend", None):  # a format its backend owns (Backend.embed_metadata)
            where = get_backend(art.backend).embed_metadata(outdir / name, meta)
        if where:
            done[name] = where
    return done
