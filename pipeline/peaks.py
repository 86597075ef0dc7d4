"""Measured conversion peaks: the numbers ``--max-memory-gb`` schedules targets by (``schedule.MemorySlots``).

Every conversion and every native runtime of a target runs in a child process (``targets/isolated.py``), started
from the thread working for that target; ``edgebuild.procs.track`` records which target (``procs.set_owner``).
While a build's targets work, ``Meter`` samples every ``SAMPLE_S`` the resident memory of each such child and of
everything it started (``/proc/PID/status``: ``VmRSS`` now, ``VmHWM`` its own peak so far). A target's measured
peak is the larger of

* the largest sum of its processes' ``VmRSS`` at one sample (children alive at once add up), and
* the largest ``VmHWM`` of one of its processes (a spike between two samples is not missed).

Pages two processes share (libraries) count in both: the sum can only over-state. The build's own process (the
model, the evaluation data and the reference outputs it holds for all targets) is not a target's: the default
limit keeps ``schedule.MEMORY_MARGIN`` for it; its peak is measured and logged too.

**Which number schedules a build.** The first build of a model — no record yet — schedules by
``estimate_peak``: a fixed part per backend plus a multiple of the FP32 model's size, fitted to peaks
measured on ResNet-50 and MobileNetV2. Its measured peaks are recorded in the stage cache (a result entry per
model content hash, target, backend and number of calibration samples) when the target really converted (a
converter child ran: a build whose conversions came from the cache measures only its runtimes, and records
nothing); every later build of the same model and target schedules by the recorded number. The first record
stays (cache entries are written once); ``--no-cache`` neither reads nor writes them.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

SAMPLE_S = 0.1
MB = 1 << 20
METHOD = "the largest of its child processes' summed VmRSS (sampled) and of one child's VmHWM"
log = logging.getLogger("edgebuild.schedule")

# A target's peak resident memory before any build of the model measured it (later builds use the number measured
# here): a fixed part (the converter's libraries: TensorFlow in the TFLite child, OpenVINO + NNCF, ONNX
# Runtime's calibrator) and a multiple of the FP32 model's size (graph copies, the calibration's statistics, the
# artifact and its FP32 sibling). Fitted to its children's peaks as ``Meter`` measures them, --no-auto:
# ResNet-50 (98 MB) onnx-cpu 741 MB, x86 844 MB, arm64 2649 MB; MobileNetV2 (14 MB) onnx-cpu 315 MB, arm64 ~1150 MB.
# (each backend declares its own: BackendInfo.peak_memory)
PEAK_OTHER = (900 << 20, 18.0)  # a backend not measured yet: as the heaviest


def estimate_peak(backend: str, model_bytes: int) -> int:
    """A conversion's estimated peak memory in bytes (the backend's ``peak_memory``) for an FP32 ONNX model of
    ``model_bytes``."""
    from edgebuild.targets.base import backend_info

    fixed, per_byte = backend_info(backend).peak_memory or PEAK_OTHER
    return int(fixed + per_byte * model_bytes)


def _status(pid: int) -> tuple[int, int, str] | None:
    """(VmRSS, VmHWM) in bytes and the process name, or None (gone, a zombie, not Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    try:
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024, fields.get("Name", "")
    except (KeyError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += _children(p)
    return seen


class Meter:
    """Samples, in a thread of its own, the memory of each target's children (``procs.owners()``) and of this
    process. ``peaks[target]`` (bytes), ``converted`` (targets a converter child ran for), ``main_peak``."""

    def __init__(self, period: float = SAMPLE_S):
        self.period = period
        self.peaks: dict[str, int] = {}
        self.converted: set[str] = set()
        self.main_peak = 0
        self._stop = threading.Event()
        from edgebuild.procs import bound

        # its thread samples the children of the build that made it (edgebuild.procs: the build's scope)
        self._thread = threading.Thread(target=bound(self._run), name="edgebuild-peaks", daemon=True)

    def __enter__(self) -> "Meter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the children still alive at the end

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 — measuring must never break a build
                log.debug("memory sample failed", exc_info=True)

    def sample(self) -> None:
        from edgebuild.procs import owners

        own = _status(os.getpid())
        if own is not None:
            self.main_peak = max(self.main_peak, own[0])
        now: dict[str, int] = {}
        for root, target in owners().items():
            for pid in tree(root):
                st = _status(pid)
                if st is None:
                    continue
                rss, hwm, name = st
                now[target] = now.get(target, 0) + rss
                self.peaks[target] = max(self.peaks.get(target, 0), hwm)
                if name.startswith("convert"):
                    self.converted.add(target)
        for target, total in now.items():
            self.peaks[target] = max(self.peaks.get(target, 0), total)


def _key(ctx, profile) -> str:
    from edgebuild.pipeline.cache import cached

    calib = ctx.job.calib
    return cached("peak", inputs={"model": ctx.job.model.content_hash, "calib": None if calib is None else len(calib)},
                  config={"target": profile.name}, backend=profile.backend)


def estimates(ctx, profiles, model_bytes: int) -> dict[str, tuple[int, str]]:
    """Per target: (bytes, source) — the peak measured by an earlier build of this model (``"measured"``), else
    ``estimate_peak`` (``"model size"``)."""

    out = {}
    for p in profiles:
        hit = ctx.work.cache.get_result(_key(ctx, p))
        peak = (hit[0] or {}).get("peak_bytes") if hit is not None else None
        if isinstance(peak, int) and peak > 0:
            out[p.name] = (peak, "measured")
        else:
            out[p.name] = (estimate_peak(p.backend, model_bytes), "model size")
    return out


def record(ctx, profiles, meter: Meter, used: dict[str, tuple[int, str]]) -> dict[str, bool]:
    """Store the peaks of targets that converted and had no record (for the next build of this model) and log
    every target's: what it was scheduled by, what was measured. Returns, per target, whether it was stored."""
    stored = {}
    for p in profiles:
        peak = meter.peaks.get(p.name, 0)
        scheduled, source = used.get(p.name, (0, "none"))
        stored[p.name] = bool(peak and p.name in meter.converted and source != "measured" and ctx.work.cache.put_result(
            _key(ctx, p), {"peak_bytes": int(peak), "backend": p.backend, "method": METHOD}))
        log.info("%s: scheduled by %.0f MB (%s); %s%s", p.name, scheduled / MB, source,
                 f"its children's peak {peak / MB:.0f} MB measured" if peak else "no child measured",
                 ", recorded for the next build of this model" if stored[p.name] else "")
    if meter.main_peak:
        log.info("the build's own process: peak %.0f MB while the targets converted", meter.main_peak / MB)
    return stored
