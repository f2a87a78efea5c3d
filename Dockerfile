# Two images: `--target gpu` (CUDA + paddlepaddle-gpu from Paddle's index) and
# `--target cpu` (slim Python + PyPI paddlepaddle). Weights are never baked in:
# they live in the /models volume (JANUS_HOME). See the Deployment section of README.md.
# Must build with the legacy builder (DOCKER_BUILDKIT=0) as well as BuildKit, so no
# `# syntax=` line and no BuildKit-only flags: COPY keeps the scripts' 0755 from git.

# The CUDA base and Paddle's wheel index must name the same CUDA (12.6 here);
# PADDLE_GPU_VERSION follows the paddlepaddle pin in constraints.txt.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
ARG PADDLE_INDEX_URL=https://www.paddlepaddle.org.cn/packages/stable/cu126/
ARG PADDLE_GPU_VERSION=3.3.1
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG PIP_VERSION=26.3

# CPU image: build a venv, then copy it onto a clean base.
FROM ${PYTHON_IMAGE} AS cpu-build
ARG PIP_VERSION
WORKDIR /src
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}"
COPY pyproject.toml constraints.txt README.md ./
COPY model ./model
COPY server ./server
RUN /opt/venv/bin/pip install --no-cache-dir -c constraints.txt .

FROM ${PYTHON_IMAGE} AS cpu
# libgomp1: Paddle's libcommon.so and libdnnl.so.3 need the GNU OpenMP runtime, which
# slim bases lack; tests/test_container.py checks what Paddle's libraries need is here.
# Debian's versions move with security updates; pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 janus \
 && useradd --no-log-init --uid 10001 --gid janus --create-home --shell /usr/sbin/nologin janus \
 && mkdir /models \
 && chown janus:janus /models
COPY --from=cpu-build /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/janus-entrypoint
COPY docker/healthcheck.py /usr/local/bin/janus-healthcheck
# The golden set `janus-server check` runs (the official code's outputs for a tiny random model, 33 MB)
COPY tests/golden/janus-tiny /opt/janus-server/golden/janus-tiny
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    JANUS_HOME=/models \
    JANUS_HOST=0.0.0.0 \
    JANUS_PORT=8000 \
    JANUS_DEVICES=cpu
USER 10001:10001
WORKDIR /home/janus
VOLUME ["/models"]
EXPOSE 8000
# First start downloads ~4 GB and loads it: unhealthy only after 10 minutes of trying.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 CMD ["janus-healthcheck"]
# tini forwards SIGTERM to the server (not its process group) so the server drains and stops its own workers.
ENTRYPOINT ["tini", "--", "janus-entrypoint"]

# GPU image: the same on CUDA, with paddlepaddle-gpu in place of paddlepaddle.
FROM ${CUDA_IMAGE} AS gpu-base
ARG DEBIAN_FRONTEND=noninteractive
# The same setup as the cpu stage (tests/test_container.py keeps them in agreement),
# plus the Python and CA certificates the slim Python image has and the CUDA one lacks.
# Ubuntu's versions move with security updates; pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv tini ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 janus \
 && useradd --no-log-init --uid 10001 --gid janus --create-home --shell /usr/sbin/nologin janus \
 && mkdir /models \
 && chown janus:janus /models

FROM gpu-base AS gpu-build
ARG PIP_VERSION
ARG PADDLE_GPU_VERSION
ARG PADDLE_INDEX_URL
WORKDIR /src
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "pip==${PIP_VERSION}"
COPY pyproject.toml constraints.txt README.md ./
COPY model ./model
COPY server ./server
# paddlepaddle and paddlepaddle-gpu both install the `paddle` package, so the CPU
# one must not come in: drop its pin, install the GPU wheel (its CUDA libraries
# come from Paddle's index), then the other dependencies, then the project alone.
RUN grep -v '^paddlepaddle==' constraints.txt > /tmp/constraints-gpu.txt \
 && /opt/venv/bin/pip install --no-cache-dir -c /tmp/constraints-gpu.txt \
        --index-url "${PADDLE_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        "paddlepaddle-gpu==${PADDLE_GPU_VERSION}" \
 && /opt/venv/bin/python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if not d.startswith(("paddlepaddle", "openvino"))))' > /tmp/requirements-gpu.txt \
 && /opt/venv/bin/pip install --no-cache-dir -c /tmp/constraints-gpu.txt -r /tmp/requirements-gpu.txt \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM gpu-base AS gpu
COPY --from=gpu-build /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/janus-entrypoint
COPY docker/healthcheck.py /usr/local/bin/janus-healthcheck
# The golden set `janus-server check` runs (the official code's outputs for a tiny random model, 33 MB)
COPY tests/golden/janus-tiny /opt/janus-server/golden/janus-tiny
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    JANUS_HOME=/models \
    JANUS_HOST=0.0.0.0 \
    JANUS_PORT=8000
USER 10001:10001
WORKDIR /home/janus
VOLUME ["/models"]
EXPOSE 8000
# First start downloads ~4 GB and loads it: unhealthy only after 10 minutes of trying.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 CMD ["janus-healthcheck"]
# tini forwards SIGTERM to the server (not its process group) so the server drains and stops its own workers.
ENTRYPOINT ["tini", "--", "janus-entrypoint"]
