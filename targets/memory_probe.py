"""The memory probe inside a runner's child process (targets/isolated.py, ``memory=True``): import the runtime,
take the resident set as the baseline and reset the kernel's peak counter, then report resident set and peak
above that baseline. How the numbers are used and judged: pipeline/memory.py."""
from __future__ import annotations

import importlib


def _status() -> dict[str, int]:
    """``VmRSS``/``VmHWM`` of this process in bytes (Linux), else the peak from getrusage."""
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "VmHWM")}
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"VmRSS": peak, "VmHWM": peak}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def baseline(backend: str, opener: str = "") -> dict:
    """In the memory child, before the artifact is loaded: import the runtime, read the baseline, reset the peak."""
    from edgebuild.targets.base import get_backend

    if opener:
        module = importlib.import_module(opener.split(":")[0])
        modules = getattr(module, "RUNTIME_MODULES", ())
    else:
        b = get_backend(backend)
        modules = getattr(b, "runtime_modules", None) or b.requires
    for name in modules:
        importlib.import_module(name)
    reset = _reset_peak()
    return {"rss": _status()["VmRSS"], "peak_reset": reset, "modules": list(modules)}


def open_with(opener: str, artifact, threads: int):
    """The Runner made by ``module:function(artifact, threads)`` (a runtime other than the backend's own)."""
    from edgebuild.refs import import_ref

    return import_ref(opener, "runner opener")(artifact, threads)


def snapshot(base: dict | None, runner) -> dict:
    """In the memory child: resident set and peak now, above the baseline; the runtime's own report if any."""
    if base is None:
        raise RuntimeError("this runner was not started to measure memory")
    s = _status()
    report = getattr(runner, "memory_report", None)
    return {"baseline_bytes": base["rss"], "rss_bytes": s["VmRSS"], "peak_bytes": s["VmHWM"],
            "peak_reset": base["peak_reset"], "baseline_imports": base["modules"],
            "runtime": report() if callable(report) else None}
