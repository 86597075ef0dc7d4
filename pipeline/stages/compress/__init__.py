"""Stage: compression before export — ``compress(loaded, spec, evalset, stage) -> (LoadedModel, record)``.

The steps of ``spec.compress`` run in order on a copy of the torch model (the input is never modified).
Each step is a module registered by its ``KIND`` in ``registry()``, with a frozen ``Config`` dataclass (its
options, validated in one place) and ``run(model, cfg, ctx) -> (model, details)``; ``run`` gets a copy it
may change in place:

    prune     unstructured magnitude pruning, or structured channel pruning (torch-pruning)  prune.py
    lowrank   truncated-SVD factorization of Linear and Conv layers                         lowrank.py
    distill   knowledge distillation from the original model, or recovery fine-tuning       distill.py

Every step is measured before and after (measure.py) and checked with a forward pass; the record that
lands in manifest.json under "compression" is
``{"steps": [{kind, options, before, after, details, seconds}], "original", "final", "summary", "training",
"warnings"}``; ``markdown(record)`` renders it for the human report.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

from edgebuild.calibration.dataset import SampleSet
from edgebuild.pipeline.errors import BadInputError, ConversionError
from edgebuild.pipeline.spec import BuildSpec, CompressStep, InputSpec
from edgebuild.pipeline.stages.load import LoadedModel

DEMO_TRAIN = "digits:train"  # the demo's calibration split; its evaluation split is digits:test
WARN_DROP = 1.0  # accuracy points lost by compression above which the record carries a warning


def registry() -> dict[str, Any]:
    """Every compression step by name (the step modules import torch, so they load on first use)."""
    from edgebuild.pipeline.stages.compress import distill, lowrank, prune

    return {m.KIND: m for m in (prune, lowrank, distill)}


@dataclass
class StepContext:
    """What a step may use besides its model and config."""

    spec: BuildSpec
    inputs: tuple[InputSpec, ...]
    evalset: SampleSet
    stage: Callable[[str], Any]
    label: str = ""  # "step 2/3 (distill)", for messages and progress
    original: Any = None  # the model as loaded, before any step (untouched; the default distillation teacher)
    before: Any = None  # the model before this step (untouched)
    train: SampleSet | None = None  # training data, loaded and checked once when a step needs it
    example: tuple = ()  # batch-1 example inputs (torch tensors)

    def training_data(self) -> SampleSet:
        if self.train is None:
            raise BadInputError(f"compress {self.label}: no training data (give --train or `train:` in edgebuild.yaml)")
        return self.train


def parse_step(step: CompressStep):
    """The step's module and its validated Config; unknown kinds and options are a BadInputError."""
    steps = registry()
    module = steps.get(step.kind)
    if module is None:
        raise BadInputError(f"unknown compress step {step.kind!r}; use one of: {', '.join(steps)}")
    known = [f.name for f in dataclasses.fields(module.Config)]
    unknown = sorted(set(step.options) - set(known))
    if unknown:
        raise BadInputError(f"compress {step.kind}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    try:
        return module, module.Config(**step.options)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"compress {step.kind}: invalid options {step.options}: {e}") from None


def config_dict(cfg) -> dict:
    """A step config as JSON-able data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def compress(loaded: LoadedModel, spec: BuildSpec, evalset: SampleSet, stage) -> tuple[LoadedModel, dict]:
    """Run every compression step of ``spec`` on a copy of ``loaded.module``; return the new model and the record."""
    _check_source(loaded)
    plan = [parse_step(s) for s in spec.compress]  # every step's options are checked before any work
    from edgebuild.pipeline.stages.compress import measure as M

    model = copy.deepcopy(loaded.module).eval()
    example = M.example_inputs(loaded.inputs)
    expected = _source_shapes(model, example)
    record: dict = {"steps": []}
    ctx = StepContext(spec, loaded.inputs, evalset, stage, original=copy.deepcopy(model), example=example)
    if any(getattr(module, "NEEDS_TRAIN", False) for module, _ in plan):
        with stage("compression: reading training data"):
            ctx.train, record["training"] = training_set(spec, loaded.inputs, evalset)
    with stage("compression: measuring the original model"):
        before, ref_out = M.measure(model, evalset, loaded.inputs, None)
    reference = M.Reference(ref_out, evalset.labels)
    record["original"] = before
    for i, (module, cfg) in enumerate(plan, 1):
        ctx.label = f"step {i}/{len(plan)} ({module.KIND})"
        ctx.before = model
        t0 = time.perf_counter()
        with stage(f"compression {ctx.label}"):
            new, details = module.run(copy.deepcopy(model), cfg, ctx)
            _check_forward(new, example, expected, ctx.label)
        with stage(f"compression {ctx.label}: measuring"):
            after, _ = M.measure(new, evalset, loaded.inputs, reference)
        record["steps"].append({"kind": module.KIND, "options": config_dict(cfg), "before": before, "after": after,
                                "details": details, "seconds": round(time.perf_counter() - t0, 2)})
        model, before = new.eval(), after
    record["final"] = before
    record["summary"] = M.summary(record["original"], before)
    drop = record["summary"]["accuracy_drop"]
    if drop is not None and drop > WARN_DROP:
        record["warnings"] = [f"compression lost {drop:.2f} pt of accuracy on {evalset.name} (more than {WARN_DROP} pt); "
                              "add or lengthen a distill step, or compress less"]
    kinds = "+".join(s["kind"] for s in record["steps"])
    out = dataclasses.replace(loaded, module=model, exported_program=None,
                              description=f"{loaded.description}, compressed ({kinds})")
    return out, record


def _check_source(loaded: LoadedModel) -> None:
    import torch

    if loaded.kind != "torch" or loaded.module is None:
        raise BadInputError(f"compression needs a torch model; {loaded.description} is not one "
                            "(give the torch source: package.module:attr with --weights)")
    if loaded.exported_program is not None or isinstance(loaded.module, torch.jit.ScriptModule):
        raise BadInputError(f"compression needs a Python nn.Module it can restructure and train; {loaded.description} "
                            "is frozen (give package.module:attr with --weights)")


def training_set(spec: BuildSpec, inputs: tuple[InputSpec, ...], evalset: SampleSet) -> tuple[SampleSet, dict]:
    """The fine-tuning data: ``spec.train`` (the demo defaults to digits:train); it must not share a sample with evaluation."""
    from edgebuild.calibration.sources import load_source

    source = spec.train or (DEMO_TRAIN if spec.is_demo else None)
    if source is None:
        raise BadInputError("distillation/fine-tuning needs training data: give --train SRC (or `train:` in edgebuild.yaml); "
                            "it must not overlap the evaluation data")
    train = load_source(source, inputs, spec.preprocess)
    if len(train) == 0:
        raise BadInputError(f"training data {source} is empty")
    seen = set(evalset.sample_hashes())
    overlap = sum(h in seen for h in train.sample_hashes())
    if overlap:
        raise BadInputError(f"training data {source} shares {overlap} of {len(train)} samples with the evaluation data "
                            f"{evalset.name}; training on evaluation samples would fake the accuracy")
    return train, {**train.describe(), "overlap_with_evaluation": 0}


def _output_shapes(model, example) -> list[tuple]:
    import torch

    from edgebuild.pipeline.stages.compress.measure import as_tensors, eval_mode

    with torch.no_grad(), eval_mode(model):
        return [tuple(t.shape) for t in as_tensors(model(*example))]


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _source_shapes(model, example) -> list[tuple]:
    try:
        return _output_shapes(model, example)
    except Exception as e:
        raise BadInputError(f"the model does not run on its input spec ({_first_line(e)})") from None


def _check_forward(model, example, expected: list[tuple], label: str) -> None:
    """A step must leave a model that runs and gives outputs of the original shapes."""
    try:
        got = _output_shapes(model, example)
    except Exception as e:
        raise ConversionError(f"compress {label} broke the model: the forward pass fails ({_first_line(e)})") from e
    if got != expected:
        raise ConversionError(f"compress {label} broke the model: output shapes {got}, expected {expected}")


def _label(step: dict) -> str:
    """``prune:method=structured,ratio=0.5``: the kind and the options that differ from their defaults."""
    defaults = config_dict(registry()[step["kind"]].Config())
    changed = [f"{k}={v}" for k, v in step["options"].items() if v is not None and defaults.get(k) != v]
    return step["kind"] + (":" + ",".join(changed) if changed else "")


def markdown(record: dict) -> list[str]:
    """The compression record as Markdown lines, for the human report."""
    def row(name: str, m: dict) -> str:
        acc = f"{m['accuracy']:.2f} %" if "accuracy" in m else "–"
        lat = f"{m['latency_ms']:.3f} ms" if "latency_ms" in m else "–"
        return f"| {name} | {m['params']:,} | {m['macs']:,} | {m['fp32_bytes'] / 1e6:.3f} MB | {acc} | {lat} |"

    s = record["summary"]
    drop = "–" if s["accuracy_drop"] is None else f"{s['accuracy_drop']:+.2f} pt"
    lines = ["## Compression", "",
             f"MACs ÷{s['mac_reduction']}, parameters ÷{s['param_reduction']}, accuracy drop {drop} "
             "(FP32 torch model on the evaluation set)", "",
             "| model | parameters | MACs | FP32 size | accuracy | CPU latency (1 thread) |", "|---|---|---|---|---|---|",
             row("original", record["original"])]
    lines += [row(f"after {i}. {_label(st)}", st["after"]) for i, st in enumerate(record["steps"], 1)]
    return lines + [f"- warning: {w}" for w in record.get("warnings", [])]
