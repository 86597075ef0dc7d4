"""The README's two commands are the ones that work: CI runs the test command, a test runs the build one."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = re.findall(r"^    (bash scripts/bootstrap\.sh && .+)$", README, flags=re.M)


def test_readme_has_exactly_the_two_commands_and_ci_runs_the_test_one():
    assert len(COMMANDS) == 2, COMMANDS
    build_cmd, test_cmd = COMMANDS
    assert ".venv/bin/edgebuild --target " in build_cmd
    assert test_cmd.endswith(".venv/bin/python -m pytest")
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_every_cli_flag_and_profile_is_documented():
    from edgebuild.pipeline.cli import cli
    from edgebuild.targets.profiles import catalogue

    for param in cli.params:
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert f"`{opt}" in README, f"README does not document {opt}"
    for name in catalogue():
        assert f"`{name}`" in README, f"README does not list profile {name}"
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
        assert code in README


@pytest.mark.slow
def test_readme_build_command_builds_the_demo(tmp_path):
    build_cmd = COMMANDS[0].split("&&", 1)[1].strip().split()
    exe = Path(sys.executable).parent / "edgebuild"  # the venv the bootstrap made (we are running in it)
    out = subprocess.run([str(exe), *build_cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "out" / "manifest.json").is_file()
