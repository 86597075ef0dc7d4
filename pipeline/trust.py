"""Untrusted model files never run code: a `.pt2` archive is audited before torch reads it.

``torch.export.load`` is not safe on untrusted files: it unpickles payloads with ``weights_only=False``,
``sympy.sympify``-evaluates shape expressions (Python ``eval``), ``exec``s the archive's ``guards_code``,
resolves node targets by ``getattr`` from ``torch``/``operator`` (``torch.serialization.os.system`` is
reachable), and loads AOTInductor shared libraries. ``audit_pt2`` proves, without executing anything from
the archive, that none of that can happen:

- every pickled payload (sample inputs, pickled weights/constants) loads with torch's restricted
  ``weights_only`` unpickler, so the full unpickler torch uses afterwards meets only allow-listed globals;
- raw tensor payloads are named in the archive's payload config (never unpickled); a member that two configs
  name counts as pickled if either says so;
- every member is read by the audit: one that no program or config of the archive names (an extra
  ``data/weights/*_config.json``, say) is refused, and so is an archive with two members of the same name
  (Python's ``zipfile`` reads the last copy, torch's reader the first);
- no AOTInductor code, shared library, torchbind or opaque object, extension operator or guard code;
- node targets are ``torch.ops.<aten|prims|...>`` overloads, ``_operator``/``math`` functions or
  ``torch.sym_*``; shape expressions are arithmetic over symbols and known sympy functions.

The same bytes that were audited are handed to torch (no re-read of the file). A user who trusts a file that
fails the audit passes ``--trust-model`` (``trust_model: true``).
"""
from __future__ import annotations

import io
import json
import re
import zipfile

_META_FILES = {"archive_format", "archive_version", "byteorder", "version", ".data/version",
               ".data/serialization_id"}
_OP_NAMESPACES = ("aten", "prims", "quantized_decomposed", "higher_order", "quantized", "_quantized")
_TARGET = re.compile(r"torch\.ops\.(%s)\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?" % "|".join(_OP_NAMESPACES))
_OPERATOR = re.compile(r"_operator\.[a-z_]+|math\.[a-z0-9_]+|torch\.sym_[a-z_]+|torch\._check(_is_size)?")
_SYMPY_FUNCS = {"FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
                "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
                "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "Identity", "ToFloat", "Max", "Min", "Abs",
                "Eq", "Ne", "Ge", "Gt", "Le", "Lt", "And", "Or", "Not", "oo", "zoo", "nan", "True", "False",
                "floor", "ceiling", "sqrt", "Pow", "Mul", "Add", "Integer", "Rational", "Float", "OpaqueUnaryFn_sqrt"}
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_ +\-*/%(),<>=!&|~^]*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")


def audit_pt2(data: bytes, trusted: bool = False) -> list[str]:
    """What in a torch.export archive could run code when torch loads it (empty: safe to load).

    An archive that is not a well-formed torch.export program (an empty file, not a zip, duplicate member names,
    members outside its root folder, JSON that does not parse) raises ``BrokenArchive``, also when ``trusted``
    (the user's ``--trust-model`` skips only the audit of what would run)."""
    zf, rel = _members(data)
    models = sorted(n[len("models/"):-len(".json")] for n in rel if re.fullmatch(r"models/[^/]+\.json", n))
    if not models:
        raise BrokenArchive("no models/<name>.json program in the archive")
    docs = {name: _json(zf, full, name) for name, full in rel.items() if name.endswith(".json")}
    if trusted:
        return []
    problems: list[str] = []
    read = {n for n in rel if n in _META_FILES or n.startswith("extra/")}  # strings torch reads and never runs
    payloads: dict[str, bool] = {}  # member -> unpickled by torch (any config that names it with use_pickle wins)
    for m in models:
        read.add(f"models/{m}.json")
        _audit_program(f"models/{m}.json", docs[f"models/{m}.json"], problems)
        for folder, kind in (("data/weights", "weights"), ("data/constants", "constants")):
            legacy, config = f"{folder}/{m}.pt", f"{folder}/{m}_{kind}_config.json"
            if legacy in rel:  # the old format: one pickle, unpickled by torch
                payloads[legacy] = True
            elif config in rel:
                read.add(config)
                for path, pickled in _payload_entries(config, docs[config], problems):
                    payloads[f"{folder}/{path}"] = payloads.get(f"{folder}/{path}", False) or pickled
        sample = f"data/sample_inputs/{m}.pt"
        if sample in rel:
            payloads[sample] = True
    for name, pickled in payloads.items():
        if name not in rel:
            continue  # torch fails on the missing member itself; nothing of it runs
        read.add(name)
        if pickled:
            problems.extend(_audit_pickle(name, zf.read(rel[name])))
    for name in sorted(set(rel) - read):
        if name.startswith("data/aotinductor/") or name.endswith((".so", ".dll", ".dylib", ".cpp")):
            problems.append(f"{name}: compiled code (AOTInductor)")
        else:
            problems.append(f"{name}: a member no torch.export program config names (the audit cannot tell how "
                            "torch would read it)")
    return problems


class BrokenArchive(ValueError):
    """Not a torch.export program at all (say so; never suggest trusting it)."""


def _members(data: bytes) -> tuple[zipfile.ZipFile, dict[str, str]]:
    """The archive and its members by name inside the root folder (torch's reader strips the first member's
    folder). Duplicate names are refused: Python's zipfile reads the last copy, torch's reader the first."""
    if not data:
        raise BrokenArchive("empty file")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise BrokenArchive(f"not a zip archive: {e}") from None
    if not infos:
        raise BrokenArchive("empty archive")
    all_names = [i.filename for i in infos]
    dup = next((n for n in all_names if all_names.count(n) > 1), None) if len(set(all_names)) != len(all_names) else None
    if dup is not None:
        raise BrokenArchive(f"the archive holds two members named {dup!r}")
    root = all_names[0].split("/", 1)[0] + "/"
    rel: dict[str, str] = {}
    for name in all_names:
        if name.endswith("/"):
            continue
        inner = name[len(root):] if name.startswith(root) else None
        if not inner or "\\" in name or any(p in ("", ".", "..") for p in inner.split("/")):
            raise BrokenArchive(f"member {name[:120]!r} lies outside the archive's folder {root!r}")
        rel[inner] = name
    return zf, rel


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_MAX_JSON_DEPTH = 256  # torch.export's own documents nest a few dozen levels


def json_depth(data: bytes) -> int:
    """How deep a JSON document's brackets nest, counted without parsing it (strings blanked first).

    ``json.loads`` recurses in C: on a deep enough document it raises RecursionError only while the interpreter's
    recursion limit is low, and libraries in this process (onnx2tf, torch._dynamo) raise that limit, after which a
    hostile document overflows the C stack and kills the build. So the depth is measured before any parse.
    """
    import numpy as np

    flat = np.frombuffer(_JSON_STRING.sub(b'""', data), np.uint8)
    step = np.isin(flat, (ord("["), ord("{"))).astype(np.int32) - np.isin(flat, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _json(zf: zipfile.ZipFile, full: str, name: str):
    try:
        data = zf.read(full)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:  # CRC, compression method, ...
        raise BrokenArchive(f"{name}: unreadable member ({e})") from None
    if json_depth(data) > _MAX_JSON_DEPTH:
        raise BrokenArchive(f"{name}: JSON nested too deeply")
    try:
        return json.loads(data)
    except RecursionError:
        raise BrokenArchive(f"{name}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise BrokenArchive(f"{name}: not valid JSON") from None


def _payload_entries(name: str, doc, problems: list[str]) -> list[tuple[str, bool]]:
    """(member, pickled) for every payload a weights/constants config names."""
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        problems.append(f"{name}: not a payload config")
        return []
    entries = []
    for fqn, meta in config.items():
        path = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", path) or path.startswith("."):
            problems.append(f"{name}: payload {str(fqn)[:80]} has an unsafe path {path[:80]!r}")
        elif path.startswith(("custom_obj", "opaque")):
            problems.append(f"{name}: {str(fqn)[:80]} is a torchbind/opaque object (loaded with a full unpickler)")
        else:
            entries.append((path, meta.get("use_pickle") is not False))
    return entries


def _audit_program(name: str, doc, problems: list[str]) -> None:
    stack = [doc]  # iterative: a deeply nested document is data, not a RecursionError
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "guards_code" and v:
                    problems.append(f"{name}: guard code (executed by torch as Python)")
                elif k in ("target", "as_operator") and isinstance(v, str) and not _safe_target(v):
                    problems.append(f"{name}: call target {v[:80]!r} is not a torch operator")
                elif k == "expr_str" and isinstance(v, str) and not _safe_expr(v):
                    problems.append(f"{name}: shape expression {v[:80]!r} is not plain arithmetic")
                else:
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)


def _safe_target(target: str) -> bool:
    if "__" in target:
        return False
    return bool(_TARGET.fullmatch(target) or _OPERATOR.fullmatch(target))


def _safe_expr(expr: str) -> bool:
    if "__" in expr or not _EXPR_CHARS.fullmatch(expr):
        return False
    return all(_SYMBOL.fullmatch(tok) or tok in _SYMPY_FUNCS for tok in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr))


def _audit_pickle(name: str, data: bytes) -> list[str]:
    """A payload torch would unpickle must load under the restricted ``weights_only`` unpickler."""
    import pickle

    import torch

    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError, TypeError,
            zipfile.BadZipFile, KeyError, IndexError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        first = next((ln for ln in lines if "Unsupported global" in ln or "Unsupported operand" in ln), lines[0])
        return [f"{name}: a pickle that needs the full unpickler ({first[:160]})"]
    return []
