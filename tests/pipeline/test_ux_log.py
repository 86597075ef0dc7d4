"""build.log, --verbose and clean stdout, end to end: a torch model named ``mynet:make_net`` beside its config (run
from another directory) whose module prints through Python and straight to fd 1 as a native library would; its
dict output names the exported outputs; ``class_names:`` reach the artifact; ``-c out/manifest.json`` re-runs it."""
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgebuild.pipeline.buildlog import BuildLog, captured

MYNET = textwrap.dedent('''
    import os
    import torch

    print("hello from mynet (python print)")
    os.write(1, b"native hello on fd 1\\n")


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU())
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            e = self.body(x)
            return {"logits": self.head(e), "embedding": e}


    def make_net():
        torch.manual_seed(0)
        return Net()
''')

CONFIG = textwrap.dedent('''
    model: mynet:make_net
    input: {name: image, shape: [1, 1, 4, 4]}
    calib: data.npz
    targets: [onnx-cpu]
    class_names: [cat, dog, bird]
    auto_max_tries: 4
    budgets: {cosine_min: 0.9999999}
    out: ../out
''')


def _cli(*args, cwd):
    cmd = [sys.executable, "-c", "from edgebuild.pipeline.cli import main; raise SystemExit(main())", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("logproj")
    (root / "proj").mkdir()
    (root / "elsewhere").mkdir()
    (root / "proj" / "mynet.py").write_text(MYNET)
    (root / "proj" / "edgebuild.yaml").write_text(CONFIG)
    rng = np.random.default_rng(0)
    np.savez(root / "proj" / "data.npz", x=rng.normal(size=(48, 1, 4, 4)).astype(np.float32),
             y=rng.integers(0, 3, 48))
    run = _cli("-c", "../proj/edgebuild.yaml", "--json", "--no-cache", "--verbose", cwd=root / "elsewhere")
    return root, run


@pytest.mark.slow
def test_stdout_is_the_manifest_and_everything_else_is_in_build_log(project):
    root, run = project
    assert run.returncode in (0, 1), run.stderr[-3000:]
    manifest = json.loads(run.stdout)  # only the manifest on stdout, after an accuracy search on onnx-cpu
    assert manifest["targets"]["onnx-cpu"].get("search"), "the budget makes the accuracy search run"
    log = (root / "out" / "build.log").read_text()
    stamped = r"^\d\d:\d\d:\d\d\.\d{3} \[(out|err|stage|debug|info|warning)\] "
    assert all(re.match(stamped, line) for line in log.splitlines()[1:] if line), log[:2000]
    assert re.search(r"\[out\] hello from mynet \(python print\)", log)
    assert re.search(r"\[out\] native hello on fd 1", log)
    tries = [t.get("label", "") for t in manifest["targets"]["onnx-cpu"]["search"]["tries"]]
    if any("percentile" in t or "entropy" in t for t in tries):  # ONNX Runtime's histogram calibrators print (in the
        assert re.search(r"\[(out|err)\] Collecting tensor data and making histogram", log)  # converter child: echoed)
    assert re.search(r"\[stage\] onnx-cpu: accuracy search 2/4", log) and "[debug] edgebuild.export" in log
    # a converter's echoed output is headed by the process and the target, never by an error's words
    assert re.search(r"\[err\] ---- convert:onnx, onnx-cpu: the converter's output \(child\.log\) ----", log), log[-3000:]
    assert "conversion failed: the converter's output" not in log
    assert "hello from mynet" in run.stderr and "[debug] edgebuild" in run.stderr  # --verbose echoes them


@pytest.mark.slow
def test_module_beside_the_config_output_names_and_class_names(project):
    from edgebuild.pipeline.stages.embed import read

    root, run = project
    manifest = json.loads(run.stdout)
    assert [o["name"] for o in manifest["model"]["outputs"]] == ["logits", "embedding"]  # not "12", "9"
    assert manifest["data"]["class_names"] == ["cat", "dog", "bird"]
    art = root / "out" / "onnx-cpu" / manifest["targets"]["onnx-cpu"]["artifact"]
    meta = read(art)
    assert json.loads(meta["edgebuild.class_names"]) == ["cat", "dog", "bird"]
    assert json.loads(meta["edgebuild.outputs"]) == ["logits", "embedding"]
    assert "0: cat, 1: dog, 2: bird" in (root / "out" / "report.md").read_text()


@pytest.mark.slow
def test_manifest_reruns_the_build_from_another_directory_without_verbose(project, tmp_path):
    root, _ = project
    again = _cli("-c", str(root / "out" / "manifest.json"), "-o", str(tmp_path / "again"), "--json", cwd=tmp_path)
    assert again.returncode in (0, 1), again.stderr[-3000:]
    manifest = json.loads(again.stdout)
    assert manifest["spec"]["model"] == "mynet:make_net" and manifest["data"]["class_names"] == ["cat", "dog", "bird"]
    assert "hello from mynet" not in again.stderr and "[debug]" not in again.stderr  # only in the log
    assert "hello from mynet" in (tmp_path / "again" / "build.log").read_text()


def test_captured_sends_fd_writes_into_the_log_and_restores_the_fds(tmp_path):
    import os

    log = BuildLog(tmp_path / "build.log")
    with captured(log) as terminal:
        subprocess.run(["echo", "a child's line"], check=True)  # children inherit fds 1 and 2
        os.write(2, b"native stderr line\n")
        os.write(1, b"no newline at the end")
        terminal.write("")
    log.close()
    text = (tmp_path / "build.log").read_text()
    assert re.search(r"\[out\] a child's line", text) and re.search(r"\[err\] native stderr line", text)
    assert re.search(r"\[out\] no newline at the end", text)
    assert os.get_inheritable(1) and os.isatty(1) == os.isatty(1)  # fd 1 is a usable fd again


def test_a_build_stopped_by_bad_input_leaves_no_log(tmp_path):
    run = _cli("--model", "missing.onnx", "-o", "out", cwd=tmp_path)
    assert run.returncode == 2 and "model not found" in run.stderr
    assert not list(tmp_path.glob(".out.log-*")) and not (tmp_path / "out").exists()


HOLDERS = textwrap.dedent('''
    import json, multiprocessing as mp, os, subprocess, sys, time
    from pathlib import Path
    from edgebuild.pipeline.buildlog import BuildLog, captured

    def child():
        print("from the spawned child", flush=True)

    def holders(pipes):
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in pipes:
                        found.append(int(pid))
                except OSError:
                    pass
        return sorted(set(found))

    if __name__ == "__main__":
        linger = sys.argv[2] == "linger"
        log = BuildLog(Path(sys.argv[1]))
        with captured(log):
            pipes = {os.readlink("/proc/self/fd/1"), os.readlink("/proc/self/fd/2")}
            p = mp.get_context("spawn").Process(target=child)  # starts the resource tracker unless it runs already
            p.start(); p.join()
            late = subprocess.Popen(["sleep", "60"]) if linger else None  # a grandchild outliving the build
            t0 = time.perf_counter()
        took = time.perf_counter() - t0
        log.close()
        print(json.dumps({"took": took, "holders": holders(pipes), "late": late.pid if late else None}))
        if late:
            late.kill()
''')


@pytest.mark.parametrize("linger", ["no", "linger"])
def test_the_capture_ends_with_the_build_and_no_process_keeps_the_log_pipes(tmp_path, linger):
    """multiprocessing's resource tracker, started by the first spawned child, used to inherit fds 1 and 2 (the log
    pipes) and hold them until exit: every cold CLI build ended 2 x 5 s after its last stage, waiting for an EOF."""
    script = tmp_path / "holders.py"
    script.write_text(HOLDERS)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "build.log"), linger], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["took"] < 1.0, r  # was 10 s (two 5 s joins)
    if linger == "no":
        assert r["holders"] == [], r  # no process holds the pipes once the build has returned
    else:
        assert set(r["holders"]) <= {r["late"]}, r  # only the grandchild that outlived the build, which waits no one
    assert "from the spawned child" in (tmp_path / "build.log").read_text()
