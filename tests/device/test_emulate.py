"""`edgebuild validate out/arm64 --emulate`: the demo on the aarch64 LiteRT under qemu-user, when it is set up."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgebuild.pipeline import emulate
from edgebuild.pipeline.cli import main


def test_missing_emulator_is_one_line_exit_4(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_ARM64_ROOT", str(tmp_path / "none"))
    assert main(["validate", str(tmp_path), "--emulate"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arm64 emulator is not set up" in err[0] and "edgebuild setup-emulator" in err[0], err


@pytest.mark.slow
def test_emulated_aarch64_litert_matches_host(request, capsys):
    why = emulate.missing()
    if why:
        pytest.skip(f"arm64 emulator not set up ({why}): bash scripts/setup_arm64_emulator.sh")
    arm64_demo = request.getfixturevalue("arm64_demo")  # built only when the emulator is there
    assert main(["validate", str(arm64_demo), "--emulate", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    e = result["emulation"]
    assert "(aarch64," in e["runtime"] and "qemu-user" in e["runtime"]
    assert result["latency"] is None, "time under emulation is not device latency"
    assert e["vs_host"]["samples"] == result["metrics"]["samples"] > 100
    for metric, limit, op in emulate.HOST_AGREEMENT:
        value = e["vs_host"][metric]
        assert (value >= limit if op == "min" else value <= limit), (metric, value, limit)
        assert e["tolerance"][metric] == {op: limit}
    built = json.loads((arm64_demo / "validation.json").read_text())
    assert result["verdict"] == "pass"
    assert result["metrics"]["accuracy"] == pytest.approx(built["metrics"]["accuracy"], abs=0.5)
    assert json.loads((arm64_demo / "validation_emulated.json").read_text())["emulation"] == e  # kept beside it


def test_host_agreement_catches_a_runtime_that_answers_differently():
    """The emulated-vs-host checks on class scores: identical outputs pass; flipped decisions and a drift fail."""
    from edgebuild.pipeline.stages.validate import Judging

    rng = np.random.default_rng(0)
    host = [[rng.normal(size=(1, 10)).astype(np.float32)] for _ in range(200)]
    labels = np.array([int(o[0].argmax()) for o in host])
    same = emulate.agreement(host, [[o[0].copy()] for o in host], labels, Judging())
    assert same["top1_agreement"] == 100.0 and same["max_abs_error"] == 0.0 and emulate.host_failures(same) == []
    flipped = [[-o[0]] if i % 10 == 0 else [o[0]] for i, o in enumerate(host)]  # 10 % of the decisions change
    bad = emulate.agreement(host, flipped, labels, Judging())
    failed = {c.metric for c in emulate.host_failures(bad)}
    assert bad["top1_agreement"] <= 90.5 and {"emulated_vs_host_top1_agreement",
                                             "emulated_vs_host_max_abs_error_relative"} <= failed
