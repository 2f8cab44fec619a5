# syntax=docker/dockerfile:1
# The gateway image: every role, chosen by the command (docs/deployment.md).
#   docker build -t legacy-gateway:0.1.0 .
# Two stages: the builder makes wheels of the gateway and its dependencies; the runtime stage
# installs them from a bind mount (no wheel files, compilers or caches in the image) and runs as
# an unprivileged user. No secret is baked in: configuration and passwords come at run time.

# Pinned to a patch release; override with --build-arg PYTHON_IMAGE=... (a digest pin too).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY adapters adapters
COPY migrations migrations
RUN pip wheel --wheel-dir /wheels ".[postgres]"

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "legacy-gateway[postgres]" \
    && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gateway
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 9100
# The API's liveness by default; worker containers point HEALTHCHECK_URL at their /metrics
# (resilience.metrics_port), as compose.yaml does. Kubernetes ignores this and uses its probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL', 'http://127.0.0.1:8080/healthz'), timeout=2)"]
ENTRYPOINT ["gateway"]
CMD ["run", "-c", "/etc/gateway/gateway.yaml"]
