# syntax=docker/dockerfile:1
# Build: docker build -t openai-webhook-bridge:0.1.0 .
# Configuration comes only from BRIDGE_* environment variables and secret files mounted under
# /run/secrets/webhook-bridge (one file per setting); nothing secret is baked into the image.

# Both stages start from the same Python image, pinned by the digest of the tag's multi-platform
# index so that a re-pushed tag cannot change what is built. To move to a newer base, take the
# digest that `docker buildx imagetools inspect python:<tag>` (or `crane digest python:<tag>`)
# prints as the index's, put tag@digest here and in docker-compose.yml, and rebuild. Any
# Debian-based image with python, venv, groupadd and useradd works (--build-arg PYTHON_IMAGE=...);
# tests/test_image.py builds on a debootstrapped bookworm.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm@sha256:2199a62885a12290dc9c5be3ca0681d367576ab7bf037da120e564723292a2f0

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Every dependency ships manylinux wheels, so no compiler is needed even here.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The dependencies (with the OpenTelemetry SDK for spans when OTEL_* variables ask for them and
# the Redis client for BRIDGE_DEDUP_URL) and the tools that build the wheel come from
# constraints-image.txt alone, each file checked against its hashes; then the wheel is built
# with those tools and installed without resolving anything more. pip check fails the build
# when the pins no longer satisfy pyproject.toml. pip byte-compiles while installing, so the
# read-only runtime image never needs to write .pyc files.
COPY constraints-image.txt ./
RUN pip install --require-hashes --no-deps --only-binary :all: -r constraints-image.txt
# README.md is the package's long description; the wildcard keeps the build working without it.
COPY pyproject.toml README.md* ./
COPY bridge ./bridge
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && pip install --no-deps --no-index /wheels/*.whl \
 && pip uninstall --yes setuptools wheel \
 && pip check \
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
# Webhooks on 8080 (BRIDGE_PORT); /healthz, /readyz and /metrics on 8081 (BRIDGE_METRICS_PORT).
EXPOSE 8080 8081

# No curl in slim images: probe /healthz with the standard library, on BRIDGE_PORT when
# BRIDGE_METRICS_PORT is 0.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = int(os.environ.get('BRIDGE_METRICS_PORT', '8081')) or int(os.environ.get('BRIDGE_PORT', '8080')); urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

ENTRYPOINT ["webhook-bridge"]
CMD ["serve"]
