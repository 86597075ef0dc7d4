#!/usr/bin/env bash
# Create (or update) the project's virtual environment from requirements.lock. Idempotent and fast when
# nothing changed: a stamp records the hash of the lock file and pyproject.toml last installed.
#   bash scripts/bootstrap.sh            # -> .venv with the whole toolchain and edgebuild (editable)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EDGEBUILD_VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" - <<'PY' || { echo "edgebuild needs Python >= 3.10 (the lock is tested on 3.11)" >&2; exit 2; }
import sys; raise SystemExit(sys.version_info < (3, 10))
PY
  echo "creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
stamp="$VENV/.edgebuild-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing the toolchain from requirements.lock (first time: a few minutes, ~3.6 GB)" >&2
  # Every file is checked against the lock's sha256 (scripts/lock_hashes.py writes them). torch==2.13.0 is the CPU
  # build: its one hash is that wheel's (on this kind of machine a file pip's find-links has; elsewhere the
  # PyTorch CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu); see README "Toolchain".
  "$VENV/bin/pip" install --disable-pip-version-check -q --require-hashes -r requirements.lock
  log="$VENV/.edgebuild-install.log"
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps --no-build-isolation -e . >"$log" 2>&1 \
    || { cat "$log" >&2; exit 1; }
  "$VENV/bin/pip" check
  echo "$want" >"$stamp"
fi

# The local object stores that the object-store cache's tests run against (moto's S3 server mode and a GCS
# emulator, separate processes): their own venv, $VENV/stores, from requirements-stores.lock. Not in .venv: every
# botocore requires python-dateutil<3 and requirements.lock pins 4.0.0. Test tools only (~140 MB); edgebuild itself
# never imports them.
stores="$VENV/stores"
want_stores=$(sha256sum requirements-stores.lock | cut -d' ' -f1)
if [ "$(cat "$stores/.edgebuild-installed" 2>/dev/null)" != "$want_stores" ]; then
  echo "installing the test object stores into $stores" >&2
  "$PYTHON" -m venv "$stores"
  "$stores/bin/pip" install --disable-pip-version-check -q --require-hashes -r requirements-stores.lock
  "$stores/bin/pip" check >/dev/null
  echo "$want_stores" >"$stores/.edgebuild-installed"
fi

# System tools the tests use: the OpenSSH client and server (`validate --device`: the tests start a throwaway sshd
# on 127.0.0.1 as the board), strace (the offline test traces a build's connect/DNS calls) and Chromium (the
# report.html render tests). Installed with apt-get only when run as root and missing; without apt (or when it
# fails) the bootstrap goes on and those tests skip, saying why.
missing=""
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v scp >/dev/null || missing="$missing openssh-client"
command -v strace >/dev/null || missing="$missing strace"
command -v chromium >/dev/null || missing="$missing chromium"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing$missing (apt-get)" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing; } >/dev/null 2>&1 \
    || echo "bootstrap: could not install$missing; the tests that need them will skip, saying why" >&2
fi
# EDGEBUILD_EMULATOR=1: also set up the emulated aarch64 board of `validate --emulate` (qemu-user + an arm64 root
# with LiteRT, ~150 MB downloaded once; scripts/setup_arm64_emulator.sh). Off by default: CI stays fast.
if [ "${EDGEBUILD_EMULATOR:-0}" = 1 ]; then
  PIP="$VENV/bin/pip" bash scripts/setup_arm64_emulator.sh
fi
