# λScale: one image for every service; the command picks which one (see compose/README.md).
#   docker build -t lscale:latest .
#   docker run --rm lscale:latest router            # or scaler, model_store, transfer, executor
#   docker run --rm -it lscale:latest lscale top --nats-url nats://HOST:4222
#
# No `# syntax=` line and no BuildKit-only flag (COPY --chmod, RUN --mount): a syntax frontend
# is itself an image pulled from a registry, and the legacy builder (DOCKER_BUILDKIT=0) must
# build this file where no registry answers.
#
# Build arguments:
#   BASE             python:3.11-slim-bookworm (default), or a CUDA runtime image such as
#                    nvidia/cuda:13.0.0-runtime-ubuntu24.04 (its OS Python is installed; it
#                    must be Python >= 3.11, so Ubuntu 24.04 or later), or any local image
#                    with Debian's python3 + python3-venv (local/bookworm-python:3.11)
#   TORCH_INDEX_URL  https://download.pytorch.org/whl/cpu (default); .../whl/cu130 for CUDA.
#                    The CUDA wheels carry their CUDA libraries and the driver comes from the
#                    NVIDIA container toolkit, so the slim base serves GPUs too.
#   TORCH_VERSION    2.13.0, the version pyproject.toml pins
#   TORCH_WHEEL_DIR  a folder under compose/build-local/ holding the torch wheel: pip installs
#                    that file instead of torch from TORCH_INDEX_URL; empty (default) uses the
#                    index
#   PIP_CA_BUNDLE    a file under compose/build-local/ that pip trusts in the build stage (a
#                    registry reached through a TLS-inspecting proxy); empty (default): the
#                    base's own CA store. It never reaches the runtime stage.
#   WITH_RDMA        1 adds rdma-core and pyverbs (Debian/Ubuntu python3-pyverbs) for the
#                    rdma transport; 0 (default) leaves them out
#
# Here (no registry, torch on disk): `make image` fills compose/build-local/ and passes
#   --build-arg BASE=local/bookworm-python:3.11 --build-arg TORCH_WHEEL_DIR=wheels
#   --build-arg PIP_CA_BUNDLE=ca-bundle.crt

ARG BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${BASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A base without Python (a CUDA image) gets the OS's; python:* bases already have one.
# Apt versions are not pinned (DL3008): the base image's OS release fixes them.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# compose/build-local/ is empty in a clone; `make image` puts the local torch wheel and CA
# bundle there. Only this build stage sees it.
COPY compose/build-local/ /tmp/build-local/
ARG TORCH_WHEEL_DIR=""
ARG PIP_CA_BUNDLE=""
# pip of this stage only (/etc/pip.conf stays here): trust the given bundle
RUN if [ -n "${PIP_CA_BUNDLE}" ]; then \
        if [ ! -s "/tmp/build-local/${PIP_CA_BUNDLE}" ]; then \
            echo "PIP_CA_BUNDLE=${PIP_CA_BUNDLE}: no such file in compose/build-local/" >&2; \
            exit 1; \
        fi; \
        printf '[global]\ncert = /tmp/build-local/%s\n' "${PIP_CA_BUNDLE}" > /etc/pip.conf; \
    fi

# torch first and from its own index (or the wheel folder): from PyPI it would be a multi-GB
# CUDA build
# (pinned to the wheel's exact version, local label included, so only that file matches;
# torch's own dependencies still come from the index)
RUN if [ -n "${TORCH_WHEEL_DIR}" ]; then \
        wheel=$(find "/tmp/build-local/${TORCH_WHEEL_DIR}" -name "torch-${TORCH_VERSION}[+-]*.whl" \
                | head -1); \
        [ -n "${wheel}" ] || { echo "no torch-${TORCH_VERSION} wheel in ${TORCH_WHEEL_DIR}" >&2; \
                               exit 1; }; \
        version=$(basename "${wheel}" | cut -d- -f2); \
        pip install --no-cache-dir --find-links "$(dirname "${wheel}")" "torch==${version}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    fi

# the dependencies from pyproject.toml alone, so that a source change reuses this layer
COPY pyproject.toml /src/pyproject.toml
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

COPY README.md /src/README.md
COPY shared /src/shared
COPY services /src/services
COPY loadgen /src/loadgen
# (the bytecode pip compiles stays: it saves every service start the compile of torch)
RUN pip install --no-cache-dir --no-deps /src \
    && pip check

# ---------------------------------------------------------------------------------------------
FROM ${BASE} AS runtime
ARG WITH_RDMA=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

# Only what runs: the OS Python where the base has none, and the RDMA user space on request.
# The state folders exist here so that a named volume mounted on one starts owned by lscale.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null || [ "${WITH_RDMA}" = "1" ]; then \
        apt-get update \
        && if ! command -v python3 >/dev/null; then \
            apt-get install -y --no-install-recommends python3; fi \
        && if [ "${WITH_RDMA}" = "1" ]; then \
            apt-get install -y --no-install-recommends rdma-core ibverbs-providers python3-pyverbs; fi \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 lscale \
    && useradd --system --uid 10001 --gid lscale --create-home --home-dir /home/lscale \
        --shell /usr/sbin/nologin lscale \
    && mkdir -p /data/lscale/models /data/lscale/checkpoints /data/lscale/nats \
        /data/lscale/nats-auth /data/lscale/auth \
    && for identity in admin dashboard router scaler model_store transfer executor; do \
        mkdir -p "/data/lscale/exports/${identity}"; done \
    && chown -R lscale:lscale /data/lscale

# the venv was built on the same BASE, so its interpreter links resolve here too
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LSCALE_STATE_DIR=/data/lscale \
    LSCALE_LOG_FORMAT=json

# pyverbs comes with the OS's Python; the venv sees just that package, not all of dist-packages
RUN if [ "${WITH_RDMA}" = "1" ]; then \
        ln -s /usr/lib/python3/dist-packages/pyverbs \
            "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/pyverbs" \
        && python -c 'import pyverbs'; \
    fi

# (git keeps both scripts executable; the legacy builder copies the mode as it is)
COPY compose/image/lscale-service /usr/local/bin/lscale-service
COPY compose/image/healthcheck.py /usr/local/bin/lscale-healthcheck

USER 10001:10001
WORKDIR /home/lscale
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["lscale-healthcheck"]
ENTRYPOINT ["lscale-service"]
# the scaler's DockerProvisioner starts containers of this image without a command
CMD ["executor"]
