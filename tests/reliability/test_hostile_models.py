"""Hostile model files never run code: crafted .pt2 and TorchScript archives are refused (exit 2)."""
from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


class _Payload:
    """Pickles to ``os.system("touch <path>")``: runs the moment a full unpickler reads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def _pt2(path: Path) -> Path:
    ep = torch.export.export(_Tiny().eval(), (torch.zeros(1, 4),))
    torch.export.save(ep, str(path))
    return path


def _rewrite(path: Path, edit) -> Path:
    """Rewrite a zip archive: ``edit(name, data) -> bytes | None`` (None drops it); returns extra entries."""
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    out = path.with_name("crafted-" + path.name)
    with zipfile.ZipFile(out, "w") as z:
        for name, data in entries:
            new = edit(name, data)
            if new is not None:
                z.writestr(name, new)
        for name, data in getattr(edit, "extra", {}).items():
            z.writestr(name, data)
    return out


def _evil_torch_save(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    return buf.getvalue()


def _sample_inputs_pickle(src, marker):
    return _rewrite(src, lambda n, d: _evil_torch_save(marker) if n.endswith("sample_inputs/model.pt") else d)


def _pickled_weight(src, marker):
    def edit(n, d):
        if n.endswith("model_weights_config.json"):
            cfg = json.loads(d)
            cfg["config"]["fc.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if n.endswith("data/weights/" + "weight_0"):
            return _evil_torch_save(marker)
        return d
    return _rewrite(src, edit)


def _guard_code(src, marker):
    def edit(n, d):
        if n.endswith("models/model.json"):
            doc = json.loads(d)
            doc["guards_code"] = [f"__import__('os').system('touch {marker}')"]
            return json.dumps(doc).encode()
        return d
    return _rewrite(src, edit)


def _call_target(src, marker):
    def edit(n, d):
        if n.endswith("models/model.json"):
            doc = json.loads(d)
            doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.system"
            return json.dumps(doc).encode()
        return d
    return _rewrite(src, edit)


def _shape_expr(src, marker):
    def edit(n, d):
        if n.endswith("models/model.json"):
            doc = json.loads(d)
            doc["graph_module"]["graph"]["sym_int_values"] = {
                "s0": {"as_expr": {"expr_str": f"__import__('os').system('touch {marker}')", "hint": None}}}
            return json.dumps(doc).encode()
        return d
    return _rewrite(src, edit)


def _aoti(src, marker):
    def edit(n, d):
        return d
    edit.extra = {f"{src.stem}/data/aotinductor/model/model.so": b"\x7fELF"}
    return _rewrite(src, edit)


def _opaque_constant(src, marker):
    import pickle

    def edit(n, d):
        if n.endswith("model_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                 "use_pickle": True, "tensor_meta": None}}}).encode()
        return d
    edit.extra = {f"{src.stem}/data/constants/opaque_obj_0": pickle.dumps(_Payload(marker))}
    return _rewrite(src, edit)


def _weight_marked_raw_by_an_extra_config(src, marker):
    """The real config says weight_0 is pickled (torch unpickles it); an extra ``*_config.json`` says it is raw."""
    raw = {}

    def edit(n, d):
        if n.endswith("model_weights_config.json"):
            cfg = json.loads(d)
            raw.update(json.loads(d))
            cfg["config"]["fc.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if n.endswith("data/weights/weight_0"):
            return _evil_torch_save(marker)
        return d
    _rewrite(src, edit)  # fills ``raw`` with the clean config
    edit.extra = {f"{src.stem}/data/weights/zz_weights_config.json": json.dumps(raw).encode()}
    return _rewrite(src, edit)


def _duplicate(src, marker, member):
    """Two members named ``member``: Python's zipfile takes the last (clean), torch's reader the hostile one. Which
    copy torch's reader finds depends on the layout (a binary search over the sorted names): both layouts are
    tried and the one where torch reads the hostile copy is kept (reading a record's bytes runs nothing)."""
    with zipfile.ZipFile(src) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    hostile = {n: _hostile_copy(member, d, marker) for n, d in entries if n.endswith(member)}
    out = src.with_name("crafted-" + src.name)
    for adjacent in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
            with zipfile.ZipFile(out, "w") as z:
                for name, data in entries:
                    z.writestr(name, hostile.get(name, data))
                    if adjacent and name in hostile:
                        z.writestr(name, data)
                for name, data in entries:
                    if not adjacent and name in hostile:
                        z.writestr(name, data)
        name = next(iter(hostile))
        if torch._C.PyTorchFileReader(str(out)).get_record(name.split("/", 1)[1]) == hostile[name]:
            return out
    raise AssertionError("torch's reader took the clean copy in both layouts")


def _hostile_copy(member: str, clean: bytes, marker: Path) -> bytes:
    if member == "weight_0":  # a pickled weight: the payload
        return _evil_torch_save(marker)
    cfg = json.loads(clean)  # the weights config: weight_0 pickled ... and weight_0 itself is clean raw bytes,
    cfg["config"]["fc.weight"]["use_pickle"] = True  # so torch unpickles raw float bytes: fails, runs nothing;
    return json.dumps(cfg).encode()  # the duplicate-config test pairs it with an evil weight_0 below


def _duplicate_weight(src, marker):
    pickled = _pickled_weight_clean(src)
    return _duplicate(pickled, marker, "weight_0")


def _duplicate_config(src, marker):
    def edit(n, d):
        return _evil_torch_save(marker) if n.endswith("data/weights/weight_0") else d
    evil = _rewrite(src, edit)  # weight_0 is a pickle; the (last) clean config calls it raw
    evil = evil.rename(evil.with_name("evil-" + src.name))
    return _duplicate(evil, marker, "model_weights_config.json")


def _pickled_weight_clean(src):
    """The archive with weight_0 stored as a pickled (clean) tensor, as torch writes some tensors."""
    def edit(n, d):
        if n.endswith("model_weights_config.json"):
            cfg = json.loads(d)
            cfg["config"]["fc.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if n.endswith("data/weights/weight_0"):
            buf = io.BytesIO()
            torch.save(torch.zeros(3, 4), buf)
            return buf.getvalue()
        return d
    out = _rewrite(src, edit)
    return out.rename(out.with_name("pickled-" + src.name))


CRAFTED = {
    "weight marked raw by an extra config": _weight_marked_raw_by_an_extra_config,
    "pickled sample inputs": _sample_inputs_pickle,
    "pickled weight": _pickled_weight,
    "guard code": _guard_code,
    "call target reaching os.system": _call_target,
    "shape expression eval": _shape_expr,
    "AOTInductor shared library": _aoti,
    "opaque constant": _opaque_constant,
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_pt2_is_refused_and_runs_nothing(case, workdir, edgebuild):
    marker = workdir / "pwned"
    model = CRAFTED[case](_pt2(workdir / "m.pt2"), marker)
    r = edgebuild("--model", model, "--target", "onnx-cpu", "--calib", "x.npy", "--no-cache")
    r.check(2, r"refusing to load a torch.export archive .*--trust-model")
    assert not marker.exists()
    assert not (workdir / "out").exists()


DUPLICATES = {"two weights/weight_0": _duplicate_weight, "two model_weights_config.json": _duplicate_config}


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_an_archive_with_duplicate_member_names_is_refused_and_runs_nothing(case, workdir, edgebuild):
    marker = workdir / "pwned"
    model = DUPLICATES[case](_pt2(workdir / "m.pt2"), marker)
    r = edgebuild("--model", model, "--target", "onnx-cpu", "--calib", "x.npy", "--no-cache", "--trust-model")
    r.check(2, r"not a torch.export program \(the archive holds two members named .*")
    assert "--trust-model" not in r.error_lines[0]
    assert not marker.exists()
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("case", ["weight marked raw by an extra config", *DUPLICATES])
def test_the_new_crafted_payloads_are_live_without_the_audit(case, workdir):
    """Each of these archives runs its payload in torch's own loader (so the refusals above test something)."""
    marker = workdir / "pwned"
    model = {**CRAFTED, **DUPLICATES}[case](_pt2(workdir / "m.pt2"), marker)
    try:
        torch.export.load(str(model))
    except Exception:
        pass
    assert marker.exists()


def test_the_crafted_payload_is_live_without_the_audit(workdir):
    """Proof the pickle case tests something: torch's own loader runs the payload (so edgebuild must not)."""
    marker = workdir / "pwned"
    model = _sample_inputs_pickle(_pt2(workdir / "m.pt2"), marker)
    try:
        torch.export.load(str(model))
    except Exception:
        pass
    assert marker.exists()


def test_a_clean_pt2_passes_the_audit_and_loads(workdir):
    from edgebuild.pipeline.spec import BuildSpec
    from edgebuild.pipeline.stages.load import load_model
    from edgebuild.pipeline.trust import audit_pt2

    path = _pt2(workdir / "m.pt2")
    assert audit_pt2(path.read_bytes()) == []
    loaded = load_model(BuildSpec(model=str(path)))
    assert loaded.inputs[0].shape == (1, 4)


def test_torchscript_with_a_crafted_data_pkl_is_refused(workdir, edgebuild):
    """torch.jit.load reads data.pkl with TorchScript's C++ unpickler: a Python global is an error, not a call."""
    import pickle

    marker = workdir / "pwned"
    src = workdir / "m.pt"
    torch.jit.save(torch.jit.script(_Tiny().eval()), str(src))
    model = _rewrite(src, lambda n, d: pickle.dumps(_Payload(marker), protocol=2) if n.endswith("/data.pkl") else d)
    r = edgebuild("--model", model, "--input-shape", "1,4", "--target", "onnx-cpu", "--calib", "x.npy", "--no-cache")
    r.check(2, r"not a TorchScript file")
    assert not marker.exists()
    assert not (workdir / "out").exists()


def test_pickle_in_a_state_dict_is_refused(workdir, edgebuild):
    marker = workdir / "pwned"
    weights = workdir / "w.pt"
    weights.write_bytes(_evil_torch_save(marker))
    r = edgebuild("--model", "tests.reliability.models:tiny", "--weights", weights, "--input-shape", "1,4",
                  "--target", "onnx-cpu", "--no-cache")
    r.check(2, r"cannot read weights")
    assert not marker.exists()


def test_an_empty_or_deeply_nested_pt2_is_a_broken_file_not_a_trust_question(workdir, edgebuild):
    """A broken file is said to be broken: --trust-model is never suggested for it."""
    (workdir / "empty.pt2").write_bytes(b"")
    r = edgebuild("--model", "empty.pt2", "--target", "onnx-cpu", "--calib", "x.npy", "--no-cache")
    r.check(2, r"empty\.pt2: not a torch\.export program \(empty file\)")
    assert "--trust-model" not in r.error_lines[0]

    def nest(n, d):
        return b"[" * 100_000 + b"]" * 100_000 if n.endswith("models/model.json") else d
    deep = _rewrite(_pt2(workdir / "m.pt2"), nest)
    r = edgebuild("--model", deep, "--target", "onnx-cpu", "--calib", "x.npy", "--no-cache")
    r.check(2, r"not a torch\.export program \(models/model\.json: JSON nested too deeply\)")
    assert not (workdir / "out").exists()


def test_deep_json_is_refused_before_parsing_even_with_a_raised_recursion_limit():
    """json.loads recurses in C; once a library raises the recursion limit (onnx2tf, torch._dynamo do), a deep
    document overflows the C stack and kills the process. The audit measures the depth before parsing."""
    import sys

    from edgebuild.pipeline.trust import json_depth

    assert json_depth(b'{"a": [1, {"b": "[[[[ {{ \\" ["}]}') == 3  # brackets inside strings do not count
    assert json_depth(b"[" * 50_000 + b"]" * 50_000) == 50_000
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1_000_000)
    try:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("m/models/model.json", b"[" * 3_000_000 + b"]" * 3_000_000)
        from edgebuild.pipeline.trust import BrokenArchive, _json
        with zipfile.ZipFile(buf) as zf, pytest.raises(BrokenArchive, match="nested too deeply"):
            _json(zf, "m/models/model.json", "models/model.json")
    finally:
        sys.setrecursionlimit(limit)
