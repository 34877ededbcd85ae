# syntax=docker/dockerfile:1
# Build: docker build -t openai-webhook-bridge:0.1.0 .
# Configuration comes only from BRIDGE_* environment variables and secret files mounted under
# /run/secrets/webhook-bridge (one file per setting); nothing secret is baked into the image.

# Both stages start from the same Python image. Any Debian-based image with python, venv,
# groupadd and useradd works; tests/test_image.py builds on a debootstrapped bookworm.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every dependency ships manylinux wheels, so no compiler is needed even here.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# README.md is the package's long description; the wildcard keeps the build working without it.
COPY pyproject.toml README.md* ./
COPY bridge ./bridge
# Build a wheel, install it (and its dependencies, with the OpenTelemetry SDK for spans when
# OTEL_* variables ask for them and the Redis client for BRIDGE_DEDUP_URL) into the venv;
# pip byte-compiles while installing, so the
# read-only runtime image never needs to write .pyc files.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install "$(ls /wheels/*.whl)[otel,redis]" \
 && webhook-bridge --help > /dev/null


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="openai-webhook-bridge" \
      org.opencontainers.image.description="Verify OpenAI webhooks and publish them to RabbitMQ" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 10001 bridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin bridge

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
EXPOSE 8080

# No curl in slim images: probe /healthz with the standard library.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BRIDGE_PORT', '8080') + '/healthz', timeout=2)"]

ENTRYPOINT ["webhook-bridge"]
CMD ["serve"]
