#!/usr/bin/env bash
# The emulated aarch64 board for `edgebuild validate out/arm64 --emulate`: this is `edgebuild setup-emulator`
# (the logic ships inside the package: pipeline/assets/setup_arm64_emulator.sh), run with this checkout's venv.
#   bash scripts/setup_arm64_emulator.sh     # first run: downloads ~150 MB (Debian + PyPI); later runs: offline, instant
# PIP=path/to/venv/bin/pip picks the venv (scripts/bootstrap.sh does); default .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
exec "$(dirname "$PIP")/python" -m edgebuild.pipeline.cli setup-emulator "$@"
