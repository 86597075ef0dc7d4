"""`edgebuild validate out/arm64 --emulate`: the demo on the aarch64 LiteRT under qemu-user, when it is set up."""
from __future__ import annotations

import json

import pytest

from edgebuild.pipeline import emulate
from edgebuild.pipeline.cli import main


def test_missing_emulator_is_one_line_exit_4(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_ARM64_ROOT", str(tmp_path / "none"))
    assert main(["validate", str(tmp_path), "--emulate"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arm64 emulator is not set up" in err[0] and "setup_arm64_emulator.sh" in err[0], err


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
    assert e["vs_host"]["top1_agreement"] >= emulate.HOST_AGREEMENT["top1_agreement"]
    assert e["vs_host"]["cosine_min"] >= emulate.HOST_AGREEMENT["cosine_min"]
    built = json.loads((arm64_demo / "validation.json").read_text())
    assert result["verdict"] == "pass"
    assert result["metrics"]["accuracy"] == pytest.approx(built["metrics"]["accuracy"], abs=0.5)
