# edgebuild with its whole tested toolchain (requirements.lock, exact versions); entrypoint: edgebuild
#   docker build -t edgebuild .
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD:/work" edgebuild --target arm64
# Two stages: the first builds a virtual environment (the lock, then edgebuild itself, without pip's cache); the
# second copies only that environment onto a fresh slim image and runs as an unprivileged user. The test tools of
# the lock (pytest and what only it needs) stay out of the image. Every file installed is checked against the
# lock's sha256 (--require-hashes): see README "Toolchain".

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/edgebuild
ENV PATH=/opt/edgebuild/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
# The lock without the test tools (an entry is its pin line and the --hash lines under it), hash-checked. torch's
# one hash is the CPU build's (PyPI's torch 2.13.0 is the CUDA build): it comes from the PyTorch CPU index, and a
# file from either index is taken only if its sha256 is the lock's. Wheels only, but antlr4-python3-runtime (an
# sdist, pure Python: built without a compiler).
RUN awk '/^[A-Za-z0-9]/ { skip = /^(pytest|iniconfig|pluggy)==/ } !skip' requirements.lock > runtime.lock \
 && pip install --no-cache-dir --require-hashes --only-binary=:all: --no-binary=antlr4-python3-runtime \
        --extra-index-url https://download.pytorch.org/whl/cpu -r runtime.lock
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY targets ./targets
COPY calibration ./calibration
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && pip check \
 && edgebuild --help > /dev/null

FROM python:3.11-slim
ENV PATH=/opt/edgebuild/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    OPENVINO_TELEMETRY=0 NNCF_DISABLE_TELEMETRY=1 TF_CPP_MIN_LOG_LEVEL=3 \
    EDGEBUILD_CACHE=/home/edgebuild/.cache/edgebuild
RUN groupadd --gid 10001 edgebuild \
 && useradd --uid 10001 --gid edgebuild --create-home --shell /usr/sbin/nologin edgebuild \
 && mkdir /work && chown edgebuild:edgebuild /work
COPY --from=build /opt/edgebuild /opt/edgebuild
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["edgebuild"]
CMD ["--help"]
