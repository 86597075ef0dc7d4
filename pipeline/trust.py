"""Untrusted model files never run code: a `.pt2` archive is audited before torch reads it.

``torch.export.load`` is not safe on untrusted files: it unpickles payloads with ``weights_only=False``,
``sympy.sympify``-evaluates shape expressions (Python ``eval``), ``exec``s the archive's ``guards_code``,
resolves node targets by ``getattr`` from ``torch``/``operator`` (``torch.serialization.os.system`` is
reachable), and loads AOTInductor shared libraries. ``audit_pt2`` proves, without executing anything from
the archive, that none of that can happen:

- every pickled payload (sample inputs, pickled weights/constants) loads with torch's restricted
  ``weights_only`` unpickler, so the full unpickler torch uses afterwards meets only allow-listed globals;
- raw tensor payloads are named in the archive's payload config (never unpickled);
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


def audit_pt2(data: bytes) -> list[str]:
    """What in a torch.export archive could run code when torch loads it (empty: safe to load)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = [n for n in zf.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, ValueError) as e:
        return [f"not a zip archive ({e})"]
    if not names:
        return ["empty archive"]
    prefix = names[0].split("/", 1)[0] + "/" if "/" in names[0] else ""
    if not all(n.startswith(prefix) for n in names):
        prefix = ""
    rel = {n[len(prefix):]: n for n in names}
    problems: list[str] = []
    raw_payloads = set()
    for name, full in rel.items():
        if name.endswith(".json"):
            try:
                doc = json.loads(zf.read(full))
            except (ValueError, UnicodeDecodeError):
                problems.append(f"{name}: not valid JSON")
                continue
            if name.endswith("_config.json") and isinstance(doc, dict):
                raw_payloads |= _raw_payloads(name, doc, problems)
            else:
                _audit_program(name, doc, problems)
    for name, full in rel.items():
        if name.endswith(".json") or name in _META_FILES or name in raw_payloads or name.startswith("extra/"):
            continue
        if name.startswith("data/aotinductor/") or name.endswith((".so", ".dll", ".dylib", ".cpp")):
            problems.append(f"{name}: compiled code (AOTInductor)")
            continue
        problems.extend(_audit_pickle(name, zf.read(full)))
    return problems


def _raw_payloads(name: str, doc: dict, problems: list[str]) -> set[str]:
    """Payload files a weights/constants config marks as raw tensor bytes (torch never unpickles them)."""
    folder = name.rsplit("/", 1)[0]
    raw = set()
    for fqn, meta in (doc.get("config") or {}).items():
        path = str(meta.get("path_name", ""))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", path) or path.startswith("."):
            problems.append(f"{name}: payload {fqn} has an unsafe path {path!r}")
        elif path.startswith(("custom_obj", "opaque")):
            problems.append(f"{name}: {fqn} is a torchbind/opaque object (loaded with a full unpickler)")
        elif not meta.get("use_pickle"):
            raw.add(f"{folder}/{path}")
    return raw


def _audit_program(name: str, doc, problems: list[str]) -> None:
    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "guards_code" and v:
                    problems.append(f"{name}: guard code (executed by torch as Python)")
                elif k in ("target", "as_operator") and isinstance(v, str) and not _safe_target(v):
                    problems.append(f"{name}: call target {v[:80]!r} is not a torch operator")
                elif k == "expr_str" and isinstance(v, str) and not _safe_expr(v):
                    problems.append(f"{name}: shape expression {v[:80]!r} is not plain arithmetic")
                else:
                    walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)

    walk(doc)


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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"{name}: a pickle that needs the full unpickler ({first[:160]})"]
    return []
