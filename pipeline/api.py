"""The Python API: ``edgebuild.build`` — the same build the CLI runs, from Python objects.

``build(spec)`` takes a BuildSpec; ``build(model=..., calib=..., targets=[...])`` takes the same options as
``edgebuild.yaml`` as keywords, plus Python objects where a file would go:

- ``model``: a path (``.onnx``, ``.pt``, ``.pt2``; str or Path), ``package.module:attr``, a ``torch.nn.Module``
  or a ``torch.export.ExportedProgram`` (torch models need ``input_shape=`` or ``inputs=``);
- ``calib`` / ``eval`` / ``train``: a source string or Path, a NumPy array of samples, an ``(x, y)`` pair, a
  ``{input name: array}`` mapping (``labels``/``y`` for labels), or a torch ``DataLoader`` yielding
  ``x`` or ``(x, y)`` batches.

Objects are handed to the build through files in a private temporary directory (arrays as ``.npz``, an
ExportedProgram as ``.pt2``) or, for an ``nn.Module``, in memory: the build holds it for its own run (``models=``
of ``pipeline/build.py``), nothing is stored in any module, so builds in threads of one process never see each
other's models. The spec (and the manifest) says what was built and how to re-run it: ``python-object:<class>``
(e.g. ``python-object:__main__.Net``), an object handed to ``build()`` — re-run from Python with that object; a
spec or manifest alone names no loadable model then, and building from it says so (exit 2).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgebuild.errors import optional_imports
from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.stages.load import PYTHON_OBJECT


def build(spec=None, /, *, stage: Callable | None = None, input_shape=None, jobs: int | None = None,
          env: dict[str, str] | None = None, **options):
    """Run a build and return its ``BuildResult`` (``.manifest``, ``.out``, ``.exit_code``,
    ``.raise_for_verdict()``). Bad input raises ``edgebuild.EdgeBuildError`` (a ``BadInputError``). ``stage``: the
    progress sink; ``jobs``: targets converted at once; ``env``: variables for the build's child processes only."""
    from edgebuild.pipeline.build import build as run_build
    from edgebuild.pipeline.spec import BuildSpec

    if spec is not None and options:
        raise BadInputError("build(): give a BuildSpec or keyword options, not both "
                            "(use spec.replace(...) to change a spec)")
    if spec is not None and not isinstance(spec, BuildSpec):
        if isinstance(spec, dict):
            options, spec = dict(spec), None
        else:
            raise BadInputError(f"build(): the first argument must be a BuildSpec or a dict, got {type(spec).__name__}")
    kwargs = {"jobs": jobs, "env": env, **({} if stage is None else {"stage": stage})}
    if spec is not None:
        with optional_imports():
            return run_build(spec, **kwargs)
    with optional_imports(), tempfile.TemporaryDirectory(prefix="edgebuild-api-") as tmp:
        models: dict[str, Any] = {}
        data = _options_to_dict(options, input_shape, Path(tmp), models)
        return run_build(BuildSpec.from_dict(data), models=models, **kwargs)


def _options_to_dict(options: dict, input_shape, tmp: Path, models: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in options.items() if v is not None}
    if "target" in data:  # the CLI's spelling
        data.setdefault("targets", [])
        data["targets"] = [*data["targets"], *([data.pop("target")] if isinstance(data["target"], str) else data.pop("target"))]
    if isinstance(data.get("targets"), str):
        data["targets"] = [t for t in data["targets"].split(",") if t]
    if input_shape is not None:
        first = dict((data.get("inputs") or [{}])[0])
        first["shape"] = [int(d) for d in input_shape]
        data["inputs"] = [first, *(data.get("inputs") or [])[1:]]
    elif isinstance(data.get("inputs"), dict):
        data["inputs"] = [data["inputs"]]
    if "model" in data:
        data["model"] = _model_source(data["model"], tmp, models)
    for key in ("calib", "eval", "train"):
        if key in data:
            data[key] = _data_source(data[key], tmp / f"{key}.npz", key)
    for key in ("out", "weights", "cache_dir"):
        if isinstance(data.get(key), Path):
            data[key] = str(data[key])
    if "profile_files" in data:
        data["profile_files"] = [str(p) for p in data["profile_files"]]
    return data


def _model_source(model: Any, tmp: Path, models: dict[str, Any]) -> str:
    """What the spec says the model is; an ``nn.Module`` goes into ``models`` under that name, held for the build."""
    if isinstance(model, (str, Path)):
        return str(model)
    torch = sys.modules.get("torch")  # a torch object can only come from a program that imported torch
    if torch is not None and isinstance(model, torch.nn.Module):
        name = f"{PYTHON_OBJECT}{type(model).__module__}.{type(model).__qualname__}"
        models[name] = model
        return name
    if torch is not None and isinstance(model, torch.export.ExportedProgram):
        path = tmp / "model.pt2"
        torch.export.save(model, str(path))
        return str(path)
    raise BadInputError(f"model must be a path, package.module:attr, an nn.Module or an ExportedProgram; "
                        f"got {type(model).__name__}")


def _data_source(value: Any, path: Path, key: str) -> str:
    """A data object -> the ``.npz`` file the build reads (``x`` or input names, ``y`` labels)."""
    import numpy as np

    if isinstance(value, (str, Path)):
        return str(value)
    arrays: dict[str, Any]
    if isinstance(value, dict):
        arrays = {k: np.asarray(v) for k, v in value.items()}
    elif isinstance(value, tuple) and len(value) == 2:
        arrays = {"x": np.asarray(value[0]), "y": np.asarray(value[1])}
    elif isinstance(value, np.ndarray):
        arrays = {"x": value}
    elif _is_dataloader(value):
        arrays = _from_loader(value, key)
    else:
        raise BadInputError(f"{key} must be a path, an array, an (x, y) pair, a mapping of arrays or a torch "
                            f"DataLoader; got {type(value).__name__}")
    np.savez(path, **arrays)
    return str(path)


def _is_dataloader(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.utils.data.DataLoader)


def _from_loader(loader, key: str) -> dict:
    import numpy as np

    xs, ys = [], []
    for batch in loader:
        if isinstance(batch, (tuple, list)):
            if len(batch) not in (1, 2):
                raise BadInputError(f"{key}: a DataLoader batch must be x or (x, y), got {len(batch)} items")
            xs.append(np.asarray(batch[0]))
            if len(batch) == 2:
                ys.append(np.asarray(batch[1]))
        else:
            xs.append(np.asarray(batch))
    if not xs:
        raise BadInputError(f"{key}: the DataLoader yielded nothing")
    out = {"x": np.concatenate(xs)}
    if ys:
        out["y"] = np.concatenate(ys)
    return out
