"""Real object stores on 127.0.0.1 for the object-store cache's tests: moto's S3 server mode and a GCS emulator
(gcp-storage-emulator, the JSON API), run from their own virtualenv ($VENV/stores, made by scripts/bootstrap.sh from
requirements-stores.lock; not in .venv because every botocore requires python-dateutil<3 and the toolchain pins
4.0.0). Nothing leaves the machine: pyarrow's S3 client is pointed at moto by AWS_ENDPOINT_URL, with dummy
credentials and the instance-metadata lookup off; its GCS client is made anonymous with the emulator's endpoint."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

SERVER_PYTHON_ENV = "EDGEBUILD_TEST_STORES_PYTHON"  # another interpreter with requirements-stores.lock installed


def server_python() -> Path | None:
    path = Path(os.environ.get(SERVER_PYTHON_ENV) or Path(sys.prefix) / "stores" / "bin" / "python")
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
        pytest.skip(f"no test object stores: {Path(sys.prefix) / 'stores'} is missing (scripts/bootstrap.sh makes it)")
    port = _free_port()
    with _serving(port, [str(python), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def gcs_server(bucket: str):
    """Start the GCS emulator with ``bucket``; yield its endpoint (127.0.0.1:PORT). Skips when its venv is missing."""
    python = server_python()
    if python is None:
        pytest.skip(f"no test object stores: {Path(sys.prefix) / 'stores'} is missing (scripts/bootstrap.sh makes it)")
    port = _free_port()
    with _serving(port, [str(python), "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port",
                         str(port), "--in-memory", "--default-bucket", bucket]):
        yield f"127.0.0.1:{port}"


def gcs_filesystem(endpoint: str):
    from pyarrow import fs as pafs

    return pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=endpoint,
                              retry_time_limit=__import__("datetime").timedelta(seconds=10))


@contextmanager
def _serving(port: int, argv: list[str]):
    # its request log goes to a file: a pipe nobody reads fills after a few hundred requests and blocks the server
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{argv[2]} exited: {log.read().decode(errors='replace')[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[2]} did not start in 60 s")
                time.sleep(0.1)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:  # the GCS emulator may not stop on SIGTERM: a test server, nothing to save
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def make_bucket(endpoint: str, bucket: str):
    """Create ``bucket``; return a pyarrow S3 filesystem on the server (for the tests' own reads and writes)."""
    from pyarrow import fs as pafs

    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                           endpoint_override=endpoint.split("://", 1)[1], allow_bucket_creation=True)
    fs.create_dir(bucket)
    return fs
