"""Progress a person can read: plain stage lines outside a terminal, a trail with times in one, --json stdout clean."""
import io
import json
import subprocess
import sys

from rich.console import Console

from edgebuild.pipeline.progress import LiveProgress, PlainProgress, make_progress


def test_plain_progress_prints_one_line_per_stage_with_elapsed_and_eta():
    out = io.StringIO()
    p = PlainProgress(out)
    for k in (1, 2, 3):
        with p.stage(f"arm64: accuracy search {k}/12 — percentile"):
            pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("[") and " s] arm64: accuracy search " in line for line in lines)
    assert "left)" not in lines[0] and lines[2].endswith("left)")  # an ETA once a step of the series is done


def test_plain_progress_names_a_stage_that_stopped():
    out = io.StringIO()
    p = PlainProgress(out)
    try:
        with p.stage("x86: converting to int8"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert out.getvalue().splitlines()[-1].split("] ", 1)[1].startswith("x86: converting to int8: stopped after")


def test_live_progress_leaves_a_trail_of_finished_stages():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, color_system=None)
    p = make_progress(console)
    assert isinstance(p, LiveProgress)
    with p.stage("loading the model"):
        pass
    with p.stage("arm64: accuracy search 1/3 — default"):
        pass
    p.close()
    text = buf.getvalue()
    assert "✓ loading the model" in text and "✓ arm64: accuracy search 1/3 — default" in text
    assert "2 stages in" in text


def test_cli_outside_a_terminal_prints_stage_lines_to_stderr_and_only_the_manifest_to_stdout(tmp_path):
    import numpy as np
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    torch.onnx.export(net, (torch.zeros(1, 1, 4, 4),), str(tmp_path / "m.onnx"), dynamo=False)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(40, 1, 4, 4)).astype(np.float32))
    cmd = [sys.executable, "-c", "from edgebuild.pipeline.cli import main; raise SystemExit(main())",
           "--model", "m.onnx", "--calib", "x.npy", "-t", "onnx-cpu", "--no-auto", "--no-cache", "--json"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    assert json.loads(out.stdout)["targets"]["onnx-cpu"]
    stages = [line for line in out.stderr.splitlines() if line.startswith("[") and " s] " in line]
    assert any("loading the model" in s for s in stages) and any("onnx-cpu: validating" in s for s in stages)
    quiet = subprocess.run([*cmd, "--quiet", "-o", "out2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert not [line for line in quiet.stderr.splitlines() if " s] " in line]


def test_sensitivity_counts_its_layers_as_inner_steps(demo_onnx, digits_split):
    """sensitivity shows "layer i/N" (a live bar with ETA); its inner steps leave no lines of their own in the trail."""
    import numpy as np

    from edgebuild.pipeline.progress import SUBSTEP
    from edgebuild.pipeline.stages import validate as V
    from edgebuild.pipeline.stages.sensitivity import layer_sensitivity
    from edgebuild.targets.onnx import OrtRunner

    train, test = digits_split
    select = test.subset(np.arange(40))
    with OrtRunner(demo_onnx, 1) as ref:
        reference = V.collect(ref, select)
    seen = []

    class Recording(LiveProgress):
        def _begin(self, text):
            seen.append(text)
            return super()._begin(text)

    buf = io.StringIO()
    p = Recording(Console(file=buf, force_terminal=True, width=120, color_system=None))
    judging = V.resolve(V.Judging(), reference, select.labels)
    scores = layer_sensitivity(demo_onnx, train.subset(np.arange(32)), select, reference, float("inf"), judging,
                               V.Budget(0.5, None, None, None), stage=p.stage)
    p.close()
    n = len(seen)
    assert n >= 3 and seen == [f"{SUBSTEP}sensitivity: layer {i}/{n} ({name})" for i, name in
                               enumerate([s.split("(", 1)[1][:-1] for s in seen], 1)]
    assert set(scores) <= {s.split("(", 1)[1][:-1] for s in seen}
    text = buf.getvalue()
    assert f"sensitivity: layer 2/{n}" in text and "━" in text  # the live line, with its bar
    assert "✓ · sensitivity" not in text and f"{n} stages in" in text  # no trail line per layer
