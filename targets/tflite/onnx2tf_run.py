"""onnx2tf, run offline: ONNX -> TF/Keras graph (NHWC), checked against onnxruntime on one sample.

Used by the conversion child (targets/tflite/convert.py). Nothing may download: ``NO_NETWORK`` (patches, applied
in the child for its job) makes the socket layer refuse any non-local connection, and onnx2tf's sample-image download (it fetches MS-COCO images
from GitHub for every model whose inputs are all 3-channel 4-D tensors) is replaced by our own calibration
images. Before onnx2tf, targets/tflite/rewrite/ rewrites what onnx2tf or INT8 cannot handle.

onnx2tf options, and why:
- a graph, not a file path: onnx2tf then starts no onnxsim subprocess and no auto-JSON retries;
  top-level ``Constant`` nodes become initializers first (what onnxsim would do).
- ``keep_shape_absolutely_input_names``: inputs that keep their shape (a state [layers, batch, hidden], a
  0-d scalar); ``keep_ncw_or_nchw_or_ncdhw_input_names`` for 4-D inputs a profile keeps channels-first.
- ``enable_rnn_unroll`` for INT8 only (``rnn_unrolled``): LSTM/GRU unrolled into ops that have int8 kernels (TF's
  calibrator crashes on the loop form). FP32/FP16/dynamic keep the recurrence a WHILE loop: XNNPACK packs the
  weights of every op it takes, so an unrolled recurrence holds one packed copy per time step (a 4 MB CNN+BiLSTM
  FP32 model: 212 MB resident in LiteRT with XNNPACK unrolled, 12.5 MB as a loop; 55 ms -> 17.5 ms). With
  ``lstm_fused`` (opt-in), an FP32/FP16 LSTM becomes TFLite's stateful fused sequence op instead (fused_lstm.py).
"""
from __future__ import annotations

import itertools
import re
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from edgebuild.procs import Patch, patched
from edgebuild.similarity import cosine
from edgebuild.targets.isolated import ANSI, O2T_BOILERPLATE
from edgebuild.targets.tflite.fused_lstm import FUSED_LSTM, FUSED_PRECISIONS, without_unread_cell_state
from edgebuild.targets.tflite.mixed import ConversionFailure

CHANNEL_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}  # NC... -> N...C
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "")


class NetworkBlocked(OSError):
    pass


def _refuse_connect(real):
    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in LOCAL_HOSTS and not host.startswith("/"):
            raise NetworkBlocked(f"edgebuild converts offline; refused a connection to {address}")
        return real(self, address)
    return connect


def _refuse_lookup(real):
    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, *LOCAL_HOSTS):
            raise NetworkBlocked(f"edgebuild converts offline; refused to look up {host}")
        return real(host, *args, **kwargs)
    return getaddrinfo


# Conversion is offline: every non-local connection and name lookup is refused (edgebuild.procs.patched, inside the
# converter child: targets/tflite/family.py ``convert_job``).
NO_NETWORK = (
    Patch("socket:socket", "connect", wrap=_refuse_connect, why="no connection to a non-local address"),
    Patch("socket:socket", "connect_ex", wrap=_refuse_connect, why="no connection to a non-local address"),
    Patch("socket", "getaddrinfo", wrap=_refuse_lookup, why="no name lookup of a non-local host"),
)


_FOR_THE_PROCESS = ExitStack()  # block_network's patches (held: a collected generator would restore them)


def block_network() -> None:
    """Refuse every non-local connection (and name lookup) for the rest of this process: for a process of its own
    (``python -m edgebuild.targets.tflite.convert``); a converter child applies ``NO_NETWORK`` for its job only."""
    _FOR_THE_PROCESS.enter_context(patched(NO_NETWORK))  # never closed: the process ends with it


def offline_sample_images(calib: dict[str, np.ndarray], job: dict):
    """Stands in for onnx2tf's ``download_test_image_data``: our own calibration images, NHWC float32."""

    def sample_images() -> np.ndarray:
        for spec in job["inputs"]:
            x = calib[spec["name"]]
            if x.ndim != 5 or x.shape[1] != 1:  # samples of a batch-1 4-D input
                continue
            x = x[:20, 0]
            perm = spec.get("perm")
            return np.ascontiguousarray(x.transpose(perm) if perm else x).astype(np.float32)
        raise RuntimeError("onnx2tf asked for sample images but the model has no 4-D input")

    return sample_images


def to_keras(onnx_path: str, job: dict, calib: dict, workdir: Path):
    import onnx
    import onnx2tf
    import tensorflow as tf

    inputs = job["inputs"]
    # onnx2tf matches these lists against input names it has already sanitized (':' -> '__', as tf2onnx's
    # ``serving_default_input_2:0``): an unsanitized name matched nothing, and a 3-D audio input [1, N, 1] went NWC
    keep_shape = [n for i in inputs if not i.get("perm") and not i.get("keep_source_layout") for n in _o2t_names(i["name"])]
    keep_nchw = [n for i in inputs if i.get("keep_source_layout") for n in _o2t_names(i["name"])]
    from edgebuild.targets.tflite.rewrite import rewrite

    graph = constants_to_initializers(onnx.load(onnx_path))
    if lstm_fused(job):
        graph = without_unread_cell_state(graph)
    if job["settings"].get("onnx_rewrites", True):
        graph, job["rewrites"] = rewrite(graph, job.get("precision", "fp32"))
    graph = with_shapes(graph)
    sample = offline_sample_images(calib, job)
    tensors: dict = {}

    def keeping_tensors(real):  # onnx2tf's map ONNX tensor name -> TF tensor, kept for float_layers
        def outputs(*args, **kwargs):
            tensors.update(kwargs.get("tf_layers_dict") or {})
            return real(*args, **kwargs)
        return outputs

    onnx2tf_patches = (  # applied for this conversion only: a caller's process (tests) keeps onnx2tf as it was
        Patch("onnx2tf.onnx2tf", "download_test_image_data", sample, why="the name onnx2tf.convert calls: our own "
              "calibration images, never a download"),
        Patch("onnx2tf.utils.common_functions", "download_test_image_data", sample, why="the same, where it is defined"),
        Patch("onnx2tf.onnx2tf", "get_tf_model_outputs", wrap=keeping_tensors, why="the ONNX -> TF tensor map"),
    ) + (FUSED_LSTM if lstm_fused(job) else ())
    created: list = []
    with patched(onnx2tf_patches), \
            tf.variable_creator_scope(lambda make, **kw: created.append(make(**kw)) or created[-1]):
        # a graph, not a file path: onnx2tf then starts no onnxsim subprocess and no auto-JSON retries
        km = onnx2tf.convert(
            onnx_graph=graph, output_folder_path=str(workdir / "onnx2tf"), disable_model_save=True,
            verbosity="warn", not_use_onnxsim=True,
            enable_rnn_unroll=rnn_unrolled(job),
            keep_shape_absolutely_input_names=keep_shape or None, keep_ncw_or_nchw_or_ncdhw_input_names=keep_nchw or None,
        )
    track_variables(km, created)
    return km, {name: v["tf_node"] for name, v in tensors.items() if isinstance(v, dict) and "tf_node" in v}


def lstm_fused(job: dict) -> bool:
    """LSTM as TFLite's fused, stateful sequence op (``lstm_fused``, opt-in: fused_lstm.py), in FP32 and FP16."""
    return bool(job["settings"].get("lstm_fused", False)) and job.get("precision") in FUSED_PRECISIONS


def rnn_unrolled(job: dict) -> bool:
    """onnx2tf unrolls LSTM/GRU/RNN for INT8 (``rnn_unroll``, on by default); float precisions keep the loop."""
    return bool(job["settings"].get("rnn_unroll", True)) and job.get("precision") == "int8"


def _o2t_names(name: str) -> list[str]:
    """An input's name as given and as onnx2tf sanitizes it."""
    return list(dict.fromkeys([name, name.replace(":", "__")]))


def adopt_input_layouts(km, job: dict) -> list:
    """Each input's permutation (source -> TF) read from the Keras model onnx2tf built, per tensor.

    onnx2tf decides the layout of every input itself (channels-last for 3-D to 5-D unless told to keep it, and
    not always as told); what it built is what the graph check, the calibration and every runner must feed. The
    planned permutation stays when the built shape agrees with it; otherwise the channels-last one, else any
    permutation that gives the built shape. ``job["inputs"][i]["perm"]`` is updated; returns the list."""
    perms = []
    for spec, tensor in zip(job["inputs"], km.inputs):
        built = [None if d is None else int(d) for d in tensor.shape]
        source = [int(d) for d in spec["shape"]]
        planned = spec.get("perm")

        def fits(perm) -> bool:
            shape = [source[k] for k in perm] if perm else source
            return len(shape) == len(built) and all(b is None or b == s or s <= 0 for b, s in zip(built, shape))

        if len(source) != len(built) or fits(planned):  # a 0-d input is [1] in TF: fed reshaped by the runners
            perms.append(planned)
            continue
        rank = len(source)
        candidates = [None] + ([list(CHANNEL_LAST[rank])] if rank in CHANNEL_LAST else []) + \
            ([list(p) for p in itertools.permutations(range(rank))] if rank <= 6 else [])
        found = next((p for p in candidates if fits(p)), False)
        if found is False:
            raise ConversionFailure("onnx2tf", f"input {spec['name']}: the TF graph takes shape {built}, which no "
                                               f"permutation of the ONNX shape {source} gives")
        spec["perm"] = found if found != list(range(rank)) else None
        perms.append(spec["perm"])
    return perms


def with_shapes(model):
    """The model with ONNX shape inference's ``value_info`` for every tensor it can infer (what onnxsim leaves).

    onnx2tf decides per tensor whether it is channels-last by comparing its TF shape with the ONNX shape; without
    one it guesses, and a 3-D tensor in ONNX order then gets transposed before a Reshape (the scatter rewrite's
    histogram came out permuted). A model above protobuf's 2 GB or one inference refuses stays as it is."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        return model


def track_variables(km, created: list) -> None:
    """Make the Keras model own every variable onnx2tf created while building it.

    onnx2tf builds a grouped Conv (groups > 1, not depthwise: PP-OCR's classifier and recogniser) as a Keras
    ``Conv2D(groups=...)`` whose kernel variable the functional model it returns does not track. Saving that
    model as a SavedModel then fails ("references an 'untracked' resource"); TFLiteConverter.from_keras_model
    swallows that error and converts the frozen graph instead, which has no SignatureDef, and INT8 calibration
    dies on it ("SignatureDef signature_key is None and model has 0 Signatures"). Owned, the variables are
    saved and the model keeps its ``serving_default`` signature.
    """
    owned = {id(v) for v in km.variables}
    untracked = [v for v in created if id(v) not in owned]
    if untracked:
        km.edgebuild_untracked_variables = untracked  # a Keras attribute: tracked for saving


def constants_to_initializers(model):
    """Turn top-level ``Constant`` nodes into initializers, as onnxsim would before onnx2tf.

    onnx2tf expects constant operands (e.g. Clip's min/max, which torch exports as Constant nodes at every
    opset >= 11) to be initializers; it fails with KeyError 'tf_node' otherwise, and onnxsim is not part of
    this toolchain. Graphs from the pipeline's export are already folded by onnxslim: then nothing changes.
    """
    import onnx
    from onnx import numpy_helper

    kept, folded = [], []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        value = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(attrs) == 1:
            if "value" in attrs:
                value = onnx.TensorProto()
                value.CopyFrom(attrs["value"].t)
            elif set(attrs) & {"value_float", "value_floats", "value_int", "value_ints"}:
                array = np.array(onnx.helper.get_attribute_value(next(iter(attrs.values()))))
                value = numpy_helper.from_array(array.astype(np.float32 if "float" in next(iter(attrs)) else np.int64))
        if value is None:
            kept.append(node)
            continue
        value.name = node.output[0]
        folded.append(value)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.initializer.extend(folded)
    return model


def to_tf_layout(x: np.ndarray, perm) -> np.ndarray:
    x = np.asarray(x)  # a 0-d sample indexes to a numpy scalar
    return np.ascontiguousarray(x.transpose(perm)) if perm else x


def check_float_graph(km, job: dict, calib: dict) -> tuple[list, dict]:
    """Run the TF graph and onnxruntime on one sample: find each output's layout, prove the graph is right."""
    import onnxruntime as ort

    feed = {i["name"]: np.asarray(calib[i["name"]][0]) for i in job["inputs"]}
    sess = ort.InferenceSession(job["onnx"], providers=["CPUExecutionProvider"])
    ref = sess.run([o["name"] for o in job["outputs"]], feed)
    got = km([to_tf_layout(feed[i["name"]], i.get("perm")) for i in job["inputs"]], training=False)
    got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
    if len(got) != len(ref):
        raise ConversionFailure("onnx2tf", f"the TF graph has {len(got)} outputs, the ONNX model {len(ref)}")
    perms, worst = [], {"cosine_min": 1.0, "max_abs_error": 0.0}
    for r, g, o in zip(ref, got, job["outputs"]):
        candidates = [None] + ([tuple(int(v) for v in np.argsort(CHANNEL_LAST[g.ndim]))] if g.ndim in CHANNEL_LAST else [])
        fits = [(p, g.transpose(p) if p else g) for p in candidates]
        fits = [(p, v) for p, v in fits if v.shape == r.shape]
        if not fits and g.ndim == r.ndim and g.ndim <= 5:  # onnx2tf moved other axes (a state [2, 1, 128] -> [1, 2, 128])
            fits = [(p, g.transpose(p)) for p in itertools.permutations(range(g.ndim)) if g.transpose(p).shape == r.shape]
        if not fits:
            raise ConversionFailure("onnx2tf", f"output {o['name']}: TF shape {list(g.shape)} does not match ONNX {list(r.shape)}")
        perm, value = min(fits, key=lambda pv: float(np.abs(pv[1].astype(np.float64) - r).max(initial=0.0)))
        err = float(np.abs(value.astype(np.float64) - r).max(initial=0.0))
        cos = cosine(r, value, zero_atol=1e-5)
        worst = {"cosine_min": min(worst["cosine_min"], cos), "max_abs_error": max(worst["max_abs_error"], err)}
        perms.append(list(perm) if perm else None)
    if worst["cosine_min"] < 0.999:
        raise ConversionFailure("onnx2tf", f"the FP32 TF graph disagrees with the ONNX model (cosine {worst['cosine_min']:.4f}, "
                                           f"max abs error {worst['max_abs_error']:.3g})")
    return perms, worst


WHAT_TO_DO = ("replace that op in the model (or export it in a form onnx2tf supports), or build this model for "
              "another target (onnx-cpu, x86)")


def first_real_error(log: Path | None) -> dict | None:
    """onnx2tf's own cause of a failure, from what it printed: ``{"error", "detail", "node"}``, or None.

    onnx2tf prints its cause (``ERROR: ScatterElements currently supports only reduction=['none']`` and a line
    ``graph_node.name: ... reduction: add``), a traceback, then the same advice lines for every failure, and
    calls sys.exit(1): the last ERROR line is always that advice, the first one not in it is the cause."""
    if log is None or not Path(log).is_file():
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    lines = [ANSI.sub("", ln).rstrip() for ln in Path(log).read_text(errors="replace").splitlines()]
    node = next((ln.split("onnx_op_name:", 1)[1].strip() for ln in lines if "onnx_op_name:" in ln), None) or None
    for k, ln in enumerate(lines):
        m = re.match(r"\s*ERROR:\s*(.*)", ln)
        if not m or not m.group(1).strip() or O2T_BOILERPLATE.search(ln):
            continue
        nxt = lines[k + 1].strip() if k + 1 < len(lines) else ""
        detail = nxt if nxt and not nxt.startswith(("ERROR:", "WARNING:", "Traceback", "INFO:")) else ""
        return {"error": m.group(1).strip().removesuffix("Pull requests are welcome.").strip().rstrip("."), "detail": detail,
                "node": node}
    return {"error": None, "detail": "", "node": node} if node else None


def explain(e: BaseException, phase: str, onnx_path: str, log: Path | None = None) -> dict:
    """One clear line for a failure, naming the ONNX op (onnx2tf) or TFLite op (converter) when known.

    onnx2tf's failures name the ONNX node, its op and attributes, onnx2tf's first real error line (read from
    the converter's ``log``, never its closing advice) and what the user can do."""
    if isinstance(e, ConversionFailure):
        return {"stage": e.stage, "op": e.op, "message": str(e)}
    text = str(e).strip()
    if phase == "onnx2tf":
        missing = re.match(r"No module named 'onnx2tf\.ops\.(\w+)'", text)
        if isinstance(e, ModuleNotFoundError) and missing:
            op = missing.group(1)
            return {"stage": "onnx2tf", "op": op, "message": f"onnx2tf cannot convert ONNX op {op} (not implemented in "
                                                             f"onnx2tf): {WHAT_TO_DO}"}
        found = first_real_error(log)
        node = getattr(e, "onnx_op_name", None) or (found or {}).get("node")
        op, attrs = _node_of(onnx_path, node) if node else (None, "")
        where = f" at ONNX node {node!r} ({op}{', ' + attrs if attrs else ''})" if node else ""
        if found and found["error"]:
            return {"stage": "onnx2tf", "op": op, "message": f"onnx2tf cannot convert{where}: {found['error']}; "
                                                             f"{WHAT_TO_DO}"[:600]}
        first = text.splitlines()[0] if text else ""
        if isinstance(e, SystemExit):
            first = "onnx2tf stopped (see the converter log in build.log)"
        return {"stage": "onnx2tf", "op": op, "message": f"onnx2tf failed{where}: {type(e).__name__}: {first}"[:400]}
    if "has 0 Signatures" in text:  # see track_variables: TF converted the frozen graph, which has no signature
        return {"stage": phase, "op": None, "message": f"{phase} failed: the TF graph lost its signature (TensorFlow "
                "could not save onnx2tf's Keras model as a SavedModel: a variable it does not own?); please report the model"}
    ops = re.findall(r"'(?:tfl|tf)\.(\w+)' op", text) or re.findall(r"op: '?(\w+)'?", text)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines() or [""]
    return {"stage": phase, "op": ops[0] if ops else None, "message": f"{phase} failed: {type(e).__name__}: {lines[0]}"[:400]}


def _node_of(onnx_path: str, node_name: str) -> tuple[str | None, str]:
    """(op type, its short attributes as ``name=value``) of the ONNX node ``node_name``."""
    try:
        import onnx

        from edgebuild.targets.tflite.rewrite.names import scope_safe

        nodes = onnx.load(onnx_path, load_external_data=False).graph.node
        node = next((n for n in nodes if n.name == node_name), None) or \
            next((n for n in nodes if n.name and scope_safe(n.name) == node_name), None)  # renamed before onnx2tf
    except Exception:
        return None, ""
    if node is None:
        return None, ""
    attrs = []
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        v = v.decode(errors="replace") if isinstance(v, bytes) else v
        if isinstance(v, (int, float, str)) or (isinstance(v, list) and len(v) <= 8):
            attrs.append(f"{a.name}={v}")
    return node.op_type, ", ".join(attrs)
