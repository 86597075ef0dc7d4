"""A real S3 server on 127.0.0.1 for the object-store cache's tests: moto's server mode, run from its own virtualenv
($VENV/s3server, made by scripts/bootstrap.sh from requirements-s3server.lock; not in .venv because every botocore
requires python-dateutil<3 and the toolchain pins 4.0.0). Nothing leaves the machine: the client (pyarrow's AWS SDK)
is pointed at it by AWS_ENDPOINT_URL, with dummy credentials and the instance-metadata lookup off."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

SERVER_PYTHON_ENV = "EDGEBUILD_TEST_S3_PYTHON"  # another interpreter with moto[s3] + flask + flask-cors


def server_python() -> Path | None:
    path = Path(os.environ.get(SERVER_PYTHON_ENV) or Path(sys.prefix) / "s3server" / "bin" / "python")
    return path if path.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(endpoint: str) -> dict[str, str]:
    """What a build needs in its environment to use the server (the AWS SDK's usual variables)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def moto_server():
    """Start the server; yield its endpoint (http://127.0.0.1:PORT). Skips when its venv is missing."""
    python = server_python()
    if python is None:
        pytest.skip(f"no S3 test server: {Path(sys.prefix) / 's3server'} is missing (scripts/bootstrap.sh makes it)")
    port = _free_port()
    proc = subprocess.Popen([str(python), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto server exited: {proc.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start in 60 s")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_bucket(endpoint: str, bucket: str):
    """Create ``bucket``; return a pyarrow S3 filesystem on the server (for the tests' own reads and writes)."""
    from pyarrow import fs as pafs

    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                           endpoint_override=endpoint.split("://", 1)[1], allow_bucket_creation=True)
    fs.create_dir(bucket)
    return fs
