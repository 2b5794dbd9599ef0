# Tally server image: `tally serve` (the default) or `tally migrate` (run it as its own step,
# e.g. the Helm chart's pre-install/pre-upgrade Job) and the operator CLI `tallyctl`.
#
#   podman build --format docker -t localhost/tally:dev .       (or: scripts/check-deploy image)
#   podman run --rm -p 127.0.0.1:50051:50051 \
#     -e TALLY_DATABASE_URL=postgresql://user:pass@host:5432/tally localhost/tally:dev
#
# Base image. Both stages use the same Python (the runtime venv is built in the builder stage
# and copied over, so the interpreter path must match). Any Debian-style Python 3.11 image
# works, e.g. the official python:3.11-slim (`--build-arg BASE_IMAGE=...`). Without a container
# registry the default is built locally (scripts/check-deploy does this when it is missing):
#
#   debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
#     bookworm ROOTFS [apt's own mirror]
#   rm -rf ROOTFS/var/cache/apt/archives/*.deb ROOTFS/var/lib/apt/lists/*
#   tar -C ROOTFS -c . | podman import --change 'ENV LANG=C.UTF-8' \
#     --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
#     --change 'CMD ["python3"]' - localhost/tally-python:3.11
#
# Build with `--format docker` to keep the HEALTHCHECK (the OCI format has none; Kubernetes
# ignores it either way and uses the chart's native gRPC probes).
ARG BASE_IMAGE=localhost/tally-python:3.11

# ---------------------------------------------------------------------------------------------
# builder: the dependencies installed in the venv /opt/tally, and the project's two wheels.
# checkov:skip=CKV_DOCKER_7: the base is the build argument BASE_IMAGE, whose default has the fixed tag 3.11
FROM ${BASE_IMAGE} AS builder

ENV LANG=C.UTF-8 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# Steps that download from the package index mount an optional build secret `ca-bundle`: a
# CA bundle for networks whose TLS is intercepted (`--secret id=ca-bundle,src=FILE`;
# scripts/check-deploy passes the host's). It is not stored in any layer.
#
# Code generators (grpcio-tools, mypy-protobuf) and the build backend live in a build-only venv.
RUN --mount=type=secret,id=ca-bundle,required=false \
    if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install --quiet --upgrade pip \
 && /opt/build/bin/pip install --quiet grpcio-tools mypy-protobuf "setuptools>=69" wheel

WORKDIR /src

# Dependencies first (a layer that only changes with the two pyproject.toml files): the
# server's, less the client distribution (built below), with the optional OTLP trace exporter
# (tracing is off unless OTEL_TRACES_EXPORTER names it), and the client's. grpcio and protobuf
# are pinned to the versions of grpcio-tools, so the generated code matches its runtime.
COPY pyproject.toml ./
COPY clients/pyproject.toml clients/pyproject.toml
RUN --mount=type=secret,id=ca-bundle,required=false \
    if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && /opt/build/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; client = tomllib.load(open("clients/pyproject.toml", "rb"))["tool"]["tally-client"]["dependencies"]; print("\n".join([d for d in p["dependencies"] if not d.startswith("tally-metering-client")] + p["optional-dependencies"]["otlp"] + client + ["grpcio", "protobuf"]))' > /tmp/requirements.txt \
 && /opt/build/bin/pip freeze | grep -iE '^(grpcio|protobuf)==' > /tmp/constraints.txt \
 && /opt/build/bin/pip wheel --quiet --wheel-dir /wheels -r /tmp/requirements.txt -c /tmp/constraints.txt \
 && python3 -m venv --without-pip /opt/tally \
 && /opt/build/bin/pip --python /opt/tally/bin/python install --quiet --no-index --find-links /wheels -r /tmp/requirements.txt

# The project's two wheels (offline): the client (tally-metering-client), whose build
# generates tally/v1 from protos/ (clients/setup.py; generated code in the build context is
# never used: .dockerignore leaves it out), and the server (tally-metering-server), without
# its `embedded` extra: the image always runs against TALLY_DATABASE_URL.
COPY README.md ./
COPY protos protos
COPY service service
COPY clients clients
RUN /opt/build/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /wheels/tally \
      ./clients .

# ---------------------------------------------------------------------------------------------
# runtime: the interpreter and /opt/tally only; no compilers, no generators, no build context.
# Two layers: the dependencies (rebuilt only when a pyproject.toml changes) and the wheels.
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tally" \
      org.opencontainers.image.description="Tally: gRPC credits and ledger service" \
      org.opencontainers.image.version="${VERSION}"

# A fixed numeric user (Kubernetes runAsNonRoot needs a numeric USER); no home directory.
RUN groupadd --system --gid 10001 tally \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tally

# Owned by root and read-only for the service user. The wheel is installed with the
# builder's pip through bind mounts, so neither pip nor the wheels end up in a layer.
# A bind mount's content is not part of the layer cache key: SOURCE_HASH (a digest of the
# sources, passed by scripts/check-deploy) is, so changed wheels are installed again.
COPY --from=builder /opt/tally /opt/tally
ARG SOURCE_HASH=unknown
RUN --mount=type=bind,from=builder,source=/opt/build,target=/opt/build \
    --mount=type=bind,from=builder,source=/wheels/tally,target=/wheels \
    echo "sources $SOURCE_HASH" \
 && /opt/build/bin/pip --python /opt/tally/bin/python install --quiet --no-index --no-deps \
      --disable-pip-version-check --root-user-action=ignore \
      /wheels/tally_metering_client-*.whl /wheels/tally_metering_server-*.whl \
 && /opt/build/bin/pip --python /opt/tally/bin/python check --disable-pip-version-check \
 && /opt/tally/bin/python -c 'import tally_service.server, tally_client, tally.v1.credits_pb2'

# Read-only root filesystem: everything that might write goes to /tmp (an emptyDir in
# Kubernetes, a tmpfs with `podman run --read-only`); bytecode is precompiled at install.
ENV PATH=/opt/tally/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    HOME=/tmp \
    TMPDIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TALLY_LISTEN_ADDRESS=0.0.0.0:50051 \
    TALLY_METRICS_ADDRESS=0.0.0.0:9464 \
    TALLY_LOG_FORMAT=json \
    TALLY_DATA_DIR=/tmp/tally-data

USER 10001:10001
WORKDIR /tmp

# 50051: gRPC (with grpc.health.v1); 9464: Prometheus /metrics.
EXPOSE 50051 9464

# gRPC health of the server itself (SERVING only while the database answers), on the
# plaintext health port when TALLY_HEALTH_ADDRESS is set (with TLS on the gRPC port).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/opt/tally/bin/python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; port = (os.environ.get('TALLY_HEALTH_ADDRESS') or os.environ.get('TALLY_LISTEN_ADDRESS', ':50051')).rsplit(':', 1)[1]; reply = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + port)).Check(h.HealthCheckRequest(), timeout=3); sys.exit(reply.status != h.HealthCheckResponse.SERVING)"]

# SIGTERM (the default stop signal): stop accepting, drain for TALLY_SHUTDOWN_GRACE_SECONDS.
ENTRYPOINT ["tally"]
CMD ["serve"]
