"""Parallel builds: one live line per target while they run, and every finished stage stays on screen and in the log."""
import io
import threading

from rich.console import Console

from edgebuild.pipeline.buildlog import BuildLog
from edgebuild.pipeline.progress import make_progress


def test_targets_in_threads_each_have_a_live_line_and_all_stay_in_the_trail_and_the_log(tmp_path):
    buf = io.StringIO()
    log = BuildLog(tmp_path / "build.log")
    p = make_progress(Console(file=buf, force_terminal=True, width=120, color_system=None), log=log)
    both_running, release = threading.Barrier(3), threading.Event()

    def target(name):
        with p.stage(f"{name}: converting to int8"):
            both_running.wait(timeout=30)
            release.wait(timeout=30)

    threads = [threading.Thread(target=target, args=(n,)) for n in ("arm64", "x86")]
    for t in threads:
        t.start()
    both_running.wait(timeout=30)
    running = sorted(task.description for task in p.live.tasks)
    release.set()
    for t in threads:
        t.join()
    p.close()
    log.close()
    assert running == ["arm64: converting to int8", "x86: converting to int8"]  # a line per target at once
    text = buf.getvalue()
    assert "✓ arm64: converting to int8" in text and "✓ x86: converting to int8" in text
    logged = (tmp_path / "build.log").read_text()
    assert logged.count("[stage] arm64: converting to int8") == 2  # its start and its end ("done in …")
    assert "[stage] x86: converting to int8: done in" in logged
