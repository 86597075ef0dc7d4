# edgebuild with its whole tested toolchain (requirements.lock); entrypoint: edgebuild
#   docker build -t edgebuild .
#   docker run --rm -v "$PWD:/work" -w /work edgebuild --target arm64
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    OPENVINO_TELEMETRY=0 NNCF_DISABLE_TELEMETRY=1 TF_CPP_MIN_LOG_LEVEL=3
WORKDIR /opt/edgebuild
COPY requirements.lock pyproject.toml README.md ./
# CPU build of torch first (the lock pins torch==2.13.0; PyPI's default wheel is the CUDA build)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -r requirements.lock
COPY pipeline ./pipeline
COPY targets ./targets
COPY calibration ./calibration
COPY scripts ./scripts
RUN pip install --no-cache-dir --no-deps . && pip check && edgebuild --help >/dev/null
WORKDIR /work
ENTRYPOINT ["edgebuild"]
