"""edgebuild's metadata inside a ``.tflite``: a ``metadata`` entry named ``edgebuild`` (a JSON buffer), written
through the flatbuffer schema that ai-edge-litert ships, as a new file renamed over the old one."""
from __future__ import annotations

import json
from pathlib import Path

from edgebuild.targets.base import replace_file

NAME = "edgebuild"  # the model's metadata entry


def embed(path: Path, meta: dict[str, str]) -> None:
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as S

    model = S.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    model.metadata = [m for m in (model.metadata or []) if (m.name or b"") not in (NAME, NAME.encode())]
    buffer = S.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    model.buffers = [*(model.buffers or []), buffer]
    entry = S.MetadataT()
    entry.name = NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    builder = flatbuffers.Builder(max(1024, path.stat().st_size + 4096))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    replace_file(path, bytes(builder.Output()))


def read(path: Path) -> dict[str, str]:
    from ai_edge_litert import schema_py_generated as S

    model = S.Model.GetRootAs(path.read_bytes(), 0)
    for i in range(model.MetadataLength()):
        md = model.Metadata(i)
        if md.Name() and md.Name().decode() == NAME:
            data = model.Buffers(md.Buffer()).DataAsNumpy().tobytes()
            return json.loads(data.decode())
    return {}
