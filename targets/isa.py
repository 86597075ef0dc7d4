"""The instruction set INT8 settings are chosen for: the profile's declared one, or the host's (host-is-device).

On x86 CPUs without VNNI the u8 x s8 int8 kernels (``vpmaddubsw``) add pairs of products in int16 and saturate with
full-range weights: there 7-bit weights (ONNX Runtime ``reduce_range``, NNCF ``overflow_fix: enable``) keep accuracy.
With AVX512-VNNI, AVX-VNNI or AMX the products accumulate in int32: 7-bit weights only cost precision (measured on a
VNNI host: cosine 0.9658 with them, 0.9683 without). ``auto`` settings are resolved here, and the artifact's settings
record says from what (``isa``).
"""
from __future__ import annotations

from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def host_isa(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """{"source", "vnni": bool, "flags": the int8-relevant flags present}; read from /proc/cpuinfo (Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {"source": f"unknown ({cpuinfo} unreadable)", "vnni": False, "flags": []}
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
            break
    relevant = sorted(f for f in flags if f in (*VNNI_FLAGS, "avx2", "avx512f", "avx512bw", "asimddp", "i8mm"))
    return {"source": f"host {cpuinfo}", "vnni": any(f in flags for f in VNNI_FLAGS), "flags": relevant}


def resolve(setting: str, value, isa: dict | None = None) -> tuple[object, dict | None]:
    """An ``auto`` value of ``reduce_range`` or ``overflow_fix`` for this ISA (and the ISA record), else as given."""
    if value != "auto":
        return value, None
    isa = isa or host_isa()
    record = {**isa, "chose": {}}
    if setting == "reduce_range":
        value = not isa["vnni"]
    elif setting == "overflow_fix":
        value = "disable" if isa["vnni"] else "enable"
    else:
        raise ValueError(f"no ISA rule for {setting}")
    record["chose"][setting] = value
    record["why"] = ("VNNI/AMX: int8 products accumulate in int32, full-range weights" if isa["vnni"] else
                     "no VNNI: u8 x s8 kernels saturate in int16, 7-bit weights")
    return value, record
