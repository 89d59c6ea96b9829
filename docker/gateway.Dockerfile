# zimage-gateway: the OpenAI-compatible images API in front of the Triton servers. It needs no
# GPU, torch or Triton: only the client package and the gateway (FastAPI on uvicorn).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/zimage
COPY pyproject.toml README.md ./
COPY backend backend
COPY client client
COPY gateway gateway
RUN pip install ".[gateway]"

# Writes nothing: runs as an unprivileged user, and in Kubernetes on a read-only root filesystem.
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=4)"

# Servers and limits come as more flags or ZIMAGE_GATEWAY_* variables; keys from
# ZIMAGE_GATEWAY_API_KEYS or --api-key-file.
ENTRYPOINT ["zimage-gateway", "--host", "0.0.0.0", "--port", "8080"]
