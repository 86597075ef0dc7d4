#!/usr/bin/env bash
# The emulated aarch64 board for `edgebuild validate out/arm64 --emulate`: an arm64 Debian root with Python,
# plus the aarch64 wheels of numpy and ai-edge-litert (the versions installed beside edgebuild: those of
# requirements.lock in the tested toolchain), run under qemu-user. Shipped inside the package and run by
#   edgebuild setup-emulator     # first run: downloads ~150 MB (Debian + PyPI); later runs: offline, instant
# which sets PYTHON (the interpreter whose pip downloads the wheels), NUMPY_VERSION and LITERT_VERSION.
# Where: $EDGEBUILD_ARM64_ROOT (default ~/.cache/edgebuild/arm64-root). Runs as root; needs qemu-user-static and
# debootstrap (installed with apt-get when missing). No binfmt_misc and no chroot: edgebuild starts the
# root's python with `qemu-aarch64-static -L ROOT`. The root is built beside its final place and moved there
# when it works, so an interrupted run leaves nothing half-made.
# EDGEBUILD_EMULATOR_EXECUTORCH=1 adds ExecuTorch for .pte artifacts (an existing root gets it without being made
# again): the aarch64 executorch wheel of the host's version from PyPI (~18 MB), whose prebuilt C++ runtime
# (libexecutorch, kernels, XNNPACK delegate) runs the .pte through edgebuild_et.cpp, a C ABI over the runtime's
# extension::Module compiled here with aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu) against the
# wheel's own headers, and edgebuild_et.py (ctypes, numpy). The wheel's Python bindings are not used: they link
# libtorch, and PyPI's aarch64 torch is the CUDA build (~2.7 GB with its CUDA wheels). Marked by
# ROOT/.edgebuild-executorch (version and shim hash).
set -euo pipefail
: "${PYTHON:?}" "${NUMPY_VERSION:?}" "${LITERT_VERSION:?}"
ROOT=${EDGEBUILD_ARM64_ROOT:-$HOME/.cache/edgebuild/arm64-root}
SUITE=${EDGEBUILD_ARM64_SUITE:-bookworm}
MIRROR=${EDGEBUILD_ARM64_MIRROR:-http://deb.debian.org/debian}
SITE=/opt/edgebuild/site            # inside the root: the aarch64 wheels, installed
WANT="suite=$SUITE cpu=cortex-a76 numpy=$NUMPY_VERSION ai-edge-litert=$LITERT_VERSION"

add_executorch() {  # $1: the root; the aarch64 executorch runtime under $1$SITE, driven without torch, checked
  local root=$1 version py here
  version=$("$PYTHON" -c 'from importlib.metadata import version as v; print(v("executorch").split("+")[0])') \
    || { echo "edgebuild setup-emulator: EDGEBUILD_EMULATOR_EXECUTORCH=1 needs executorch installed here" >&2; exit 2; }
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  local want="executorch=$version shim=$(cat "$here/edgebuild_et.cpp" "$here/edgebuild_et.py" | sha256sum | cut -c1-12)"
  [ "$(cat "$1/.edgebuild-executorch" 2>/dev/null)" = "$want" ] && return 0
  if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      echo "edgebuild setup-emulator: ExecuTorch needs aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu)" >&2
      exit 2
    fi
    echo "installing g++-aarch64-linux-gnu" >&2
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++-aarch64-linux-gnu >/dev/null
  fi
  py=$(basename "$(readlink -f "$1/usr/bin/python3")" | sed 's/^python//')
  echo "aarch64 executorch runtime for cp${py/./} ($want)" >&2
  local wheels="$1/opt/edgebuild/wheels-executorch" plat=(--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64)
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" --python-version "$py" --implementation cp \
    -d "$wheels" "executorch==$version"
  # The wheel's libraries and headers only (--no-deps): its Python side (exir, the compiler) and its bindings (_C,
  # which links libtorch: PyPI's aarch64 torch is the CUDA build, ~2.7 GB with its CUDA wheels) are never loaded.
  "$PYTHON" -m pip install -q --no-deps --no-index --only-binary=:all: "${plat[@]}" --python-version "$py" \
    --implementation cp --target "$1$SITE" --upgrade "$wheels"/executorch-*.whl
  rm -rf "$wheels"
  local et="$1$SITE/executorch"
  aarch64-linux-gnu-g++ -std=c++17 -O2 -shared -fPIC -w -DC10_USING_CUSTOM_GENERATED_MACROS \
    -DET_EVENT_TRACER_ENABLED -DET_USE_THREADPOOL -I "$et/include" -I "$et/include/executorch/runtime/core/portable_type/c10" \
    "$here/edgebuild_et.cpp" -L "$et/lib" -Wl,--no-as-needed -lexecutorch -lexecutorch_kernels_optimized \
    -lexecutorch_kernels_quantized -lexecutorch_backend_xnnpack -lexecutorch_threadpool -Wl,--as-needed \
    -Wl,-rpath,'$ORIGIN/executorch/lib' -o "$1$SITE/libedgebuild_et.so"
  cp "$here/edgebuild_et.py" "$1$SITE/edgebuild_et.py"
  echo "checking: aarch64 python loads ExecuTorch's runtime under qemu" >&2
  PYTHONPATH=$SITE PYTHONNOUSERSITE=1 qemu-aarch64-static -cpu cortex-a76 -L "$1" "$1/usr/bin/python3" -c \
    'import platform, edgebuild_et; edgebuild_et._unsafe_reset_threadpool(2); assert platform.machine() == "aarch64"; print("executorch runtime loaded")' >&2
  echo "$want" >"$1/.edgebuild-executorch"
}

if [ "$(cat "$ROOT/.edgebuild-ready" 2>/dev/null)" = "$WANT" ]; then
  if [ "${EDGEBUILD_EMULATOR_EXECUTORCH:-}" = 1 ]; then add_executorch "$ROOT"; fi
  echo "arm64 emulator ready: $ROOT ($WANT)" >&2
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "edgebuild setup-emulator: run it as root (debootstrap unpacks a Debian root; apt-get installs qemu-user-static)" >&2
  exit 2
fi
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "edgebuild setup-emulator: needs ${need[*]} (Debian/Ubuntu: apt-get install ${need[*]})" >&2
    exit 2
  fi
  echo "installing ${need[*]}" >&2
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi

work="$ROOT.partial"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
echo "debootstrap (first stage, arm64 $SUITE, python3) into $work" >&2
debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 "$SUITE" "$work" "$MIRROR" >"$work.log" 2>&1 \
  || { tail -20 "$work.log" >&2; exit 1; }
# The second stage would run arm64 maintainer scripts in a chroot (binfmt_misc); unpacking is all Python needs.
for deb in "$work"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$work"; done
rm -f "$work"/var/cache/apt/archives/*.deb

# qemu-user 7.2 passes the host's x86 /proc/cpuinfo through; LiteRT's CPU detection (cpuinfo) then finds no
# ARM core and crashes. qemu opens ROOT/proc/cpuinfo instead when it exists (-L): describe the core edgebuild
# emulates (qemu -cpu cortex-a76, the Raspberry Pi 5's), one entry per host CPU.
for i in $(seq 0 $(($(nproc) - 1))); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i"
done >"$work/proc/cpuinfo"

python_version=$(basename "$(readlink -f "$work/usr/bin/python3")" | sed 's/^python//')
echo "aarch64 wheels for cp${python_version/./} ($WANT)" >&2
platforms=(--platform manylinux2014_aarch64)
for v in $(seq 17 36); do platforms+=(--platform "manylinux_2_${v}_aarch64"); done
wheels="$work/opt/edgebuild/wheels"
"$PYTHON" -m pip download -q --only-binary=:all: "${platforms[@]}" --python-version "$python_version" --implementation cp \
  -d "$wheels" "numpy==$NUMPY_VERSION" "ai-edge-litert==$LITERT_VERSION"
"$PYTHON" -m pip install -q --no-index --find-links "$wheels" --only-binary=:all: "${platforms[@]}" \
  --python-version "$python_version" --implementation cp --target "$work$SITE" numpy ai-edge-litert

echo "checking: aarch64 python imports numpy and ai_edge_litert under qemu" >&2
PYTHONPATH=$SITE PYTHONNOUSERSITE=1 qemu-aarch64-static -cpu cortex-a76 -L "$work" "$work/usr/bin/python3" -c \
  'import platform, numpy, ai_edge_litert.interpreter as i; assert platform.machine() == "aarch64"; print(platform.machine(), numpy.__version__)' >&2


if [ "${EDGEBUILD_EMULATOR_EXECUTORCH:-}" = 1 ]; then add_executorch "$work"; fi

echo "$WANT" >"$work/.edgebuild-ready"
rm -rf "$ROOT" "$work.log"
mv "$work" "$ROOT"
trap - EXIT
echo "arm64 emulator ready: $ROOT" >&2
