#!/usr/bin/env bash
# Builds the images from the repository root (the build context).
#
#   bash docker/build.sh [cuda|cpu|all] [extra docker build options...]
#
# Tags: ${IMAGE:-htmuon-dist}:<package version>-<flavour> (e.g. htmuon-dist:0.1.0-cuda). Set
# PUSH=1 to push after building, DRY_RUN=1 to print the docker commands without running them.
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

build_one() {
  local name=$1
  shift
  local tag="$image:$version-$name"
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
