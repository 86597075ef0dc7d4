"""A throwaway OpenSSH server on 127.0.0.1 that plays the board: its own host key, authorized key and config in a
temporary directory, ``sshd -D`` in the background, stopped at teardown. Installs nothing: without Debian's
openssh-server (``scripts/bootstrap.sh`` installs it when run as root) the tests that need it skip."""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
START_TIMEOUT_S = 15


@dataclass
class LoopbackBoard:
    port: int
    user: str
    ssh_config: Path  # for EDGEBUILD_SSH_CONFIG (ssh -F): identity, known hosts

    def url(self, **query: str) -> str:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"ssh://{self.user}@127.0.0.1:{self.port}" + (f"?{q}" if q else "")


def unavailable() -> str | None:
    """Why a loopback sshd cannot run here (None: it can)."""
    for tool in (SSHD, shutil.which("ssh-keygen"), shutil.which("ssh"), shutil.which("scp")):
        if not tool or not os.path.exists(tool):
            return "OpenSSH server/client not installed (scripts/bootstrap.sh installs openssh-server as root)"
    if not Path("/run/sshd").is_dir() and os.geteuid() != 0:
        return "sshd needs its privilege separation directory /run/sshd (create it as root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


def start(tmp: Path) -> tuple[subprocess.Popen, LoopbackBoard]:
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory (root only)
    _keygen(tmp / "host_key")
    _keygen(tmp / "client_key")
    shutil.copy(tmp / "client_key.pub", tmp / "authorized_keys")
    os.chmod(tmp / "authorized_keys", 0o600)
    port = _free_port()
    (tmp / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host_key'}\nPidFile {tmp / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        "Subsystem sftp internal-sftp\nMaxStartups 50\n")
    (tmp / "ssh_config").write_text(
        f"Host 127.0.0.1\n  IdentityFile {tmp / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {tmp / 'known_hosts'}\n  StrictHostKeyChecking no\n")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "sshd.log", "w"))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(tmp / 'sshd.log').read_text()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, LoopbackBoard(port, getpass.getuser(), tmp / "ssh_config")
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
