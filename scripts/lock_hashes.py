"""Write the sha256 hashes of requirements.lock: every pinned version, every file of it that pip could install here.

    .venv/bin/python scripts/lock_hashes.py               # rewrite requirements.lock in place (pins kept, hashes new)
    .venv/bin/python scripts/lock_hashes.py --check       # exit 1 when a pin has no hash (or the file is not hashed)

For each ``name==version`` of the lock, pip's own package finder (the indexes and find-links of pip's configuration,
as ``pip install`` sees them) lists the files of that version that this interpreter and platform can install
(CPython 3.11 on Linux x86_64 here: the Python and platform of the bootstrap's venv and CI); their sha256 come from
the index (the ``#sha256=`` of each link) or, for a file on disk without one, from the file itself. Every such file
is listed, so whichever of them pip picks (a newer manylinux tag, the sdist, the same wheel from another index)
is allowed, and a file uploaded later is never taken (pip skips files whose hash is not in the lock when one is).

``BUILDS``: packages pinned to one local build — torch is the CPU build (``torch==2.13.0`` with only the hash of
``2.13.0+cpu``): PyPI's file of the same version is the CUDA build, and its CUDA libraries are not in the lock.
On a machine without that wheel (a file on disk here, ``download.pytorch.org/whl/cpu`` elsewhere) the install
fails on the hash instead of taking a 3 GB CUDA build.

Needs network access to the indexes (PyPI), like ``pip install``. Run it after any change of a pin.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
BUILDS = {"torch": "cpu"}  # name -> the local version label the lock's version means
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extras>\[[^\]]*\])?==(?P<version>[^\s\\;#]+)")
HEADER = ("# Exact versions of the whole toolchain, with the sha256 of every file pip may install for them on\n"
          "# CPython 3.11 / Linux x86_64 (scripts/bootstrap.sh installs with --require-hashes). After changing a pin:\n"
          "#   .venv/bin/python scripts/lock_hashes.py\n")


def pins(text: str) -> list[tuple[str, str, list[str]]]:
    """(the requirement as written, e.g. ``torch==2.13.0``, its name, its sha256 hashes) per entry of a lock."""
    out, current = [], None
    for line in text.splitlines():
        stripped = line.strip().rstrip("\\").strip()
        m = PIN.match(stripped)
        if m:
            current = (f"{m['name']}{m['extras'] or ''}=={m['version']}", m["name"], [])
            out.append(current)
        elif stripped.startswith("--hash=sha256:") and current is not None:
            current[2].append(stripped.split(":", 1)[1])
    return out


def _finder():
    from pip._internal.commands import create_command

    cmd = create_command("install")
    options, _ = cmd.parse_args([])  # pip's configuration: index, extra indexes, find-links, certificates
    session = cmd._build_session(options)
    return cmd._build_package_finder(options=options, session=session, ignore_requires_python=True), session


def _sha256(link, session) -> str:
    if link.hash_name == "sha256" and link.hash:
        return link.hash
    h = hashlib.sha256()
    if link.is_file:
        with open(link.file_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        with session.get(link.url.split("#")[0], stream=True) as r:
            r.raise_for_status()
            for block in r.iter_content(1 << 20):
                h.update(block)
    return h.hexdigest()


def hashes_for(finder, session, name: str, version: str) -> tuple[list[str], list[str]]:
    """(sorted sha256 hashes, file names) of the files of ``name==version`` that pip could install here."""
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

    want, build = Version(version), BUILDS.get(canonicalize_name(name))
    files = {}
    for c in finder.find_all_candidates(name):
        try:
            v = Version(str(c.version))
        except InvalidVersion:  # an old release's version that no longer parses: never the pinned one
            continue
        if v.public != want.public or (v.local or None) != (build or want.local or None):
            continue
        files[c.link.filename] = _sha256(c.link, session)
    return sorted(set(files.values())), sorted(files)


def render(entries: list[tuple[str, list[str]]]) -> str:
    lines = [HEADER.rstrip("\n")]
    for req, hashes in entries:
        lines.append(req + "".join(f" \\\n    --hash=sha256:{h}" for h in hashes))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that every pin has hashes")
    ap.add_argument("--lock", default=str(LOCK))
    args = ap.parse_args()
    lock = Path(args.lock)
    entries = pins(lock.read_text())
    if args.check:
        missing = [req for req, _, hashes in entries if not hashes]
        for req in missing:
            print(f"{lock.name}: {req} has no --hash (run scripts/lock_hashes.py)", file=sys.stderr)
        return 1 if missing or not entries else 0
    finder, session = _finder()
    out, problems = [], []
    for req, name, _ in entries:
        version = req.split("==", 1)[1]
        hashes, files = hashes_for(finder, session, name, version)
        if not hashes:
            problems.append(f"{req}: no file of this version that pip could install here")
        print(f"{req}: {len(hashes)} file(s) {', '.join(files)}", file=sys.stderr)
        out.append((req, hashes))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    lock.write_text(render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
