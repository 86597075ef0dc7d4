"""`ray job submit ... -- edgebuild batch matrix.yaml` for real: a local head with the job server (the `cluster`
extra, ray[default]) on 127.0.0.1, the demo model x onnx-cpu submitted as a job, its cells sharing a stage cache in
an S3 bucket (moto's server on 127.0.0.1, tests/stores.py) with the credentials in the node's environment and the
key file's path in the job's runtime environment (never the key). About a minute on this 2-core host."""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time

import pytest
import yaml

pytestmark = pytest.mark.slow
pytest.importorskip("ray")
if importlib.util.find_spec("aiohttp") is None or importlib.util.find_spec("opencensus") is None:
    pytest.skip("ray job submit needs the job server: pip install 'edgebuild[cluster]' (ray[default])",
                allow_module_level=True)

from tests.batch.test_batch_ray import BIN, EXAMPLE, _free_port, _ray, _ray_processes, _stop_cluster  # noqa: E402
from tests.stores import client_env, make_bucket, moto_server  # noqa: E402


def test_ray_job_submit_builds_the_matrix_with_an_s3_cache(tmp_path):
    matrix = yaml.safe_load(EXAMPLE.read_text())
    matrix["models"] = {"demo": {}}  # one cell: demo x onnx-cpu (the job server, not the builds, is under test)
    matrix["targets"] = ["onnx-cpu"]
    matrix["cache"] = "s3://zoo/edgebuild-cache"
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    key = tmp_path / "cache.key"
    key.write_text(secrets.token_hex(32))
    out = tmp_path / "out"
    temp = tempfile.mkdtemp(prefix="ebjob", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    dashboard = _free_port()
    with moto_server() as endpoint:
        fs = make_bucket(endpoint, "zoo")
        # the node's environment: the store's credentials and endpoint (as an instance role or ~/.aws would give)
        env = {**os.environ, **client_env(endpoint), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_ADDRESS": ""}
        for name in ("EDGEBUILD_CACHE_KEY", "EDGEBUILD_CACHE_KEY_FILE", "EDGEBUILD_CACHE"):
            env.pop(name, None)
        try:
            t0 = time.monotonic()
            head = _ray(env, "start", "--head", f"--port={_free_port()}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
                        f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                        f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                        f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                        "--num-cpus=2", "--object-store-memory=100000000", "--disable-usage-stats",
                        "--node-ip-address=127.0.0.1", timeout=180)
            assert head.returncode == 0, head.stderr[-3000:]
            started = time.monotonic() - t0
            runtime_env = {"env_vars": {"EDGEBUILD_CACHE_KEY_FILE": str(key),
                                        "EDGEBUILD_NODE_LOCK": str(tmp_path / "node.lock")}}
            job = subprocess.run(
                [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dashboard}",
                 f"--runtime-env-json={json.dumps(runtime_env)}", "--",
                 str(BIN / "edgebuild"), "batch", str(path), "-o", str(out), "-q"],
                env=env, capture_output=True, text=True, timeout=420)
            submitted = time.monotonic() - t0 - started
            assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
            assert "succeeded" in job.stdout, job.stdout[-2000:]
        finally:
            t1 = time.monotonic()
            _stop_cluster(temp, grace_s=10)  # then SIGKILL: the dashboard's processes may linger on SIGTERM
            stopped = time.monotonic() - t1
            deadline = time.monotonic() + 30
            while _ray_processes(temp) and time.monotonic() < deadline:
                time.sleep(0.5)
            left = _ray_processes(temp)
            shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"stopping the cluster left processes behind: {left}"
        doc = json.loads((out / "batch.json").read_text())
        assert doc["executor"] == "ray" and doc["cache"] == "s3://zoo/edgebuild-cache"
        assert [(c["model"], c["target"], c["exit"]) for c in doc["cells"]] == [("demo", "onnx-cpu", 0)]
        from pyarrow import fs as pafs

        stored = [i.path for i in fs.get_file_info(pafs.FileSelector("zoo/edgebuild-cache", recursive=True))
                  if i.type == pafs.FileType.File]
        markers = [p for p in stored if p.endswith("/artifact.json")]
        assert markers and any("/blobs/" in p for p in stored), stored
        with fs.open_input_stream(markers[0]) as f:
            assert len(json.loads(f.read())["hmac"]) == 64  # signed with the key the job's runtime env named
        print(f"\nray job submit: head with job server {started:.1f} s, job (1 cell) {submitted:.1f} s, "
              f"cluster stopped in {stopped:.1f} s")
