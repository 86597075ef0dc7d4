"""The build command's flags -> the build spec's data (``spec_from_flags``): input shapes, budgets, preprocessing,
compression steps, merged over ``edgebuild.yaml`` (or a manifest re-run). Bad flags are BadInputError (exit 2)."""
from __future__ import annotations

import re
from pathlib import Path

from edgebuild.pipeline.errors import BadInputError


def _parse_shape(text: str | None):
    """``1,3,224,224`` (or ``1x3x224x224``, ``[1, 3, 224, 224]``) -> a tuple of positive ints."""
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.strip().strip("[]()").replace("x", ",").split(","))
    except ValueError:
        raise BadInputError(f"--input-shape must look like 1,3,224,224 or NAME:1,3,224,224, got {text!r}") from None
    if any(d <= 0 for d in shape):
        raise BadInputError(f"--input-shape must be positive integers, got {text!r}")
    return shape


def _parse_input_shapes(texts) -> list[tuple[str | None, tuple[int, ...]]]:
    """Each ``--input-shape``: ``NAME:1,3,224,224`` (the input of that name; the name may itself hold a colon, as
    TensorFlow's ``input:0``) or ``1,3,224,224`` (the model's only input, whatever it is called)."""
    if isinstance(texts, str):
        texts = (texts,)
    shapes = []
    for text in texts or ():
        name, colon, dims = text.rpartition(":")
        shapes.append((name.strip() or None, _parse_shape(dims)) if colon else (None, _parse_shape(text)))
    unnamed = [s for n, s in shapes if n is None]
    if unnamed and len(shapes) > 1:
        raise BadInputError("several --input-shape flags: name each input, e.g. --input-shape image:1,3,224,224 "
                            "--input-shape mask:1,1,224,224")
    names = [n for n, _ in shapes if n]
    if len(set(names)) != len(names):
        raise BadInputError(f"--input-shape names an input twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return shapes


def _bind_input_shapes(data: dict, texts) -> None:
    """--input-shape over the config's ``inputs``: a named shape sets (or adds) that input; an unnamed one sets the
    only input (for an ONNX file, the graph's one input whatever its name: edgebuild.pipeline.stages.load binds it)."""
    shapes = _parse_input_shapes(texts)
    if not shapes:
        return
    inputs = [dict(i) for i in data.get("inputs") or []]
    if shapes[0][0] is None:
        if len(inputs) > 1:
            raise BadInputError(f"--input-shape {','.join(map(str, shapes[0][1]))}: the config has inputs "
                                f"{[i.get('name') for i in inputs]}; say which: --input-shape NAME:1,3,224,224")
        data["inputs"] = [{**(inputs[0] if inputs else {}), "shape": list(shapes[0][1])}]
        return
    for name, shape in shapes:
        same = next((i for i in inputs if i.get("name", "input") == name), None)
        if same is None:
            inputs.append({"name": name, "shape": list(shape)})
        else:
            same.update(name=name, shape=list(shape))
    data["inputs"] = inputs


def spec_from_flags(config: str | None, **flags):
    from edgebuild.pipeline import manifest as manifest_file
    from edgebuild.pipeline.spec import BuildSpec, load_config

    data = {}
    config_path = config or ("edgebuild.yaml" if Path("edgebuild.yaml").is_file() else None)
    if config_path:
        data = manifest_file.rerun_spec(Path(config_path)) or load_config(config_path)
    _bind_input_shapes(data, flags.pop("input_shape"))
    preprocess = _preprocess_flags(flags)
    if preprocess:
        data["preprocess"] = {**(data.get("preprocess") or {}), **preprocess}
    budgets = data.get("budgets") or {}
    if not isinstance(budgets, dict):
        raise BadInputError(f"budgets must be a mapping, e.g. budgets: {{max_latency_ms: 20}}; got {budgets!r}"[:300])
    budgets = dict(budgets)
    for name in ("max_accuracy_drop", "max_latency_ms", "max_size_mb", "max_compression_drop"):
        value = flags.pop(name)
        if value is not None:
            budgets[name] = value
    data["budgets"] = budgets
    if flags.pop("no_auto"):
        data["auto"] = False
    if flags.pop("no_cache"):
        data["cache"] = False
    if flags.pop("trust_model"):
        data["trust_model"] = True
    steps = flags.pop("compress_steps")
    if steps:
        data["compress"] = [_parse_step(s) for s in steps]
    targets = flags.pop("target")
    if targets:
        data["targets"] = [t for chunk in targets for t in chunk.split(",") if t]
    profiles = flags.pop("profile")
    if profiles:
        data["profile_files"] = [*data.get("profile_files", []), *profiles]
    for k, v in flags.items():
        if v is not None:
            data[k] = v
    return BuildSpec.from_dict(data), config_path


def _numbers(flag: str, text: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.strip().strip("[]()").replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise BadInputError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise BadInputError(f"{flag} must be comma-separated numbers, got {text!r}")
    return values


def _preprocess_flags(flags: dict) -> dict:
    """--resize/--mean/--std/--scale/--color/--layout -> preprocess: fields (over the config's)."""
    out = {}
    resize = flags.pop("resize", None)
    if resize:
        hw = _numbers("--resize", resize, int)
        if len(hw) not in (1, 2) or min(hw) <= 0:
            raise BadInputError(f"--resize must be HEIGHT,WIDTH (or one size for both), got {resize!r}")
        out["resize"] = hw * 2 if len(hw) == 1 else hw
    for name in ("mean", "std"):
        value = flags.pop(name, None)
        if value:
            out[name] = _numbers(f"--{name}", value)
    for name in ("scale", "color", "layout", "crop", "interpolation"):
        value = flags.pop(name, None)
        if value is not None:
            out[name] = value
    return out


def _parse_step(text: str) -> dict:
    """`prune:method=structured,ratio=0.5` -> {"prune": {"method": "structured", "ratio": 0.5}}."""
    import yaml

    kind, _, rest = text.partition(":")
    options = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas inside [a,b] belong to the list
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise BadInputError(f"--compress {text!r}: options must be key=value, comma-separated")
        try:
            options[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise BadInputError(f"--compress {text!r}: cannot read the value of {k.strip()} "
                                f"({str(e).splitlines()[0]})") from None
    return {kind.strip(): options}
