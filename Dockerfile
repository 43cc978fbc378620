# syntax=docker/dockerfile:1
# The image every manifest of infra/k8s runs: the Ray head and workers (KubeRay), the
# Prefect server and worker, MLflow and the serving follower.
#
#   docker build -t ghcr.io/rzenembed/rzenembed:0.1.0 .
#
# The same install as the Makefile (requirements.txt under constraints.txt, then the project
# in editable mode without dependencies), into the image's own Python 3.11: no virtual
# environment, so the console scripts (ray, prefect, mlflow, rzenembed) are in
# /usr/local/bin, which is on PATH in every shell, login shells included (KubeRay runs
# `ray start` through bash). torch from PyPI is the CUDA build; the GPU driver comes from
# the node (NVIDIA container toolkit).
FROM python:3.11-slim-bookworm

# bash: KubeRay's container command and exec probes; wget: the exec health probes of KubeRay
# versions before Ray's HTTP health check; ca-certificates: TLS to S3; procps: ps for
# debugging a pod.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash ca-certificates procps wget \
    && rm -rf /var/lib/apt/lists/*

# What the Makefile exports (PREFECT_HOME excepted: the default, ~/.prefect, is the user's).
ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The project folder: prefect.yaml's pull step for the cluster deployments enters it, and
# infra/k8s sets it as the working directory of the Prefect worker and the follower.
WORKDIR /opt/rzenembed

# The pinned stack first: this layer is rebuilt only when the pins change.
COPY requirements.txt constraints.txt ./
RUN python -m pip install --upgrade pip wheel \
    && python -m pip install -r requirements.txt -c constraints.txt

COPY pyproject.toml README.md prefect.yaml ./
COPY rzenembed/ rzenembed/
COPY tasks/ tasks/
COPY flows/ flows/
COPY configs/ configs/
COPY benchmarks/ benchmarks/
RUN python -m pip install --no-deps -e . \
    && ray --version \
    && rzenembed --help > /dev/null \
    && python -c "import flows.pipeline, tasks"

# A non-root user (uid and gid 1000, the pods' runAsUser/fsGroup). The code stays owned by
# root; runs/ (relative outputs of a flow run from this folder) is the user's.
RUN groupadd --gid 1000 rzenembed \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash rzenembed \
    && mkdir -p /opt/rzenembed/runs \
    && chown rzenembed:rzenembed /opt/rzenembed/runs
USER 1000:1000

CMD ["bash"]
