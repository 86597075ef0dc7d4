"""A cheap stand-in for a mixed-precision try: how many of the most sensitive layers must stay float.

A real mixed-precision try converts and evaluates a whole artifact (onnx2tf + TFLite, or OpenVINO + NNCF: a minute or
more on a real model), and the accuracy search steps through 1, 2, 3, 4, 6, 8... layers in float: on a model that
needs six, five tries before the first that can pass, past most searches' time. Here each step is scored by ONNX
Runtime fake quantization of the whole graph but those layers (``targets/onnx/fake_quant.py`` ``FakeQuant.runner_except``:
per-tensor uint8 activations, per-channel int8 weights, calibrated once, one child process), on the selection part,
with the build's own budgets; a bisection over the steps finds the smallest that passes, and the real tries start
there. The proxy only orders the work: every artifact is still converted and judged for real.

When fake-quantized plain INT8 already passes while the real conversion missed, the proxy is more optimistic than
the backend and says nothing (the search steps from one layer as before).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from edgebuild.calibration.budget import at_most
from edgebuild.pipeline.stages import validate as V

PROXY_CALIB_SAMPLES = 64  # calibration samples of the fake-quant ranges (a ranking, not shipped ranges)


def first_step(onnx_path, calib, select, reference, ranked: list[str], steps: list[int], judging, budget,
               deadline: float, weighted_only: bool = False, equalize: bool = False) -> tuple[int | None, dict]:
    """(index into ``steps`` of the smallest step whose ``ranked[:k]`` float layers pass the fake-quant proxy, or
    None when the proxy cannot tell; the record, with ``all_miss`` when even the last step misses). ``steps``
    ascending; bisection, so about log2(len(steps)) + 1 runs. ``weighted_only``: only the weighted layers
    (Conv/Gemm/MatMul...) are quantized, as in a conversion with ``op_types: weighted``; ``equalize``: the graph is
    equalized first, as in a conversion with ``equalize`` (targets/onnx/equalize.py; node names are kept)."""
    from edgebuild.procs import tempdir
    from edgebuild.targets.base import fake_quant

    record: dict = {"method": f"ONNX Runtime fake quantization of every {'weighted ' if weighted_only else ''}node but "
                              "the float layers, on evaluation[select]", "scores": {}}
    t0 = time.monotonic()
    if equalize:  # the base the float layers are added to rescales its depthwise chains: so does the proxy
        record["method"] += " (the graph's depthwise chains equalized, as its base quantizes it)"
    with tempfile.TemporaryDirectory(prefix="edgebuild-proxy-", dir=tempdir()) as tmp, \
            fake_quant(onnx_path, at_most(calib, PROXY_CALIB_SAMPLES), Path(tmp), equalize=equalize) as fq:
        def loss(k: int) -> float:
            with fq.runner_except(ranked[:k], weighted_only=weighted_only) as runner:
                metrics = V.compare(reference, V.collect(runner, select), select.labels, judging)
            value = V.quality_loss(metrics, budget, judging.task)
            record["scores"][k] = round(value, 4)
            return value

        try:
            if loss(0) <= 0:
                record["result"] = "plain INT8 passes the proxy: it cannot tell how many layers the backend needs in float"
                return None, _done(record, t0)
            lo, hi = -1, len(steps) - 1  # steps[lo] fails (-1: zero layers), steps[hi] is the candidate
            if time.monotonic() > deadline:  # not scored: no guidance (an unscored step is no miss)
                record["result"] = f"time ran out before the proxy scored {steps[hi]} layers in float"
                return None, _done(record, t0)
            if loss(steps[hi]) > 0:
                record["result"] = f"even {steps[hi]} layers in float miss the budget in the proxy"
                record["all_miss"] = True
                return None, _done(record, t0)
            while hi - lo > 1 and time.monotonic() < deadline:
                mid = (lo + hi) // 2
                if loss(steps[mid]) <= 0:
                    hi = mid
                else:
                    lo = mid
        except Exception as e:  # noqa: BLE001 — a graph fake quantization cannot run: no guidance, the search goes on
            record["result"] = f"the proxy could not run: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            return None, _done(record, t0)
    record["result"] = (f"{steps[hi]} layer(s) in float pass the proxy" + ("" if hi - lo == 1 else
                        " (time ran out before the bisection ended: the real tries start there)"))
    return hi, _done(record, t0)


NOISE_RANK_LAYERS = 24  # graphs with more quantizable layers are ranked by one run's noise, not layer by layer
NOISE_SAMPLES = 8  # selection samples the noise ranking runs on


def noise_ranking(onnx_path, calib, select, layers: list[str]) -> tuple[dict[str, float], dict]:
    """({layer: the quantization noise it adds}, most first; the record), from ONE run of the whole graph
    fake-quantized beside the FP32 one (``FakeQuant.layer_noise``) on NOISE_SAMPLES selection samples. A layer's
    noise is the relative squared error of its output less that of its input. Empty when it cannot run."""
    from edgebuild.procs import tempdir
    from edgebuild.targets.base import fake_quant

    record: dict = {"method": "quantization noise each layer adds (relative error of its output less that of its "
                              f"input) in one ONNX Runtime fake-quantized run of the whole graph, on {NOISE_SAMPLES} "
                              "samples of evaluation[select]; the fake-quant proxy then decides how many in float"}
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="edgebuild-noise-", dir=tempdir()) as tmp, \
                fake_quant(onnx_path, at_most(calib, PROXY_CALIB_SAMPLES), Path(tmp)) as fq:
            noise = fq.layer_noise(layers, at_most(select, NOISE_SAMPLES))
    except Exception as e:  # noqa: BLE001 — no ranking: the search measures layer by layer instead
        record["result"] = f"could not run: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return {}, _done(record, t0)
    ranked = dict(sorted(noise.items(), key=lambda kv: -kv[1]))
    record["layers"] = {n: round(v, 6) for n, v in list(ranked.items())[:10]}
    return ranked, _done(record, t0)


def _done(record: dict, t0: float) -> dict:
    record["seconds"] = round(time.monotonic() - t0, 2)
    return record
