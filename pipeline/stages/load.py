"""Load a model source: ONNX file, TorchScript file, torch.export program (.pt2), or ``package.module:attr``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgebuild.pipeline.errors import BadInputError
from edgebuild.pipeline.spec import BuildSpec, InputSpec
from edgebuild.refs import first_line as _first_line
from edgebuild.refs import import_ref

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
log = logging.getLogger("edgebuild.sources")


@dataclass
class LoadedModel:
    kind: str  # "onnx" | "torch"
    description: str  # what was loaded, for the manifest
    inputs: tuple[InputSpec, ...]
    onnx_path: Path | None = None
    module: Any = None  # torch.nn.Module (or the module of an ExportedProgram)
    exported_program: Any = None  # torch.export.ExportedProgram for .pt2 sources
    output_names: tuple[str, ...] = ()  # torch sources: names for the exported outputs (spec.output_names)


PYTHON_OBJECT = "python-object:"  # the spec's name of a model handed to build() as a Python object (pipeline/api.py)


def load_model(spec: BuildSpec, objects: dict[str, Any] | None = None) -> LoadedModel:
    """The model of ``spec``; torch sources carry ``spec.output_names`` (an ONNX file names its own outputs).
    ``objects``: the Python objects the build holds for models the spec names ``python-object:<class>``."""
    loaded = _load(spec, objects or {})
    if spec.output_names:
        if loaded.kind == "onnx":
            raise BadInputError("output_names is for torch models; an ONNX file names its own outputs "
                                "(rename them in the file)")
        loaded.output_names = tuple(spec.output_names)
    log.debug("model: %s; inputs %s", loaded.description,
              ", ".join(f"{i.name} {list(i.shape)} {i.dtype} {i.layout}" for i in loaded.inputs) or "from the file")
    return loaded


def _load(spec: BuildSpec, objects: dict[str, Any]) -> LoadedModel:
    if spec.is_demo:
        from edgebuild.pipeline.demo_model import INPUT_SHAPE, load_demo

        given = [tuple(i.shape) for i in spec.inputs if i.shape]
        if given and given != [tuple(INPUT_SHAPE)]:
            raise BadInputError(f"--input-shape {','.join(map(str, given[0]))}: the built-in demo's input is "
                                f"{','.join(map(str, INPUT_SHAPE))}; give --model to build your own model")
        if spec.weights:
            raise BadInputError("--weights needs --model package.module:attr (the built-in demo has its own weights)")

        return LoadedModel("torch", "built-in demo: DigitsCNN on scikit-learn digits",
                           (InputSpec("input", INPUT_SHAPE, "float32", "NCHW"),), module=load_demo())
    src = spec.model
    if src.startswith(PYTHON_OBJECT):
        if src not in objects:
            raise BadInputError(f"model {src}: a Python object handed to edgebuild.build(model=...), which a spec or "
                                "manifest cannot hold; re-run that build from Python with the object, or give a model "
                                "file or package.module:attr")
        return _torch_module(objects[src], src, spec, "Python object")
    path = Path(src)
    if spec.weights and not (":" in src and not path.exists()):
        raise BadInputError(f"--weights is for package.module:attr models; {path.name} carries its own weights")
    if path.suffix == ".onnx":
        return _onnx(path, spec)
    if path.suffix == ".pt2":
        return _exported_program(path, spec)
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        return _torchscript(path, spec)
    if ":" in src and not path.exists():
        return _python_reference(src, spec)
    if not path.exists():
        raise BadInputError(f"model not found: {src}")
    raise BadInputError(f"{src}: unknown model format (use .onnx, TorchScript .pt, torch.export .pt2 or package.module:attr)")


def _need_file(path: Path) -> None:
    if not path.is_file():
        raise BadInputError(f"model not found: {path}")


def _onnx(path: Path, spec: BuildSpec) -> LoadedModel:
    """Input shapes come from the graph: a symbolic dimension is the batch (fixed to 1) when it is named like one
    or leads; any other takes its size from the data (``onnx_file.input_shape``). Old files (IR < 4,
    weights as inputs or not) are checked as upgraded (the export records each change)."""
    import onnx

    from edgebuild.pipeline.stages.onnx_file import check_onnx, input_shape, upgrade_legacy_onnx

    _need_file(path)
    try:
        model = onnx.load(str(path), load_external_data=True)
        model, _ = upgrade_legacy_onnx(model)
        check_onnx(model, str(path))
    except Exception as e:  # protobuf DecodeError, ValidationError, ConversionError from the check, ...
        raise BadInputError(f"{path}: not a valid ONNX model ({type(e).__name__}: {_first_line(e) or 'unreadable'})") from None
    init = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init]
    given = {i.name: i for i in spec.inputs}
    unknown = [n for n in given if n not in {gi.name for gi in graph_inputs}]
    if unknown and len(spec.inputs) == 1 and graph_inputs and unknown[0] == "input":  # --input-shape without a name
        given = {graph_inputs[0].name: spec.inputs[0]}
    elif unknown:
        raise BadInputError(f"{path}: the build spec names input(s) {unknown}; the model's inputs are "
                            f"{[gi.name for gi in graph_inputs]} (name them: --input-shape NAME:1,3,224,224)")
    inputs, notes = [], []
    for gi in graph_inputs:
        t = gi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in t.shape.dim] if t.HasField("shape") else None
        if gi.name in given:
            inputs.append(_given_input(path, replace(given[gi.name], name=gi.name), dims, dtype))  # the graph's name
            continue
        if dims is None:
            raise BadInputError(f"{path}: input {gi.name} has no shape; give its shape: --input-shape {gi.name}:1,... "
                                f"with numbers (or in edgebuild.yaml: inputs: [{{name: {gi.name}, shape: [...]}}])")
        shape, taken = input_shape(path, gi.name, dims, spec, len(graph_inputs))  # the batch is 1; others from data
        notes += taken
        inputs.append(InputSpec(gi.name, shape, dtype, _onnx_layout(shape)))
    described = f"ONNX file {path.name}" + (f" ({'; '.join(notes)})" if notes else "")
    return LoadedModel("onnx", described, tuple(inputs), onnx_path=path)


def _onnx_layout(shape: tuple[int, ...]) -> str:
    if len(shape) == 4 and shape[1] in (1, 3, 4):
        return "NCHW"
    return "NHWC" if len(shape) == 4 and shape[3] in (1, 3, 4) else "ANY"


def _given_input(path: Path, given: InputSpec, dims: list | None, dtype: str) -> InputSpec:
    """A shape given for an ONNX input must keep its rank and fixed dimensions; the dtype is the graph's."""
    shape = tuple(given.shape)
    if dims is not None and (len(shape) != len(dims) or any(isinstance(d, int) and d != v for d, v in zip(dims, shape))):
        raise BadInputError(f"{path}: the given shape {list(shape)} does not fit input {given.name} of shape {dims} "
                            f"({len(dims)}-d; only its symbolic dimensions can be set)")
    if given.dtype != dtype and given.dtype != InputSpec.dtype:
        raise BadInputError(f"{path}: input {given.name} is {dtype} in the model, the build spec says {given.dtype}")
    layout = given.layout if len(shape) == 4 or given.layout != InputSpec.layout else _onnx_layout(shape)
    return InputSpec(given.name, shape, dtype, layout)


def _torch_inputs(spec: BuildSpec, what: str) -> tuple[InputSpec, ...]:
    """Torch sources need their inputs given. ``shape: []`` is a 0-d scalar input (e.g. a sample rate),
    accepted next to inputs with a shape; all inputs without a shape means none was given."""
    if not spec.inputs or not any(i.shape for i in spec.inputs):
        raise BadInputError(f"{what}: torch sources need the input shape: --input-shape 1,3,224,224 "
                            "or `inputs: [{name: input, shape: [1, 3, 224, 224]}]` in edgebuild.yaml "
                            "(`shape: []` for a 0-d scalar input next to it)")
    return spec.inputs


def _torchscript(path: Path, spec: BuildSpec) -> LoadedModel:
    """TorchScript archives hold pickles, but ``torch.jit.load`` reads them with TorchScript's own C++
    unpickler, which resolves globals only to tensors, a few containers and the archive's TorchScript classes
    (compiled TorchScript, no Python): a crafted ``data.pkl`` fails to load instead of running code
    (tests/reliability prove it)."""
    import torch

    _need_file(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise BadInputError(f"{path}: not a TorchScript file ({_first_line(e)}); "
                            "for a state dict use package.module:attr with --weights") from None
    return LoadedModel("torch", f"TorchScript file {path.name}", _torch_inputs(spec, str(path)), module=module.eval())


def _exported_program(path: Path, spec: BuildSpec) -> LoadedModel:
    import io

    import torch

    from edgebuild.pipeline.trust import BrokenArchive, audit_pt2

    _need_file(path)
    data = path.read_bytes()  # audit and load the same bytes
    try:
        problems = audit_pt2(data, trusted=spec.trust_model)
    except BrokenArchive as e:
        raise BadInputError(f"{path}: not a torch.export program ({e})") from None
    if problems:
        raise BadInputError(f"{path}: refusing to load a torch.export archive that could run code when loaded "
                            f"({problems[0]}{f'; {len(problems) - 1} more' if len(problems) > 1 else ''}); "
                            "if you trust this file, pass --trust-model")
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:  # RecursionError on a deeply nested program too: a broken file, one line
        raise BadInputError(f"{path}: not a torch.export program ({type(e).__name__}: {_first_line(e)})") from None
    inputs = spec.inputs
    if not inputs:
        user = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        inputs = []
        for s in user:
            val = nodes[s.arg.name].meta.get("val")
            if val is None or not all(isinstance(d, int) for d in val.shape):
                raise BadInputError(f"{path}: input {s.arg.name} has dynamic shape; give it: --input-shape "
                                    f"{s.arg.name}:1,3,224,224 (or in edgebuild.yaml)")
            inputs.append(InputSpec(s.arg.name, tuple(val.shape), str(val.dtype).replace("torch.", ""),
                                    "NCHW" if val.dim() == 4 else "ANY"))
        inputs = tuple(inputs)
    return LoadedModel("torch", f"torch.export program {path.name}", inputs, module=ep.module(), exported_program=ep)


def _python_reference(ref: str, spec: BuildSpec) -> LoadedModel:
    import torch

    obj = import_ref(ref, "model", search=import_folders(spec))
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise BadInputError(f"{ref} is neither an nn.Module nor a factory returning one")
        try:
            obj = obj()
        except Exception as e:
            raise BadInputError(f"{ref}() raised {type(e).__name__}: {_first_line(e, 300)}") from None
        if not isinstance(obj, torch.nn.Module):
            raise BadInputError(f"{ref}() returned {type(obj).__name__}, not an nn.Module")
    return _torch_module(obj, ref, spec, "python reference")


def _torch_module(obj, ref: str, spec: BuildSpec, what: str) -> LoadedModel:
    """An ``nn.Module`` (imported by reference or handed in as an object), with ``spec.weights`` loaded."""
    if spec.weights:
        try:
            obj.load_state_dict(load_state_dict(Path(spec.weights)))
        except RuntimeError as e:  # missing/unexpected keys, shape mismatches: keep every detail, on one line
            details = "; ".join(ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()) or _first_line(e)
            raise BadInputError(f"{spec.weights} does not fit {ref}: {details[:1500]}") from None
    return LoadedModel("torch", f"{what} {ref}" + (f" + {Path(spec.weights).name}" if spec.weights else ""),
                       _torch_inputs(spec, ref), module=obj.eval())


def import_folders(spec: BuildSpec) -> tuple[Path, ...]:
    """Where a ``package.module:attr`` model's module is looked for: the config file's directory (``python_path``,
    set by load_config), then the current directory. It is imported by its own file path: no folder is put on
    ``sys.path`` (the working directory must never shadow a library for the whole process)."""
    return (*(Path(p).resolve() for p in spec.python_path), Path.cwd())


def load_state_dict(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise BadInputError(f"weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInputError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BadInputError(f"{path}: not a state dict")
    return state
