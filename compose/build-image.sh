#!/usr/bin/env bash
# Build the λScale image (`make image` runs this), then print its size and check that its
# runtime stage carries no build tools.
#
#   compose/build-image.sh [TAG]        # TAG defaults to $LSCALE_IMAGE or lscale:latest
#
# Where an official `python` base can be pulled, this is a plain `docker build`. Where it
# cannot (no image registry: the machines whose engine comes from
# ../shared/tools/docker-engine.sh) and the local base image exists, the same Dockerfile is
# built with build arguments alone: BASE=the local base, torch from the wheel in pip's
# find-links (copied into compose/build-local/wheels), and pip's CA bundle (copied to
# compose/build-local/ca-bundle.crt). LSCALE_BASE_IMAGE names the local base; LSCALE_BUILD_LOCAL
# = 1 forces that mode, 0 forbids it. The legacy builder is used throughout (DOCKER_BUILDKIT=0):
# it needs no frontend image.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-${LSCALE_IMAGE:-lscale:latest}}
LOCAL_BASE=${LSCALE_BASE_IMAGE:-local/bookworm-python:3.11}
TORCH_VERSION=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml | head -1)
PYTHON=${PYTHON:-python3}
args=(--build-arg "TORCH_VERSION=${TORCH_VERSION}")

mode=${LSCALE_BUILD_LOCAL:-auto}
if [ "$mode" = auto ]; then
  mode=0
  if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1 \
      && ! docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1; then
    mode=1
  fi
fi

if [ "$mode" = 1 ]; then
  docker image inspect "$LOCAL_BASE" >/dev/null 2>&1 || {
    echo "build-image: no local base image $LOCAL_BASE (run ../shared/tools/docker-engine.sh)" >&2
    exit 1
  }
  find_links=$($PYTHON -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | head -1)
  cert=$($PYTHON -m pip config list 2>/dev/null | sed -n "s/.*\.cert='\(.*\)'/\1/p" | head -1)
  cert=${cert:-${PIP_CERT:-}}
  mkdir -p compose/build-local/wheels
  wheel=""
  for dir in ${find_links//,/ }; do
    for f in "${dir#file://}"/torch-"${TORCH_VERSION}"+cpu-*.whl; do
      [ -f "$f" ] && wheel=$f && break 2
    done
  done
  if [ -n "$wheel" ]; then
    # hard link where possible (same file system), else copy; skipped when already there
    target=compose/build-local/wheels/$(basename "$wheel")
    [ -f "$target" ] || ln "$wheel" "$target" 2>/dev/null || cp "$wheel" "$target"
    args+=(--build-arg TORCH_WHEEL_DIR=wheels)
    echo "build-image: torch from $wheel"
  else
    echo "build-image: no torch-${TORCH_VERSION}+cpu wheel in pip's find-links; using the index"
  fi
  if [ -n "$cert" ] && [ -s "$cert" ]; then
    cp "$cert" compose/build-local/ca-bundle.crt
    args+=(--build-arg PIP_CA_BUNDLE=ca-bundle.crt)
    echo "build-image: pip trusts $cert"
  fi
  args+=(--build-arg "BASE=$LOCAL_BASE")
  echo "build-image: base $LOCAL_BASE (no image registry here)"
fi

start=$(date +%s)
DOCKER_BUILDKIT=0 docker build --quiet --force-rm -t "$TAG" "${args[@]}" . >/dev/null
echo "build-image: built $TAG in $(( $(date +%s) - start ))s"

size=$(docker image inspect --format '{{.Size}}' "$TAG")
echo "build-image: image size $TAG: $(( size / 1000000 )) MB"
# The runtime stage must hold no compiler, linker, make or C headers: only what runs.
found=$(docker run --rm --entrypoint /bin/sh "$TAG" -c \
  'for t in gcc cc c++ g++ clang ld make cmake; do command -v "$t"; done;
   ls /usr/include/python3*/Python.h 2>/dev/null; ls -d /tmp/build-local 2>/dev/null; true')
if [ -n "$found" ]; then
  echo "build-image: build tools in the runtime image:" >&2
  echo "$found" >&2
  exit 1
fi
echo "build-image: no build tools in the runtime stage (gcc, cc, c++, ld, make, cmake, Python.h)"
