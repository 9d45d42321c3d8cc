# syntax=docker/dockerfile:1
# One image, two commands: `python -m ws_node` (default) and `python -m agent_worker`;
# `python -m persistence migrate` runs the schema migration. See helm/chorus and docs/helm.md.

# --- build: install the project and its runtime dependencies into a venv (no dev/test extras) ---
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/chorus
WORKDIR /src
# .dockerignore admits only pyproject.toml, README, LICENSE, the packages and the chat page with the
# SDK's sources (tests/test_helm.py checks).
COPY . .
RUN /opt/chorus/bin/pip install .

# --- runtime: the venv alone, run as uid 10001 (the Helm chart also enforces it) ---
FROM python:3.11-slim
RUN groupadd --system --gid 10001 chorus \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin chorus
COPY --from=build /opt/chorus /opt/chorus
# The chat page and the SDK it imports, served by the nodes at / (WEB_ROOT).
COPY --from=build /src/clients /opt/chorus/clients
# Bytecode was compiled at install time. The root filesystem is read-only at runtime and /tmp is
# an emptyDir, so HOME points there for libraries that cache under ~.
ENV PATH=/opt/chorus/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WEB_ROOT=/opt/chorus/clients \
    HOME=/tmp
# Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# 8080: WebSocket /ws and REST /v1. 9090: /healthz, /readyz when INTERNAL_PORT=9090 is set, as the
# Helm chart does (the worker's internal port is 9091).
EXPOSE 8080 9090
CMD ["python", "-m", "ws_node"]
