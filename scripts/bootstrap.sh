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
  # torch==2.13.0 resolves to the CPU build where it is on the machine; see README "Toolchain".
  "$VENV/bin/pip" install --disable-pip-version-check -q -r requirements.lock
  log="$VENV/.edgebuild-install.log"
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps --no-build-isolation -e . >"$log" 2>&1 \
    || { cat "$log" >&2; exit 1; }
  "$VENV/bin/pip" check
  echo "$want" >"$stamp"
fi
