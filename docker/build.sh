#!/usr/bin/env bash
# Builds the images from the repository root (the build context).
#
#   bash docker/build.sh [cuda|cpu|all] [extra docker build options...]
#
# Tags: ${IMAGE:-htmuon-dist}:<package version>-<flavour> (e.g. htmuon-dist:0.1.0-cuda). Set
# PUSH=1 to push after building, DRY_RUN=1 to print the docker commands without running them.
# CUDA=12.6|12.8|12.9 builds the CUDA image on CUDA 12.x (PyTorch's cu12x wheels, for drivers
# older than 580) instead of 13.0; the tag gets the suffix -cu12x.
# Secrets never go in as build arguments (they would stay in the image history): a private
# package index goes through BuildKit's --secret, tokens through the run-time environment.
set -euo pipefail
cd "$(dirname "$0")/.."

flavour=${1:-all}
if [ "$#" -gt 0 ]; then shift; fi
image=${IMAGE:-htmuon-dist}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
if [ -z "$version" ]; then
  echo "build.sh: no version = \"...\" line in pyproject.toml" >&2
  exit 2
fi

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# CUDA 12.x: base image, torch's CUDA and the wheel index move together (Dockerfile.cuda checks it).
declare -A CUDA_BASE=([12.6]=12.6.3 [12.8]=12.8.1 [12.9]=12.9.1)
cuda_args=()
suffix=""
if [ -n "${CUDA:-}" ]; then
  if [ -z "${CUDA_BASE[$CUDA]:-}" ]; then
    echo "build.sh: CUDA=$CUDA is not one of ${!CUDA_BASE[*]} (unset it for the default CUDA 13.0)" >&2
    exit 2
  fi
  tag_cuda="cu${CUDA/./}"
  cuda_args=(--build-arg "CUDA_VERSION=${CUDA_BASE[$CUDA]}" --build-arg "TORCH_CUDA=$CUDA"
             --build-arg "TORCH_WHEELS=$tag_cuda")
  suffix="-$tag_cuda"
fi

build_one() {
  local name=$1
  shift
  local tag="$image:$version-$name"
  if [ "$name" = cuda ]; then
    tag="$tag$suffix"
    set -- "${cuda_args[@]}" "$@"
  fi
  DOCKER_BUILDKIT=1 run docker build --file "docker/Dockerfile.$name" --tag "$tag" \
    --label "org.opencontainers.image.version=$version" "$@" .
  if [ "${PUSH:-0}" = 1 ]; then
    run docker push "$tag"
  fi
}

if [ "${DRY_RUN:-0}" != 1 ] && ! docker info >/dev/null 2>&1; then
  echo "build.sh: no Docker engine reachable (docker info failed); start dockerd or set DOCKER_HOST" >&2
  exit 1
fi

case "$flavour" in
  cuda | cpu) build_one "$flavour" "$@" ;;
  all)
    build_one cuda "$@"
    build_one cpu "$@"
    ;;
  *)
    echo "build.sh: unknown flavour '$flavour' (cuda, cpu or all)" >&2
    exit 2
    ;;
esac
